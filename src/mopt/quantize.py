"""Quantize a Hugging Face model with NVIDIA ModelOpt and export a ModelOpt checkpoint.

A thin wrapper over ``modelopt.torch.quantization.quantize`` and
``modelopt.torch.export.export_hf_checkpoint`` (the optional ``nvidia-modelopt`` dependency):
it names the formats mopt runs, calibrates on the batches it is given, and makes ModelOpt's
NVFP4 fake quantization work on CPU, where ModelOpt only ships CUDA kernels for it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from mopt.atomic import atomic_directory

if TYPE_CHECKING:  # torch loads with the first quantization, not with the format names the CLI lists
    import torch

# Format name -> ModelOpt config names whose quant_cfg lists are concatenated, in order.
FORMATS: dict[str, tuple[str, ...]] = {
    "fp8": ("FP8_DEFAULT_CFG",),
    "fp8-kv": ("FP8_DEFAULT_CFG", "FP8_KV_CFG"),
    "fp8-pcpt": ("FP8_PER_CHANNEL_PER_TOKEN_CFG",),
    "fp8-pb-wo": ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",),
    "nvfp4": ("NVFP4_DEFAULT_CFG",),
    "nvfp4-kv": ("NVFP4_DEFAULT_CFG", "FP8_KV_CFG"),
    "nvfp4-awq": ("NVFP4_AWQ_LITE_CFG",),
}


def _modelopt():
    try:
        import modelopt.torch.export as mte
        import modelopt.torch.quantization as mtq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "quantizing needs NVIDIA ModelOpt: pip install -e '.[quantize]' "
            "(or pip install 'nvidia-modelopt==0.47.*' requests)"
        ) from e
    return mtq, mte


def quant_config(fmt: str) -> dict:
    """The ModelOpt quantize config for a format name of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    mtq, _ = _modelopt()
    names = FORMATS[fmt]
    base = dict(getattr(mtq, names[0]))
    quant_cfg = list(base["quant_cfg"])
    for name in names[1:]:
        quant_cfg += list(getattr(mtq, name)["quant_cfg"])
    base["quant_cfg"] = quant_cfg
    return base


def _cpu_dynamic_block_quantize(
    inputs: torch.Tensor,
    block_size: int,
    amax: torch.Tensor,
    num_bits: int,
    exponent_bits: int,
    scale_num_bits: int,
    scale_exponent_bits: int,
) -> torch.Tensor:
    """NVFP4 fake quantization through ModelOpt's own pure-torch ``NVFP4QTensor``."""
    import torch
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    if (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) != (4, 2, 8, 4):
        raise NotImplementedError(
            "only NVFP4 (E2M1 values, E4M3 scales) block fake-quant is routed to CPU; got "
            f"num_bits={num_bits} exponent_bits={exponent_bits} "
            f"scale_bits=({scale_num_bits}, {scale_exponent_bits})"
        )
    shape, dtype = inputs.shape, inputs.dtype
    global_scale = amax.float().amax() / (6.0 * 448.0)
    qtensor, scale, scale_2 = NVFP4QTensor.quantize(
        inputs.detach().clone(), block_size, weights_scaling_factor_2=global_scale
    )
    out = qtensor.dequantize(
        dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: block_size}
    )
    return out.reshape(shape).to(dtype)


@contextlib.contextmanager
def cpu_block_quantization() -> Iterator[None]:
    """Route ModelOpt's dynamic block quantizer to its pure-torch NVFP4 code while active."""
    import modelopt.torch.quantization.tensor_quant as tq

    original = tq.dynamic_block_quantize_op
    tq.dynamic_block_quantize_op = _cpu_dynamic_block_quantize
    try:
        yield
    finally:
        tq.dynamic_block_quantize_op = original


def quantize_model(
    model: torch.nn.Module,
    fmt: str,
    calibration: Iterable[torch.Tensor],
    progress: bool = False,
) -> torch.nn.Module:
    """Quantize ``model`` in place with ModelOpt, calibrating on batches of token ids (``progress``: a
    bar over the calibration batches on stderr)."""
    mtq, _ = _modelopt()
    batches = list(calibration)

    import torch
    from tqdm.auto import tqdm

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for ids in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                m(ids.to(next(m.parameters()).device))

    with cpu_block_quantization():
        return mtq.quantize(model, quant_config(fmt), forward_loop)


def export_checkpoint(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    save_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Export a ModelOpt-quantized model to ``out_dir`` atomically.

    The checkpoint is written to a temporary sibling folder and renamed into place only when
    complete, so an interrupted export never leaves a folder that looks usable.
    ``save_extra(tmp_dir)`` may add files (a tokenizer) before the rename.
    """
    import torch

    _, mte = _modelopt()
    out = Path(out_dir)
    if getattr(model.config, "architectures", None) in (None, []):
        model.config.architectures = [type(model).__name__]
    with atomic_directory(out) as tmp:
        with cpu_block_quantization(), torch.no_grad():
            mte.export_hf_checkpoint(model, export_dir=str(tmp))
        if save_extra is not None:
            save_extra(tmp)
    return out
