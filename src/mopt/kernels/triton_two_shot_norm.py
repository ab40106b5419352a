"""Two-shot all-reduce fused with the residual add and RMSNorm, over peer memory (one node's GPUs).

The one-shot kernel (``triton_allreduce_norm``) sends every row to every peer: each rank moves
``(world - 1) x rows x n`` values, which grows with the ranks (at 64 rows over 4 H200s it took 12.7 us a
layer against 5.7 at 2). Here each row has an owner, rank ``row % world``, and moves twice:

1. reduce: every other rank sends the owner its partial sums of the row (into the owner's ``rows`` slot,
   as the one-shot kernel would); the owner adds every rank's row in rank order in float32, rounds once
   and adds the residual, exactly as the one-shot kernel does;
2. gather: the owner sends that sum (the new residual) into every peer's ``gathered`` slot, and every rank
   normalizes the sum itself with the same code, so every rank gets the one-shot kernel's bits (the sum is
   never -0.0, a float32 sum from +0.0 is not, so the sentinel's sign change never touches it).

Each rank then sends ``(world - 1) / world`` of its rows once and its own rows' sums to every peer:
``2 (world - 1) / world x rows`` rows in all, against ``(world - 1) x rows`` for the one-shot kernel, so from
4 ranks on it moves half the bytes or less (at 2 ranks the same, in two waits instead of one). The price
is the second wait: a non-owner waits for the owner, who waits for everyone.

The slots are the one-shot kernel's (same buffer, same row counters, module docstring there): in its
e-th call (per row) a program uses slot ``e % 3``. Every program frees ``rows`` slot ``(e - 1) % 3`` of every
source, as the one-shot kernel does (either kernel may have filled it in call e - 1), and a non-owner frees
its ``gathered`` slot right after copying it (only call e + 3 writes it again, which the owner reaches only
after this rank's call e + 3 sent its partial sums). The argument for ``rows`` is the one-shot kernel's:
an owner's call e + 2 cannot have sent a row before every rank's call e + 1 ended.

The kernel takes rows whose partial sums are in ``x`` (no producer push). ``MOPT_TP_TWO_SHOT_ROWS``
(``engine.one_shot``) sets from how many rows it replaces the one-shot kernel; off unless set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_allreduce_norm import (
    _MAX_ROWS, _SENTINEL, _SLOTS, _SPLIT_MAX, MAX_ROWS, ROW_BYTES, PeerRows, _row_bits, gather_offset, norm_call,
    wire_bits,
)
from mopt.kernels.triton_glue import _store_out, _warps, marked
from mopt.kernels.triton_pdl import launch_options, pdl_prologue


@triton.jit
def _gathered_bits(base_ptr, slot, row, GATHER_AT: tl.constexpr, ROW_ELEMS: tl.constexpr):
    """Pointer (int16) to row ``row``'s ``gathered`` slot ``slot`` in the buffer at ``base_ptr``."""
    return (base_ptr + GATHER_AT).to(tl.pointer_type(tl.int16)) + (slot * _MAX_ROWS + row) * ROW_ELEMS


@triton.jit
def _wait_bits(ptr, cols, mask):
    """The int16 words at ``ptr + cols`` once none of them is the sentinel."""
    got = tl.load(ptr + cols, mask=mask, other=0, volatile=True)
    while tl.sum((got == _SENTINEL).to(tl.int32), axis=0) > 0:
        got = tl.load(ptr + cols, mask=mask, other=0, volatile=True)
    return got


