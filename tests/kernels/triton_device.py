"""Where a Triton kernel test runs: the interpreter on the CPU (CI), or a CUDA GPU (``-m gpu``)."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def triton_device(gpu: bool) -> str:
    """``"cuda"`` for GPU tests (skipped without one), ``"cpu"`` for interpreter runs (skipped without
    ``TRITON_INTERPRET=1``, since Triton kernels need the interpreter on a CPU)."""
    if gpu:
        if not torch.cuda.is_available():
            pytest.skip("needs a GPU")
        return "cuda"
    if not INTERPRETED:
        pytest.skip("runs through Triton's interpreter: set TRITON_INTERPRET=1 (CI does)")
    return "cpu"
