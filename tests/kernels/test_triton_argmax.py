"""The two-stage Triton argmax equals ``torch.argmax`` (first index of the maximum), ties included."""

from __future__ import annotations


import pytest
import torch

from triton_device import triton_device

triton_argmax = pytest.importorskip("mopt.kernels.triton_argmax")




def _check(device, b, v):
    x = torch.randn(b, v, generator=torch.Generator().manual_seed(v))
    if v > 5000:
        x[0, 4095], x[0, 4096], x[0, v - 1] = 50.0, 50.0, 50.0  # a tie across chunks: the first one wins
    x[-1] = 1.0  # all equal: index 0
    x = x.to(device)
    assert torch.equal(triton_argmax.argmax_rows(x).cpu(), x.cpu().argmax(dim=-1))


@pytest.mark.parametrize("b,v", [(1, 320), (3, 9000), (2, 4096)])
def test_argmax_interpreted(b, v):
    _check(triton_device(False), b, v)


@pytest.mark.gpu
@pytest.mark.parametrize("b,v", [(1, 128256), (64, 151936), (7, 32000), (1, 320)])
def test_argmax_gpu(b, v):
    _check(triton_device(True), b, v)
