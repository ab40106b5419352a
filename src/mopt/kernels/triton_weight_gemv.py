"""One-token GEMV of the weight-decoding family: ``y[N] = x[K] . W[N, K]`` for any weight format of
``triton_weight_decode``, reading the stored weights once.

Each program owns ``BLOCK_N`` rows and walks K in tiles of ``GROUPS`` scale groups, so a tile is
``[BLOCK_N, GROUPS, group bytes]``: the group scale broadcasts over the last axis without reshapes, and
4-bit bytes decode into their (even, odd) elements against even and odd activations. Products of exact
values accumulate in a float32 tile per thread; the reduction across K happens once, after the loop. No
split K: N / BLOCK_N programs keep enough bytes in flight, and the output is written once, in its dtype.
A group's partial product is scaled per element (``(w * x) * s``): the reference scales the group's sum,
so results agree up to float32 rounding order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_weight_decode import (
    FOUR_BIT, INT4, _INT4, _INT8, _MXFP4, _NVFP4, e2m1_pair, group_bytes, group_scales, int4_pair, scale_columns,
    scale_group,
)


@dataclass(frozen=True)
class GemvTiles:
    block_n: int
    row_bytes: int  # weight bytes per row per K tile
    num_warps: int
    num_stages: int
    sum_groups: bool = False


def gemv_tiles(fmt: int, n: int) -> GemvTiles:
    """From a sweep on an H100 (``bench/sweep_weight_only.py``, 2026-11-26; Llama-3-8B shapes 4096x4096 and
    28672x4096): 8-bit weights 4 rows of 1024 bytes (1.8-2.0x BF16 cuBLAS), E2M1 weights 8 rows of 512
    (1.5-1.6x), INT4 16 rows, of 256 bytes for large N (2.1x) and 512 with 8 warps for small (1.7x).
    Pipeline stages made no difference."""
    if fmt == INT4:
        return GemvTiles(16, 256, 4, 2, True) if n >= 8192 else GemvTiles(16, 512, 8, 2, False)
    if fmt in FOUR_BIT:
        return GemvTiles(8, 512, 4, 2, True)
    return GemvTiles(4, 1024, 4, 2, True)


@triton.jit
def _wo_gemv_kernel(a_ptr, b_ptr, s_ptr, r_ptr, x_scale_ptr, c_ptr, bias_ptr, N, K, stride_b, num_groups,
                    FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                    HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUPS: tl.constexpr, SUM_GROUPS: tl.constexpr):
    """``EVEN_K``: K is a multiple of the K tile, so loads need no K mask (which would stop the compiler
    from vectorizing them); ``stride_b``: a weight row's stride, passed so its alignment is known;
    ``SUM_GROUPS``: sum each group inside the loop (a ``[BLOCK_N, GROUPS]`` accumulator, fewer registers)
    instead of once after it."""
    FOUR: tl.constexpr = FORMAT == _INT4 or FORMAT == _NVFP4 or FORMAT == _MXFP4
    GB: tl.constexpr = GROUP // 2 if FOUR else GROUP  # stored bytes per group
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_g = tl.arange(0, GROUPS)
    offs_e = tl.arange(0, GB)
    row_ok = tl.broadcast_to(n_ok[:, None, None], (BLOCK_N, GROUPS, GB))
    if SUM_GROUPS:
        acc2 = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, GROUPS, GB), dtype=tl.float32)
    for g0 in range(0, tl.cdiv(K, GROUP), GROUPS):
        groups = g0 + offs_g
        at = groups[:, None] * GB + offs_e[None, :]  # byte offsets in a row [G, GB]
        ok = tl.broadcast_to(at < (K // 2 if FOUR else K), (GROUPS, GB))
        w_ok = row_ok if EVEN_K else row_ok & ok[None, :, :]
        w_ptrs = b_ptr + rows[:, None, None] * stride_b + at[None, :, :]
        if FOUR:
            packed = tl.load(w_ptrs, mask=w_ok, other=0)
            # one contiguous load of the (even, odd) activation pairs, split in registers
            pair = 2 * at[:, :, None] + tl.arange(0, 2)[None, None, :]
            if EVEN_K:
                x = tl.load(a_ptr + pair)
            else:
                x = tl.load(a_ptr + pair, mask=ok[:, :, None], other=0.0)
            xe, xo = tl.split(x.to(tl.float32))
            if FORMAT == _INT4:
                we, wo = int4_pair(packed)
            else:
                we, wo = e2m1_pair(packed)
            part = we * xe[None, :, :] + wo * xo[None, :, :]
        else:
            if FORMAT == _INT8:
                w = tl.load(w_ptrs, mask=w_ok, other=0)
            else:  # E4M3 codes
                w = tl.load(w_ptrs, mask=w_ok, other=0.0)
            if EVEN_K:
                x = tl.load(a_ptr + at)
            else:
                x = tl.load(a_ptr + at, mask=ok, other=0.0)
            part = w.to(tl.float32) * x.to(tl.float32)[None, :, :]
        if FORMAT == _INT8:
            if SUM_GROUPS:
                acc2 += tl.sum(part, axis=2)
            else:
                acc += part
        else:
            s = group_scales(s_ptr, rows[:, None], groups[None, :], n_ok[:, None] & (groups < num_groups)[None, :],
                             num_groups, FORMAT)
            if SUM_GROUPS:
                acc2 += tl.sum(part, axis=2) * s
            else:
                acc += part * s[:, :, None]
    if SUM_GROUPS:
        out = tl.sum(acc2, axis=1)
    else:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_ROW_SCALE:
        out = out * tl.load(r_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_X_SCALE:
        out = out * tl.load(x_scale_ptr)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs_n, out.to(c_ptr.dtype.element_ty), mask=n_ok)


def weight_gemv(x: torch.Tensor, fmt: int, weight: torch.Tensor, scale: torch.Tensor | None,
                row_scale: torch.Tensor | None, bias: torch.Tensor | None, n: int, k: int, group: int,
                fp4_group: int, x_scale: torch.Tensor | None, out_dtype: torch.dtype,
                tiles: GemvTiles | None = None) -> torch.Tensor:
    """``x [1, K]`` (contiguous) times the stored weight -> ``[1, N]`` in ``out_dtype``; arguments as
    ``triton_weight_only.weight_only_gemm``."""
    t = tiles or gemv_tiles(fmt, n)
    g = scale_group(fmt, group, fp4_group)
    groups = max(1, t.row_bytes // group_bytes(fmt, g))
    out = torch.empty((1, n), dtype=out_dtype, device=x.device)
    even_k = k % (groups * g) == 0
    num_groups = scale_columns(fmt, scale)
    _wo_gemv_kernel[(triton.cdiv(n, t.block_n),)](
        x, weight, scale if scale is not None else weight, row_scale if row_scale is not None else weight,
        x_scale if x_scale is not None else weight, out, bias if bias is not None else weight, n, k, weight.stride(0),
        num_groups, FORMAT=fmt, GROUP=g, HAS_ROW_SCALE=row_scale is not None, HAS_X_SCALE=x_scale is not None,
        HAS_BIAS=bias is not None, EVEN_K=even_k, BLOCK_N=t.block_n, GROUPS=groups, SUM_GROUPS=t.sum_groups,
        num_warps=t.num_warps, num_stages=t.num_stages)
    return out
