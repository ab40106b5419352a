"""The fused all-reduce kernels' slot protocol with real concurrency: one process per rank, each running the
kernels through the interpreter over buffers in POSIX shared memory that every rank maps (so a rank's
stores land in its peers' memory, and its waits spin until they do), with random delays, over a sequence
that mixes two-shot calls, one-shot calls (one-row calls split over 4 programs), producer pushes and the
per-token FP8 quantization under the ranks' amax (``peer_protocol_child.CALLS``). Every rank must return, call
after call, the reference sum and norm (up to the sign of a zero, which the wire makes positive), or the codes and
scales of ``per_token_fp8`` under the MAX over the ranks, and no rank may hang. A slot freed one call too early or
too late shows here as a stale row read or a wait that never ends.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from peer_protocol_child import CALLS, DTYPE, inputs, run_rank, scales
from triton_device import INTERPRETED
from mopt.kernels.linear import per_token_fp8

tan = pytest.importorskip("mopt.kernels.triton_allreduce_norm")
triton_glue = pytest.importorskip("mopt.kernels.triton_glue")


def _words(t: torch.Tensor) -> torch.Tensor:
    """16-bit words with -0.0's bits made +0.0's (the sentinel's sign change)."""
    w = t.contiguous().view(torch.uint8).view(torch.int16)
    return torch.where(w == tan.SENTINEL_BITS, torch.zeros_like(w), w)


@pytest.mark.skipif(not INTERPRETED, reason="runs through Triton's interpreter: set TRITON_INTERPRET=1 (CI does)")
@pytest.mark.parametrize("world,seed", [(3, 1), (4, 2)])
def test_ranks_in_processes_agree_call_after_call(world, seed, tmp_path):
    from multiprocessing import shared_memory

    memories = [shared_memory.SharedMemory(create=True, size=tan.buffer_bytes(world)) for _ in range(world)]
    try:
        for m in memories:
            tan.init_buffer(torch.frombuffer(m.buf, dtype=torch.uint8), world)
        ctx = mp.get_context("spawn")
        ranks = [ctx.Process(target=run_rank, args=(r, world, [m.name for m in memories], str(tmp_path / f"{r}.pt"),
                                                     seed)) for r in range(world)]
        for p in ranks:
            p.start()
        deadline = time.monotonic() + 240
        for p in ranks:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(ranks) if p.is_alive()]
        for p in ranks:
            if p.is_alive():
                p.kill()
                p.join(5)
        assert not hung, f"ranks {hung} still waiting after 240 s"
        assert [p.exitcode for p in ranks] == [0] * world
        got = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
        for call, (kernel, rows, output) in enumerate(CALLS):
            parts = [inputs(call, r, rows) for r in range(world)]
            if kernel == "amax":
                amax = torch.stack([x.abs().amax(dim=-1, keepdim=True) for x, _, _ in parts]).amax(dim=0)
                for r in range(world):
                    want_q, want_scale = per_token_fp8(parts[r][0], lambda _: amax)
                    q, scale = got[r][call]
                    assert torch.equal(q, want_q.view(torch.uint8)) and torch.equal(scale, want_scale), (call, r)
                continue
            total = torch.zeros(rows, parts[0][0].shape[1])
            for x, _, _ in parts:
                total += x.float()
            fp8_scale, nvfp4_scale = scales(output)
            want_out, want_sum = triton_glue.rms_norm(total.to(DTYPE), parts[0][2], 1e-5, parts[0][1], fp8_scale,
                                                      nvfp4_scale)
            for r in range(world):
                out, summed = got[r][call]
                assert torch.equal(_words(summed), _words(want_sum)), (call, kernel, r)
                assert torch.equal(_words(out), _words(want_out)), (call, kernel, r)
    finally:
        for m in memories:
            m.close()
            m.unlink()
