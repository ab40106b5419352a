"""Two-shot all-reduce fused with the residual add and RMSNorm, over peer memory (one node's GPUs).

The one-shot kernel (``triton_allreduce_norm``) sends every row to every peer: each rank moves
``(world - 1) x rows x n`` values, which grows with the ranks (at 64 rows over 4 H200s it took 12.7 us a
layer against 5.7 at 2). Here each row has an owner, rank ``row % world``, and moves twice:

1. reduce: every other rank sends the owner its partial sums of the row (into the owner's ``rows`` slot,
   as the one-shot kernel would); the owner adds every rank's row in rank order in float32, rounds once,
   adds the residual and normalizes, exactly as the one-shot kernel does, so the bits are the same;
2. gather: the owner sends the sum (the new residual) and the normalized row, as written (BF16, E4M3
   codes or NVFP4 block values), into every peer's ``gathered`` slot, and each peer copies them out.

Each rank then sends ``(world - 1) / world`` of its rows once and receives its own rows' results, so
the bytes on the wire stop growing with the ranks. The price is a second wait: a non-owner waits for
the owner, who waits for everyone.

The slots are the one-shot kernel's (same buffer, same row counters, module docstring there): in its
e-th call (per row) a program uses slot ``e % 3``. Every program frees ``rows`` slot ``(e - 1) % 3`` of every
source, as the one-shot kernel does (either kernel may have filled it in call e - 1), and a non-owner frees
its ``gathered`` slot right after copying it (only call e + 3 writes it again, which the owner reaches only
after this rank's call e + 3 sent its partial sums). The argument for ``rows`` is the one-shot kernel's:
an owner's call e + 2 cannot have sent a row before every rank's call e + 1 ended. Sign of zero: values
travel with negative zeros made positive (the sentinel), as there; in an E4M3 output that is a -0.0 code
after a 0x00 code.

The kernel takes rows whose partial sums are in ``x`` (no producer push). ``MOPT_TP_TWO_SHOT_ROWS``
(``engine.one_shot``) sets from how many rows it replaces the one-shot kernel; off unless set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_allreduce_norm import (
    _MAX_ROWS, _SENTINEL, _SLOTS, _SPLIT_MAX, MAX_ROWS, ROW_BYTES, PeerRows, _row_bits, gather_offset, supports_rows,
    wire_bits,
)
from mopt.kernels.triton_glue import _store_out, _warps, marked, output_format
from mopt.kernels.triton_pdl import launch_options, pdl_prologue


@triton.jit
def _gathered_bits(base_ptr, slot, row, GATHER_AT: tl.constexpr, GATHER_ELEMS: tl.constexpr):
    """Pointer (int16) to row ``row``'s ``gathered`` slot ``slot`` in the buffer at ``base_ptr``."""
    return (base_ptr + GATHER_AT).to(tl.pointer_type(tl.int16)) + (slot * _MAX_ROWS + row) * GATHER_ELEMS


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
    """Program ``row`` on every rank; rank ``row % WORLD`` reduces and normalizes it, the others send and copy."""
    pdl_prologue(PDL)
    GATHER_ELEMS: tl.constexpr = 2 * ROW_ELEMS
    OUT_BYTES: tl.constexpr = 1 if FP8_OUT else 2
    row = tl.program_id(0)
    owner = row % WORLD
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    out_words = n * OUT_BYTES // 2
    out_mask = cols < out_words
    dtype = x_ptr.dtype.element_ty
    slot = tl.load(slots_ptr + row * _SPLIT_MAX)
    me = tl.load(bases_ptr + RANK)
    bits = wire_bits(tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0))
    out_row = out_ptr + row.to(tl.int64) * n
    res_row = res_out_ptr + row.to(tl.int64) * n
    if owner == RANK:
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row.to(tl.int64) * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(WORLD):
            if s == RANK:
                acc += bits.to(dtype, bitcast=True).to(tl.float32)
            else:
                got = _wait_bits(_row_bits(me, slot, s, row, WORLD, ROW_ELEMS), cols, mask)
                acc += got.to(dtype, bitcast=True).to(tl.float32)
        if HAS_RESIDUAL:
            s_row = (acc.to(dtype).to(tl.float32) + r).to(dtype)
        else:
            s_row = acc.to(dtype)
        xs = s_row.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xs * xs, axis=0) / n + eps)
        tl.store(res_row + cols, s_row, mask=mask)
        _store_out(out_row + cols, (w * (xs * rstd)).to(dtype), scale_ptr, mask, FP8_OUT, NVFP4_OUT)
        tl.debug_barrier()  # the row as stored, read back as words to send
        out_bits = tl.load(out_row.to(tl.pointer_type(tl.int16)) + cols, mask=out_mask, other=0)
        sum_bits = wire_bits(s_row)
        out_bits = tl.where(out_bits == _SENTINEL, 0, out_bits)
        for p in tl.static_range(WORLD):
            if p != RANK:
                dst = _gathered_bits(tl.load(bases_ptr + p), slot, row, GATHER_AT, GATHER_ELEMS)
                tl.store(dst + cols, sum_bits, mask=mask)
                tl.store(dst + ROW_ELEMS + cols, out_bits, mask=out_mask)
    else:
        dst = _row_bits(tl.load(bases_ptr + owner), slot, RANK, row, WORLD, ROW_ELEMS)
        tl.store(dst + cols, bits, mask=mask)
        mine = _gathered_bits(me, slot, row, GATHER_AT, GATHER_ELEMS)
        sum_bits = _wait_bits(mine, cols, mask)
        out_bits = _wait_bits(mine + ROW_ELEMS, cols, out_mask)
        tl.store(res_row + cols, sum_bits.to(dtype, bitcast=True), mask=mask)
        tl.store(out_row.to(tl.pointer_type(tl.int16)) + cols, out_bits, mask=out_mask)
        tl.store(mine + cols, tl.full((BLOCK,), _SENTINEL, tl.int16), mask=mask)
        tl.store(mine + ROW_ELEMS + cols, tl.full((BLOCK,), _SENTINEL, tl.int16), mask=out_mask)
    free = (slot + _SLOTS - 1) % _SLOTS
    for s in tl.static_range(WORLD):
        if s != RANK:
            tl.store(_row_bits(me, free, s, row, WORLD, ROW_ELEMS) + cols, tl.full((BLOCK,), _SENTINEL, tl.int16),
                     mask=mask)
    for j in tl.static_range(_SPLIT_MAX):  # every copy of the row's counter (the one-shot kernel's layout)
        tl.store(slots_ptr + row * _SPLIT_MAX + j, (slot + 1) % _SLOTS)


