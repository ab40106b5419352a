"""Softmax top-k routing: the one-kernel Triton version against torch's (``mopt.kernels.route``).

Expert ids must be equal. Weights: the kernel's softmax rounds like torch's up to its exponential
(the interpreter's is numpy's, the GPU's ``ex2.approx`` is within 2 ulp after an argument rounded
once), and renormalizing sums at most ``top_k`` terms in another order; 4e-6 relative covers both
for logits within 8 of the largest (the arguments here). Off CUDA ``route.softmax_topk`` is torch's.
"""

from __future__ import annotations

import pytest
import torch

from triton_device import triton_device

from mopt.kernels import route

triton_route = pytest.importorskip("mopt.kernels.triton_route")

# (tokens, experts, top_k, renormalize, scale, local experts (start, count) or None)
CASES = [
    (1, 128, 8, True, 1.0, None),        # Qwen3-30B-A3B at batch 1
    (5, 60, 4, False, 2.5, None),        # Qwen2-MoE-like, a routed scaling factor
    (3, 8, 2, True, 1.0, (4, 4)),        # Mixtral under expert parallelism, rank 1 of 2
    (64, 256, 8, True, 2.5, (128, 128)),
    (2, 7, 7, False, 1.0, (0, 3)),       # every expert chosen; experts not a power of two
    (0, 16, 2, True, 1.0, None),
]


def _check(device, t, e, k, renormalize, scale, local):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t * 1000 + e)) * 2
    want_w, want_ids = route.softmax_topk_reference(logits, k, renormalize, scale, local)
    got_w, got_ids = triton_route.softmax_topk(logits.to(device), k, renormalize, scale, local)
    assert got_w.dtype == torch.float32 and got_ids.dtype == torch.int64 and got_ids.shape == (t, k)
    assert torch.equal(got_ids.cpu(), want_ids)
    assert torch.allclose(got_w.cpu(), want_w, rtol=4e-6, atol=0)


@pytest.mark.parametrize("t,e,k,renormalize,scale,local", CASES)
def test_route_interpreted(t, e, k, renormalize, scale, local):
    _check(triton_device(False), t, e, k, renormalize, scale, local)


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k,renormalize,scale,local", CASES + [(16, 1024, 8, True, 1.0, None)])
def test_route_gpu(t, e, k, renormalize, scale, local):
    _check(triton_device(True), t, e, k, renormalize, scale, local)


def test_ties_go_to_the_lower_expert_interpreted():
    device = triton_device(False)
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 1.0, -2.0]])
    weights, ids = triton_route.softmax_topk(logits.to(device), 4, False)
    assert ids.tolist() == [[1, 3, 2, 4]]
    assert weights[0, 0] == weights[0, 1] and weights[0, 2] == weights[0, 3]


def test_strided_bf16_logits_interpreted():
    """Router logits as a model hands them: BF16, a column slice of a wider output."""
    device = triton_device(False)
    wide = torch.randn(3, 40, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    logits = wide[:, 8:40]
    want_w, want_ids = route.softmax_topk_reference(logits, 4, True)
    got_w, got_ids = triton_route.softmax_topk(logits.to(device), 4, True)
    assert torch.equal(got_ids.cpu(), want_ids) and torch.allclose(got_w.cpu(), want_w, rtol=4e-6, atol=0)


def test_dispatch():
    logits = torch.randn(4, 16)
    for args in ((2, True), (3, False, 2.0, (8, 8))):
        got = route.softmax_topk(logits, *args)
        want = route.softmax_topk_reference(logits, *args)
        assert all(torch.equal(a, b) for a, b in zip(got, want))  # CPU: torch's, bit for bit
    assert route._kernel_for(logits, 2) is None
    assert route.local_expert_ids(torch.tensor([[0, 5, 7, 8]]), (4, 4)).tolist() == [[4, 1, 3, 4]]
    assert route.local_expert_ids(torch.tensor([[0, 5]]), None).tolist() == [[0, 5]]