@triton.jit
def _two_shot_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, bases_ptr, slots_ptr,
                              stride_x, stride_r, n, eps, RANK: tl.constexpr, WORLD: tl.constexpr,
                              ROW_ELEMS: tl.constexpr, GATHER_AT: tl.constexpr, BLOCK: tl.constexpr,
                              HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr, NVFP4_OUT: tl.constexpr,
                              PDL: tl.constexpr):
    """Program ``row`` on every rank; rank ``row % WORLD`` sums it and sends the sum, the others send their
    partial sums to it and take the sum back; every rank normalizes the sum itself (the same code, the same
    bits)."""
    pdl_prologue(PDL)
    row = tl.program_id(0)
    owner = row % WORLD
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = x_ptr.dtype.element_ty
    slot = tl.load(slots_ptr + row * _SPLIT_MAX)
    me = tl.load(bases_ptr + RANK)
    bits = wire_bits(tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if owner == RANK:
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row.to(tl.int64) * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(WORLD):
            if s == RANK:
                acc += bits.to(dtype, bitcast=True).to(tl.float32)
            else:
                src = tl.multiple_of(_row_bits(me, slot, s, row, WORLD, ROW_ELEMS), 16)
                acc += _wait_bits(src, cols, mask).to(dtype, bitcast=True).to(tl.float32)
        if HAS_RESIDUAL:
            s_row = (acc.to(dtype).to(tl.float32) + r).to(dtype)
        else:
            s_row = acc.to(dtype)
        sent = wire_bits(s_row)  # the sum is never -0.0 (a float32 sum from +0.0 is not), so this changes nothing
        for p in tl.static_range(WORLD):
            if p != RANK:
                dst = tl.multiple_of(_gathered_bits(tl.load(bases_ptr + p), slot, row, GATHER_AT, ROW_ELEMS), 16)
                tl.store(dst + cols, sent, mask=mask)
    else:
        dst = tl.multiple_of(_row_bits(tl.load(bases_ptr + owner), slot, RANK, row, WORLD, ROW_ELEMS), 16)
        tl.store(dst + cols, bits, mask=mask)
        mine = tl.multiple_of(_gathered_bits(me, slot, row, GATHER_AT, ROW_ELEMS), 16)
        s_row = _wait_bits(mine, cols, mask).to(dtype, bitcast=True)
        tl.store(mine + cols, tl.full((BLOCK,), _SENTINEL, tl.int16), mask=mask)
    xs = s_row.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xs * xs, axis=0) / n + eps)
    tl.store(res_out_ptr + row.to(tl.int64) * n + cols, s_row, mask=mask)
    _store_out(out_ptr + row.to(tl.int64) * n + cols, (w * (xs * rstd)).to(dtype), scale_ptr, mask, FP8_OUT,
               NVFP4_OUT)
    free = (slot + _SLOTS - 1) % _SLOTS
    for s in tl.static_range(WORLD):
        if s != RANK:
            dst = tl.multiple_of(_row_bits(me, free, s, row, WORLD, ROW_ELEMS), 16)
            tl.store(dst + cols, tl.full((BLOCK,), _SENTINEL, tl.int16), mask=mask)
    for j in tl.static_range(_SPLIT_MAX):  # every copy of the row's counter (the one-shot kernel's layout)
        tl.store(slots_ptr + row * _SPLIT_MAX + j, (slot + 1) % _SLOTS)


def two_shot_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      fp8_scale: torch.Tensor | None, peers: PeerRows,
                      nvfp4_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``triton_allreduce_norm.all_reduce_rms_norm`` returns for the same arguments (without a producer
    push), bit for bit, summed in two shots. Every rank must make the same calls in the same order with the
    same shapes."""
    if peers.world < 2:
        raise ValueError("two_shot_rms_norm: one rank: nothing to reduce")
    c = norm_call(x, residual, fp8_scale, nvfp4_scale, peers.world, "two_shot_rms_norm")
    _two_shot_rms_norm_kernel[(c.x2.shape[0],)](
        c.x2, c.r2, weight, c.out, c.res_out, c.scale if c.scale is not None else weight, peers.bases, peers.slots,
        c.x2.stride(0), c.r2.stride(0), c.n, eps, RANK=peers.rank, WORLD=peers.world, ROW_ELEMS=ROW_BYTES // 2,
        GATHER_AT=gather_offset(peers.world), BLOCK=c.block, HAS_RESIDUAL=residual is not None,
        FP8_OUT=fp8_scale is not None, NVFP4_OUT=nvfp4_scale is not None, num_warps=_warps(c.block, c.scale),
        **launch_options(x.device))
    return marked(c.out.view(x.shape), nvfp4_scale), c.res_out.view(x.shape)


__all__ = ["MAX_ROWS", "two_shot_rms_norm"]