def supports(x: torch.Tensor, world: int) -> tuple[bool, str]:
    """Whether the kernel takes ``x [..., n]`` (the partial sums) over ``world`` ranks, and why not."""
    n = x.shape[-1]
    ok, why = supports_rows(x.numel() // max(n, 1), n, x.dtype, world)
    if ok and world < 2:
        return False, "one rank: nothing to reduce"
    return ok, why


def two_shot_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      fp8_scale: torch.Tensor | None, peers: PeerRows,
                      nvfp4_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``triton_allreduce_norm.all_reduce_rms_norm`` returns for the same arguments (without a producer
    push), the same bits but the sign of a zero, summed in two shots. Every rank must make the same calls in
    the same order with the same shapes."""
    ok, why = supports(x, peers.world)
    if not ok:
        raise ValueError(f"two_shot_rms_norm: {why}")
    n = x.shape[-1]
    out_dtype, scale = output_format(n, x.dtype, fp8_scale, nvfp4_scale, "two_shot_rms_norm")
    x2 = x.reshape(-1, n)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    if residual is None:
        r2 = x2  # never read
    else:
        r2 = residual.reshape(-1, n)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    res_out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    _two_shot_rms_norm_kernel[(m,)](
        x2, r2, weight, out, res_out, scale if scale is not None else weight, peers.bases, peers.slots,
        x2.stride(0), r2.stride(0), n, eps, RANK=peers.rank, WORLD=peers.world, ROW_ELEMS=ROW_BYTES // 2,
        GATHER_AT=gather_offset(peers.world), BLOCK=block, HAS_RESIDUAL=residual is not None,
        FP8_OUT=fp8_scale is not None, NVFP4_OUT=nvfp4_scale is not None, num_warps=_warps(block, scale),
        **launch_options(x.device))
    return marked(out.view(x.shape), nvfp4_scale), res_out.view(x.shape)


__all__ = ["MAX_ROWS", "supports", "two_shot_rms_norm"]
