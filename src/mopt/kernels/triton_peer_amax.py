"""Per-token FP8 quantization of a row-parallel layer's input slice under its whole row's scale, the ranks'
amaxes exchanged over peer memory (one node's GPUs) inside the kernel.

A row-parallel layer of a per-token FP8 checkpoint (FP8_PER_CHANNEL_PER_TOKEN) holds a slice of each input row
but must quantize it under the whole row's scale, as one rank would (``kernels.linear.per_token_fp8``). Through
NCCL that takes an amax reduction, a MAX all-reduce and the quantization's elementwise kernels, about 30 us at 64
rows at TP=2 on H200s, twice a layer (``bench/results/pcpt-tp-h200x4-2026-11-27-profile-tp2.txt``). Here one program a
row takes its slice's amax, sends it into every peer's buffer, waits for the peers' values, takes the largest
and quantizes its slice as ``triton_quant.fp8_per_token`` does: ``scale = amax / 448`` (IEEE division, 1.0 for
an all-zero row), ``e4m3(clamp(x / scale, +-448))``. The same bits as the NCCL path.

What travels is one 16-bit value a row: the amax of 16-bit activations is one of their magnitudes, so exact in
their dtype and never negative, never the sentinel -0.0. The protocol is the fused all-reduce's
(``triton_allreduce_norm``: the data is its own signal, three slots a row) on a region of its own in the same
buffer, with row counters of its own, ``amax[SLOTS][WORLD][MAX_ROWS]`` int16 then ``[MAX_ROWS]`` int32
counters (``triton_allreduce_norm.amax_offset``). In its e-th call (counted per row) a program writes its value
into the peers' slot ``e % 3``, reads its own slot ``e % 3`` and puts the sentinel back into its slot
``(e - 1) % 3``, which no peer writes before its own call e + 2; that call needs this rank's value of call e + 1,
sent after this call has ended. Every rank makes the same calls (the shapes alone decide). The wait has no time
limit; a dead peer is the host's to detect (``TensorParallelModel.wait_step``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_allreduce_norm import (_MAX_ROWS, _SENTINEL, _SLOTS, DTYPES, MAX_ROWS, PeerRows,
                                                amax_counters_offset, amax_offset)
from mopt.kernels.triton_glue import _warps
from mopt.kernels.triton_pdl import launch_options, pdl_prologue
from mopt.kernels.triton_quant import _to_fp8
from mopt.quant.formats import fp8


@triton.jit
def _amax_word(base, slot, source, row, AMAX_AT: tl.constexpr, WORLD: tl.constexpr):
    """Pointer to the amax ``source`` sends for ``row`` in slot ``slot`` of the buffer at ``base`` (int64)."""
    return (base + AMAX_AT).to(tl.pointer_type(tl.int16)) + (slot * WORLD + source) * _MAX_ROWS + row


@triton.jit
def _per_token_fp8_over_peers_kernel(x_ptr, q_ptr, scale_ptr, bases_ptr, stride_x, n, AMAX_AT: tl.constexpr,
                                     COUNTERS_AT: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    me = tl.load(bases_ptr + RANK)
    counter = (me + COUNTERS_AT).to(tl.pointer_type(tl.int32)) + row
    slot = tl.load(counter)
    amax = tl.max(tl.abs(x), axis=0)  # a magnitude of the row: exact in its dtype
    bits = amax.to(dtype).to(tl.int16, bitcast=True)
    for s in tl.static_range(WORLD):
        if s != RANK:
            tl.store(_amax_word(tl.load(bases_ptr + s), slot, RANK, row, AMAX_AT, WORLD), bits)
    for s in tl.static_range(WORLD):
        if s != RANK:
            src = _amax_word(me, slot, s, row, AMAX_AT, WORLD)
            got = tl.load(src, volatile=True)
            while got == _SENTINEL:
                got = tl.load(src, volatile=True)
            amax = tl.maximum(amax, got.to(dtype, bitcast=True).to(tl.float32))
    free = (slot + _SLOTS - 1) % _SLOTS
    for s in tl.static_range(WORLD):
        if s != RANK:
            tl.store(_amax_word(me, free, s, row, AMAX_AT, WORLD), tl.full((), _SENTINEL, tl.int16))
    tl.store(counter, (slot + 1) % _SLOTS)
    scale = tl.math.div_rn(amax, 448.0)  # '/' by a constant becomes '* (1/448)'
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(q_ptr + row.to(tl.int64) * n + cols, _to_fp8(x, scale), mask=mask)
    tl.store(scale_ptr + row, scale)


def supports(x2: torch.Tensor, world: int) -> tuple[bool, str]:
    """Whether the kernel takes the rows ``x2 [M, n]`` over ``world`` ranks, and why not."""
    if x2.dtype not in DTYPES:
        return False, f"activations are {x2.dtype}, the kernel sends {DTYPES} amaxes"
    if not 1 <= x2.shape[0] <= MAX_ROWS:
        return False, f"{x2.shape[0]} rows, the buffer holds 1 to {MAX_ROWS}"
    return True, ""


def per_token_fp8_over_peers(x2: torch.Tensor, peers: PeerRows) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e4m3 codes [M, n], scale [M, 1] float32)`` of this rank's slice ``x2 [M, n]`` under each row's amax over
    every rank's slice. Every rank must make the same calls in the same order with the same row counts."""
    ok, why = supports(x2, peers.world)
    if not ok:
        raise ValueError(f"per_token_fp8_over_peers: {why}")
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m, n = x2.shape
    q = torch.empty((m, n), dtype=fp8.FP8_DTYPE, device=x2.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    block = triton.next_power_of_2(n)
    _per_token_fp8_over_peers_kernel[(m,)](
        x2, q, scale, peers.bases, x2.stride(0), n, AMAX_AT=amax_offset(peers.world),
        COUNTERS_AT=amax_counters_offset(peers.world), RANK=peers.rank, WORLD=peers.world, BLOCK=block,
        num_warps=_warps(block, q), **launch_options(x2.device))
    return q, scale
