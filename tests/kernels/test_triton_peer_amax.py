"""Per-token FP8 quantization under the ranks' largest amax, exchanged over peer memory
(``kernels.triton_peer_amax``), through the interpreter with several ranks' buffers in one process: the peers'
amaxes put in place as their kernels would send them. Codes and scales must equal ``per_token_fp8`` under a MAX
all-reduce bit for bit (the path it replaces), and the slot protocol must hold: the value lands in every peer's
slot its counter names, the slot before is freed, the counter moves. Real concurrency:
``test_peer_protocol_processes``."""

from __future__ import annotations

import pytest
import torch

from peer_buffers import DTYPE, Buffers
from triton_device import triton_device
from mopt.kernels.linear import per_token_fp8

tan = pytest.importorskip("mopt.kernels.triton_allreduce_norm")
peer_amax = pytest.importorskip("mopt.kernels.triton_peer_amax")


def _slices(world: int, rows: int, n: int, seed: int) -> list[torch.Tensor]:
    """Each rank's slice of the rows: magnitudes that differ by rank, an all-zero row, a negative zero."""
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(rows, n, generator=g) * (r + 1) * (1 + torch.rand(rows, 1, generator=g))).to(DTYPE)
          for r in range(world)]
    for x in xs:
        x[-1] = 0.0
        x[0, 0] = -0.0
    return xs


def _bits(amax: torch.Tensor) -> torch.Tensor:
    return amax.to(DTYPE).view(torch.int16)


@pytest.mark.parametrize("world,rank,rows,n", [(2, 0, 3, 48), (2, 1, 1, 64), (3, 2, 4, 100), (4, 1, 2, 33)])
def test_codes_and_scales_equal_the_max_all_reduce_path_call_after_call(world, rank, rows, n):
    device = triton_device(False)
    buffers = Buffers(world, device)
    for call in range(4):  # slots 0, 1, 2, 0: every slot used and freed
        xs = _slices(world, rows, n, seed=10 * call + world)
        amaxes = [x.abs().amax(dim=-1) for x in xs]
        slot = call % tan.SLOTS
        for r in range(rows):
            assert int(buffers.amax_counters(rank)[r]) == slot
        for s in range(world):
            if s != rank:
                for r in range(rows):
                    buffers.amax(rank, slot, s, r).copy_(_bits(amaxes[s][r]))
        q, scale = peer_amax.per_token_fp8_over_peers(xs[rank].to(device), buffers.peers(rank))
        whole = torch.stack(amaxes).amax(dim=0).reshape(rows, 1)
        want_q, want_scale = per_token_fp8(xs[rank], lambda _: whole)
        assert q.shape == (rows, n) and scale.shape == (rows, 1)
        assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(scale.cpu(), want_scale)
        assert float(scale[-1]) == 1.0  # the all-zero row
        for s in range(world):
            if s == rank:
                continue
            for r in range(rows):  # sent: this rank's amax in the peer's slot; freed: this rank's slot before
                assert torch.equal(buffers.amax(s, slot, rank, r), _bits(amaxes[rank][r]))
                assert int(buffers.amax(rank, (slot - 1) % tan.SLOTS, s, r)) == tan.SENTINEL_BITS
        assert buffers.amax_counters(rank)[:rows].tolist() == [(slot + 1) % tan.SLOTS] * rows
        assert not buffers.amax_counters(rank)[rows:].any()
        assert not buffers.counters(rank).any()  # the fused norm's counters are not this kernel's


@pytest.mark.parametrize("dtype,rows,why", [(torch.float32, 2, "activations are torch.float32"),
                                            (DTYPE, tan.MAX_ROWS + 1, "129 rows")])
def test_what_it_cannot_send_is_refused(dtype, rows, why):
    buffers = Buffers(2, "cpu")
    x = torch.zeros(rows, 16, dtype=dtype)
    assert not peer_amax.supports(x, 2)[0]
    with pytest.raises(ValueError, match=why):
        peer_amax.per_token_fp8_over_peers(x, buffers.peers(0))
