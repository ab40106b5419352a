"""Write the tiny ModelOpt exports the GPU tests read from ``$MOPT_TEST_EXPORTS`` (GPU machines here have no
nvidia-modelopt): dense Llama FP8+FP8 KV and Qwen3 NVFP4 (``<arch>-<fmt>``, as ``prebuilt_export`` in
tests/models/test_moe.py names them) and the MoE exports of that module.

Usage: ``PYTHONPATH=src:tests python3 tests/make_gpu_exports.py DIR``
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

DENSE = [("llama", "fp8-kv"), ("qwen3", "nvfp4"), ("llama", "nvfp4-kv")]


def main(out: Path) -> None:
    from conftest import make_export
    from models.test_moe import moe_export

    class _Factory:
        def mktemp(self, name):
            return Path(tempfile.mkdtemp(prefix=name))

    root = Path(tempfile.mkdtemp(prefix="dense"))
    for arch, fmt in DENSE:
        path = make_export(root, fmt, 256, arch).path
        shutil.copytree(path, out / f"{arch}-{fmt}", dirs_exist_ok=True)
        print(out / f"{arch}-{fmt}")
    for fmt in ("fp8", "nvfp4"):
        for arch in ("qwen3_moe", "mixtral"):
            path, _ = moe_export(_Factory(), fmt, arch)
            shutil.copytree(path, out / f"{arch}-{fmt}", dirs_exist_ok=True)
            print(out / f"{arch}-{fmt}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
