"""Write the tiny ModelOpt exports the GPU tests read from ``$MOPT_TEST_EXPORTS`` (GPU machines here have no
nvidia-modelopt), each in ``DIR/<arch>-<fmt>``:

* ``DENSE``: Llama FP8+FP8 KV, Qwen3 NVFP4, Llama NVFP4+FP8 KV (tests/engine/test_cuda_graphs.py);
* ``FORMATS``: every other format ModelOpt 0.47 exports on a CPU (``mopt quantize --format``; not the INT8 KV
  cache, which it cannot export), on the 256-wide tiny Llama of tests/conftest.py (the AWQ formats need
  K % 128 == 0): tests/engine/test_formats_gpu.py;
* ``MOE``: tiny Qwen3-MoE / Mixtral exports of tests/models/test_moe.py (FP8 and NVFP4 there, the other
  expert formats ModelOpt exports, ``MOE_NEW``, in tests/engine/test_formats_gpu.py);
* ``PLAIN``: the unquantized tiny Llama and Qwen3-MoE those were made from (same seeds), against which the
  GPU tests measure each quantization's own effect on the logits.

Usage: ``PYTHONPATH=src:tests python3 tests/make_gpu_exports.py DIR [FORMAT ...]`` (formats: only those
exports; names as ``<arch>-<fmt>``). About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

DENSE = [("llama", "fp8-kv"), ("qwen3", "nvfp4"), ("llama", "nvfp4-kv")]
FORMATS = ["fp8", "fp8-pcpt", "fp8-pb-wo", "fp8-pb-real", "nvfp4", "nvfp4-awq", "nvfp4-svdquant", "w4a16-nvfp4",
           "w4a8-nvfp4-fp8", "int4-awq", "w4a8-awq", "int8-wo", "int8-sq", "mxfp8", "mxfp4", "w4a8-mxfp4-fp8",
           "fp8-nvfp4-kv", "fp8-nvfp4-affine-kv", "mixed-fp8-nvfp4"]
MOE_NEW = [("qwen3_moe", fmt) for fmt in ("fp8-pcpt", "fp8-pb-wo", "int8-wo", "int8-sq", "mxfp8", "mxfp4",
                                          "w4a8-mxfp4-fp8", "w4a16-nvfp4", "w4a8-nvfp4-fp8")]
MOE = [(arch, fmt) for fmt in ("fp8", "nvfp4") for arch in ("qwen3_moe", "mixtral")] + MOE_NEW
PLAIN = ["llama-plain", "qwen3_moe-plain"]  # the unquantized models (float32) the exports were made from


def export_names() -> list[str]:
    """Every folder ``main`` writes."""
    return [f"{a}-{f}" for a, f in DENSE] + [f"llama-{f}" for f in FORMATS] + PLAIN + [f"{a}-{f}" for a, f in MOE]


def main(out: Path, only: list[str] | None = None) -> None:
    from conftest import make_export, tiny_llama
    from models.test_moe import moe_export, tiny_moe

    class _Factory:
        def mktemp(self, name):
            return Path(tempfile.mkdtemp(prefix=name))

    def wanted(name: str) -> bool:
        return not only or name in only

    def copy(path: Path, name: str) -> None:
        shutil.copytree(path, out / name, dirs_exist_ok=True)
        print(out / name, flush=True)

    unknown = sorted(set(only or []) - set(export_names()))
    if unknown:
        raise SystemExit(f"unknown export(s) {unknown}; choose from {export_names()}")
    root = Path(tempfile.mkdtemp(prefix="dense"))
    for arch, fmt in DENSE + [("llama", f) for f in FORMATS]:
        if wanted(f"{arch}-{fmt}"):
            copy(make_export(root, fmt, 256, arch).path, f"{arch}-{fmt}")
    for name, model in (("llama-plain", lambda: tiny_llama(256)), ("qwen3_moe-plain", lambda: tiny_moe("qwen3_moe"))):
        if wanted(name):  # the weights make_export / moe_export quantize (same seeds)
            model().save_pretrained(out / name)
            print(out / name, flush=True)
    for arch, fmt in MOE:
        if wanted(f"{arch}-{fmt}"):
            copy(moe_export(_Factory(), fmt, arch)[0], f"{arch}-{fmt}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
