"""The all-reduce fused with the residual add and RMSNorm (``triton_allreduce_norm``) against its reference.

Through the interpreter (CI) the ranks' buffers are ordinary CPU tensors, and the peers' rows are put in
place beforehand, as their kernels would have pushed them. The arithmetic must equal, bit for bit,
the reference sum followed by ``triton_glue.rms_norm`` (the same rounding steps and reduction tree
through the same interpreter), and the torch reference to the glue tests' tolerance (the mean square
sums in another order than torch's). Two real GPUs run it in ``tests/parallel/test_tp_gpu.py``
(through the models) and in the set-up's probe (bit-equal to the one-shot sum and the norm kernel).
"""

from __future__ import annotations

import pytest
import torch

from peer_buffers import DTYPE, Buffers  # float16: see peer_buffers
from triton_device import triton_device

from mopt.kernels.glue import all_reduce_rms_norm_reference
from mopt.quant.formats import fp8

tan = pytest.importorskip("mopt.kernels.triton_allreduce_norm")
triton_glue = pytest.importorskip("mopt.kernels.triton_glue")


def _inputs(world: int, m: int, n: int, seed: int, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    partials = [(torch.randn(m, n, generator=g) * 2).to(dtype) for _ in range(world)]
    residual = torch.randn(m, n, generator=g).to(dtype)
    weight = 1 + torch.randn(n, generator=g) * 0.1
    return partials, residual, weight


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1), (4, 2), (8, 7)])
@pytest.mark.parametrize("m,n", [(1, 64), (1, 300), (3, 200), (2, 1024)])
@pytest.mark.parametrize("fp8_out", [False, True])
@pytest.mark.parametrize("with_residual", [True, False])
def test_sum_and_norm_interpreted(world, rank, m, n, fp8_out, with_residual):
    """One call of ``rank``, its peers' rows put in place beforehand as their kernels would have. One row
    of 300 is split over four programs (the last one's columns all past the row), 64 is not. Without a
    residual (the first layer's norm of the embedding's rows) the rounded sum is normalized and returned."""
    device = triton_device(False)
    partials, residual, weight = _inputs(world, m, n, seed=world * 100 + m * n + rank)
    residual = residual if with_residual else None
    buffers = Buffers(world, device)
    for s in range(world):
        if s != rank:
            buffers.send(s, rank, 0, partials[s])
    scale = torch.tensor(0.03) if fp8_out else None
    out, res = tan.all_reduce_rms_norm(partials[rank], residual, weight, 1e-5, scale, buffers.peers(rank))
    total = partials[0].float()
    for p in partials[1:]:
        total += p.float()
    if with_residual:
        want_out, want_res = triton_glue.rms_norm(total.to(DTYPE), weight, 1e-5, residual, scale)
    else:
        want_out, want_res = triton_glue.rms_norm(total.to(DTYPE), weight, 1e-5, None, scale), total.to(DTYPE)
    assert torch.equal(res, want_res)
    assert torch.equal(out.view(torch.uint8), want_out.view(torch.uint8))
    ref_out, ref_res = all_reduce_rms_norm_reference(partials, residual, weight, 1e-5, scale)
    assert torch.equal(res, ref_res)
    if fp8_out:
        assert out.dtype == fp8.FP8_DTYPE
        g, w = out.float(), ref_out.float()
        assert ((g - w).abs() <= w.abs() * 2**-3 + 2**-9).all()  # within one E4M3 step
    else:
        assert ((out.float() - ref_out.float()).abs() <= ref_out.float().abs() * 2**-7 + 1e-6).all()
    for s in range(world):  # the rank's row went to every peer, slot 0
        if s != rank:
            for r in range(m):
                assert torch.equal(buffers.row(s, 0, rank, r, n), partials[rank][r])
    assert [buffers.next_slot(rank, r) for r in range(m + 1)] == [1] * m + [0]


def test_unsupported_inputs_are_named():
    x = torch.zeros(tan.MAX_ROWS + 1, 64, dtype=DTYPE)
    assert tan.supports(x, 2) == (False, f"{tan.MAX_ROWS + 1} rows, the buffer holds 1 to {tan.MAX_ROWS}")
    assert not tan.supports(torch.zeros(1, 64), 2)[0]  # float32
    assert not tan.supports(torch.zeros(1, tan.ROW_BYTES, dtype=DTYPE), 2)[0]  # row too wide
    assert not tan.supports(torch.zeros(1, 64, dtype=DTYPE), tan.MAX_WORLD + 1)[0]
    assert tan.supports(torch.zeros(2, 3, 64, dtype=DTYPE), 2) == (True, "")
    with pytest.raises(ValueError, match="rows, the buffer holds"):
        tan.all_reduce_rms_norm(x, x, torch.ones(64), 1e-5, None, Buffers(2, "cpu").peers(0))


@pytest.mark.parametrize("m", [1, 2])
def test_slots_rotate_and_are_freed_interpreted(m):
    """Rank 0 of two over five calls: each call reads the slot its row counter names, sends into the
    peer's same slot, puts the sentinel back into the slot before it, and moves the counter on (every
    copy of it: one row is split over four programs); negative zeros travel as positive ones (the
    sentinel is -0.0). A wrong slot hangs here (its row never arrives)."""
    device = triton_device(False)
    n = 128
    buffers = Buffers(2, device)
    sentinel = torch.full((n,), tan.SENTINEL_BITS, dtype=torch.int16)
    for call in range(5):
        slot = call % 3
        partials, residual, weight = _inputs(2, m, n, seed=call)
        partials[0][0, :4] = -0.0
        partials[1][m - 1, 60:68] = -0.0
        buffers.send(1, 0, slot, partials[1])
        out, res = tan.all_reduce_rms_norm(partials[0], residual, weight, 1e-6, None, buffers.peers(0))
        _, want_res = all_reduce_rms_norm_reference(partials, residual, weight, 1e-6)
        assert torch.equal(res, want_res)
        for r in range(m):
            sent = buffers.row(1, slot, 0, r, n)
            assert torch.equal(sent, partials[0][r]) and not torch.signbit(sent[sent == 0]).any()
            assert torch.equal(buffers.row(0, (slot + 2) % 3, 1, r, n).view(torch.int16), sentinel)
            assert buffers.next_slot(0, r) == (slot + 1) % 3
            buffers.row(1, slot, 0, r, n).view(torch.int16).fill_(tan.SENTINEL_BITS)  # rank 1 frees its slot


@pytest.mark.gpu
@pytest.mark.parametrize("m,n", [(1, 4096), (64, 4096), (128, 8192), (5, 576)])
def test_one_rank_on_a_gpu(m, n):
    """One GPU, one rank (no peers): the kernel as compiled equals the norm kernel on the same sum."""
    device = triton_device(True)
    partials, residual, weight = _inputs(1, m, n, seed=m, dtype=torch.bfloat16)
    buffers = Buffers(1, device)
    x, residual, weight = partials[0].to(device), residual.to(device), weight.to(device)
    for scale in (None, torch.tensor(0.03, device=device)):
        for _ in range(3):
            out, res = tan.all_reduce_rms_norm(x, residual, weight, 1e-5, scale, buffers.peers(0))
            want_out, want_res = triton_glue.rms_norm(x, weight, 1e-5, residual, scale)
            assert torch.equal(res, want_res) and torch.equal(out.view(torch.uint8), want_out.view(torch.uint8))
    assert buffers.next_slot(0, m - 1) == 6 % 3
