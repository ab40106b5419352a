"""The two-shot all-reduce + residual add + RMSNorm (``triton_two_shot_norm``) against the one-shot kernel.

Through the interpreter one rank runs at a time, so what its peers would have sent is put in place
first: for the rows it owns (``row % world``), the other ranks' partial sums in its ``rows`` slot; for
the others, the owner's sum in its ``gathered`` slot, as the owner's kernel sends it. The rank must
return the one-shot kernel's bits for every row, send each partial row to its owner only and each owned
row's sum to every peer, free the slots the protocol says and move every row's counter, from any slot.
On GPUs nothing runs it yet unless ``MOPT_TP_TWO_SHOT_ROWS`` is set: then the set-up probes it against
the one-shot sum, and the GPU suite (``tests/parallel/test_tp_gpu.py``) runs the models through it.
"""

from __future__ import annotations

import pytest
import torch

from peer_buffers import DTYPE, Buffers  # float16: see peer_buffers
from time_limit import time_limit
from triton_device import triton_device

tan = pytest.importorskip("mopt.kernels.triton_allreduce_norm")
two = pytest.importorskip("mopt.kernels.triton_two_shot_norm")

SENTINEL = tan.SENTINEL_BITS
HALF = tan.ROW_BYTES // 2


def _wire(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words == SENTINEL, torch.zeros_like(words), words)


def _words(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).view(torch.int16)


def _one_shot(partials, residual, weight, scale, nvfp4, world, device):
    """Every row's (normed, sum) as the one-shot kernel returns them (the same on every rank)."""
    buffers = Buffers(world, device)
    for s in range(1, world):
        buffers.send(s, 0, 0, partials[s])
    kw = dict(nvfp4_scale=scale) if nvfp4 else {}
    return tan.all_reduce_rms_norm(partials[0], residual, weight, 1e-5, None if nvfp4 else scale, buffers.peers(0),
                                   **kw)


@pytest.mark.parametrize("world,rank,first", [(2, 1, 0), (3, 0, 1), (4, 2, 2), (8, 5, 1)])
@pytest.mark.parametrize("m,n", [(1, 64), (5, 96), (9, 256)])
@pytest.mark.parametrize("out", ["dtype", "fp8", "nvfp4"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_two_shot_equals_one_shot_interpreted(world, rank, first, m, n, out, with_residual):
    """One call of ``rank`` whose rows are at slot ``first`` (their counters say so), with a previous call's
    rows left in slot ``first - 1``."""
    device = triton_device(False)
    g = torch.Generator().manual_seed(world * 1000 + rank * 100 + m * n)
    partials = [(torch.randn(m, n, generator=g) * 2).to(DTYPE) for _ in range(world)]
    residual = torch.randn(m, n, generator=g).to(DTYPE) if with_residual else None
    weight = 1 + torch.randn(n, generator=g) * 0.1
    scale = {"dtype": None, "fp8": torch.tensor(0.03), "nvfp4": torch.tensor(0.02)}[out]
    want_out, want_res = _one_shot(partials, residual, weight, scale, out == "nvfp4", world, device)

    buffers = Buffers(world, device)
    before = (first + 2) % 3
    buffers.counters(rank)[:m] = first
    for r in range(m):
        for s in range(world):
            if s != rank:  # a previous call's rows, which this call must free
                buffers.row(rank, before, s, r, n).fill_(1.0)
        owner = r % world
        if owner == rank:
            for s in range(world):
                if s != rank:
                    buffers.row(rank, first, s, r, n).copy_(torch.where(partials[s][r] == 0, 0.0, partials[s][r]))
        else:
            buffers.gathered(rank, first, r)[:n] = _wire(_words(want_res[r]))
    kw = {"nvfp4_scale": scale} if out == "nvfp4" else {}
    with time_limit(60, "still waiting for a peer's row (a slot the test never filled)"):
        got_out, got_res = two.two_shot_rms_norm(partials[rank], residual, weight, 1e-5,
                                                 scale if out == "fp8" else None, buffers.peers(rank), **kw)
    assert got_out.dtype == want_out.dtype
    assert torch.equal(_words(got_res), _words(want_res))  # every row, the one-shot kernel's bits
    assert torch.equal(got_out.view(torch.uint8), want_out.view(torch.uint8))
    for r in range(m):
        owner = r % world
        for s in range(world):
            if s != rank:
                assert (buffers.row(rank, before, s, r, n).view(torch.int16) == SENTINEL).all()  # freed
        if owner == rank:  # its sum went to every peer
            for p in range(world):
                if p != rank:
                    assert torch.equal(buffers.gathered(p, first, r)[:n], _words(want_res[r]))
        else:  # its partial row went to the owner only, and its gathered slot is free again
            assert torch.equal(buffers.row(owner, first, rank, r, n).view(torch.int16),
                               _wire(_words(partials[rank][r])))
            for p in range(world):
                if p not in (rank, owner):
                    assert (buffers.row(p, first, rank, r, n).view(torch.int16) == SENTINEL).all()
            assert (buffers.gathered(rank, first, r) == SENTINEL).all()
    assert [buffers.next_slot(rank, r) for r in range(m + 1)] == [(first + 1) % 3] * m + [0]


def test_unsupported_inputs_are_named():
    x = torch.zeros(2, 64, dtype=DTYPE)
    with pytest.raises(ValueError, match="two_shot_rms_norm: one rank: nothing to reduce"):
        two.two_shot_rms_norm(x, x, torch.ones(64), 1e-5, None, Buffers(1, "cpu").peers(0))
    big = torch.zeros(tan.MAX_ROWS + 1, 64, dtype=DTYPE)
    with pytest.raises(ValueError, match=f"two_shot_rms_norm: {tan.MAX_ROWS + 1} rows, the buffer holds 1 to"):
        two.two_shot_rms_norm(big, big, torch.ones(64), 1e-5, None, Buffers(4, "cpu").peers(0))
