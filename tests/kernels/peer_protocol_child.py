"""One rank of ``test_peer_protocol_processes``: a process running the fused all-reduce kernels through the
interpreter over buffers in POSIX shared memory that every rank maps, with real waits on its peers."""

from __future__ import annotations

import os
import random
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mopt.kernels import triton_allreduce_norm as tan  # noqa: E402
from mopt.kernels import triton_peer_amax as peer_amax  # noqa: E402
from mopt.kernels import triton_two_shot_norm as two  # noqa: E402

DTYPE = torch.float16  # see peer_buffers
N = 64
# (kernel, rows, output): "two" two-shot, "one" one-shot, "push" a producer's push then the one-shot kernel
# that takes it (PUSHED); one-row one-shot calls split the row over 4 programs; "amax" the per-token FP8
# quantization under the ranks' largest amax (triton_peer_amax: its own region and counters, between the others)
CALLS = [("two", 5, "dtype"), ("one", 1, "fp8"), ("amax", 3, "fp8"), ("two", 6, "fp8"), ("push", 2, "dtype"),
         ("amax", 1, "fp8"), ("amax", 4, "fp8"), ("two", 4, "nvfp4"), ("one", 3, "dtype"), ("two", 5, "dtype"),
         ("push", 1, "fp8"), ("amax", 3, "fp8"), ("two", 7, "dtype"), ("two", 3, "fp8"), ("one", 1, "dtype"),
         ("two", 2, "dtype"), ("amax", 1, "fp8"), ("push", 6, "dtype"), ("two", 6, "dtype"), ("amax", 2, "fp8")]


@triton.jit
def _push_kernel(x_ptr, bases_ptr, slots_ptr, n, RANK: tl.constexpr, WORLD: tl.constexpr, ROW_ELEMS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """What a decode GEMV's epilogue does with its output rows (``triton_allreduce_norm.push_rows``)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    values = tl.load(x_ptr + row * n + cols, mask=cols < n, other=0.0)
    tan.push_rows(values[None, :], row + tl.arange(0, 1), cols, (cols < n)[None, :], bases_ptr, slots_ptr, RANK,
                  WORLD, ROW_ELEMS)


def inputs(call: int, rank: int, rows: int):
    """``(partial sums, residual, norm weight)`` of a call: zeros in the first row, negative on odd ranks."""
    g = torch.Generator().manual_seed(call * 100 + rank)
    x = (torch.randn(rows, N, generator=g) * 2).to(DTYPE)
    x[0, :8] = 0.0
    if rank % 2:
        x[0, :4] = -0.0
    shared = torch.Generator().manual_seed(call * 100 + 99)
    residual = torch.randn(rows, N, generator=shared).to(DTYPE)
    weight = 1 + torch.randn(N, generator=shared) * 0.1
    weight[:2] = -1.0
    return x, residual, weight


def scales(output: str):
    return (torch.tensor(0.03) if output == "fp8" else None, torch.tensor(0.02) if output == "nvfp4" else None)


def run_rank(rank: int, world: int, names: list[str], out_path: str, seed: int) -> None:
    from multiprocessing import shared_memory

    memories = [shared_memory.SharedMemory(name=name) for name in names]
    raw = [torch.frombuffer(m.buf, dtype=torch.uint8) for m in memories]
    bases = torch.tensor([r.data_ptr() for r in raw], dtype=torch.int64)
    peers = tan.PeerRows.of(raw[rank], bases, rank, world)
    delays = random.Random(seed * 10 + rank)
    results = []
    for call, (kernel, rows, output) in enumerate(CALLS):
        time.sleep(delays.random() * 0.2)  # ranks arrive in every order
        x, residual, weight = inputs(call, rank, rows)
        fp8_scale, nvfp4_scale = scales(output)
        if kernel == "amax":
            q, scale = peer_amax.per_token_fp8_over_peers(x, peers)
            results.append((q.view(torch.uint8).clone(), scale.clone()))
            continue
        if kernel == "two":
            out, summed = two.two_shot_rms_norm(x, residual, weight, 1e-5, fp8_scale, peers, nvfp4_scale=nvfp4_scale)
        else:
            if kernel == "push":
                _push_kernel[(rows,)](x, bases, peers.slots, N, RANK=rank, WORLD=world, ROW_ELEMS=tan.ROW_BYTES // 2,
                                      BLOCK=N)
                time.sleep(delays.random() * 0.1)
            out, summed = tan.all_reduce_rms_norm(x, residual, weight, 1e-5, fp8_scale, peers, kernel == "push",
                                                  nvfp4_scale=nvfp4_scale)
        results.append((out.contiguous().view(torch.uint8).clone(), summed.clone()))
    torch.save(results, out_path)
    del raw, bases, peers
    for m in memories:
        m.close()
