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


def _key_rows(v):
    """Rows that stress the key's order: ties (within and across chunks), negatives only, -0.0 against
    +0.0 (equal: the first wins), and a plain random row."""
    x = torch.randn(5, v, generator=torch.Generator().manual_seed(v + 1))
    x[0, v // 3], x[0, v - 1] = 9.0, 9.0
    x[1] = -torch.rand(v, generator=torch.Generator().manual_seed(2)) - 1.0
    x[2] = -1.0
    x[2, 7], x[2, 3] = 0.0, -0.0
    x[3] = -3.5
    return x


@pytest.mark.parametrize("v,first", [(320, 0), (9000, 64128), (4096, 5)])
def test_argmax_keys_interpreted_equal_the_reference(v, first):
    from mopt.engine.sampler import argmax_keys_reference

    x = _key_rows(v)
    got = triton_argmax.argmax_keys(x.to(triton_device(False)), first).cpu()
    assert torch.equal(got, argmax_keys_reference(x, first))


@pytest.mark.gpu
@pytest.mark.parametrize("v,first", [(64128, 64128), (151936 // 2, 0)])
def test_argmax_keys_gpu_equal_the_reference(v, first):
    from mopt.engine.sampler import argmax_keys_reference

    x = _key_rows(v)
    assert torch.equal(triton_argmax.argmax_keys(x.to(triton_device(True)), first).cpu(), argmax_keys_reference(x, first))
