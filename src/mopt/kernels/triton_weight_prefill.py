"""Multi-token GEMMs of the weight-decoding family (``triton_weight_only``), two ways:

* **Expand, then cuBLAS** for formats whose decoded values (codes times their block or E8M0 scale) are
  exact in BF16: INT8, NVFP4, MXFP4, MXFP8. One pass writes the weight's values (BF16 for BF16
  activations, float32 otherwise) into a scratch copy; cuBLAS multiplies with float32 accumulation; a
  one-pass epilogue applies the row scale, the activation scale and the bias to the float32 result
  (with none of them, cuBLAS writes the output dtype itself, rounded once). The expansion reads the
  stored weight once and writes it once, small against a GEMM of many tokens.
* **A Triton MMA kernel** for any format: up to a few hundred tokens (where expanding would cost more
  than the GEMM), and at every M for group-scaled formats (FP8 128x128 blocks, INT4 groups), whose
  values times their scale are not exact in BF16. Weights decode in registers to exact BF16 values
  (group-scaled formats: codes, one scale group per K tile, its partial product scaled before
  accumulating). The weight tile is the MMA's left operand (``acc[N, M] = W . X^T``), so the decoded
  weights feed the tensor cores from registers and only the activations go through shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_allreduce_norm import PeerRows, check_push, push_arguments, push_rows
from mopt.kernels.triton_gemm import _mm_float32, _num_sms
from mopt.kernels.triton_weight_decode import (
    GROUP_SCALED, _INT8, _MXFP4, _NVFP4, e2m1_pair, group_bytes, group_scales, mma_tile_product, scale_columns,
    scale_group,
)


@triton.jit
def _wo_expand_kernel(b_ptr, s_ptr, out_ptr, N, K, num_groups, FORMAT: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """Values ``[N, K]`` (codes times their exact group scale) of a stored weight; ``GROUPS`` groups per
    program along K."""
    FOUR: tl.constexpr = FORMAT == _NVFP4 or FORMAT == _MXFP4
    GB: tl.constexpr = GROUP // 2 if FOUR else GROUP
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    offs_e = tl.arange(0, GB)
    at = groups[:, None] * GB + offs_e[None, :]
    if FORMAT != _INT8:  # INT8 has no group scale
        s = group_scales(s_ptr, rows[:, None], groups[None, :], n_ok[:, None] & (groups < num_groups)[None, :],
                         num_groups, FORMAT)[:, :, None]
    if FOUR:
        ok = n_ok[:, None, None] & (at < K // 2)[None, :, :]
        packed = tl.load(b_ptr + rows[:, None, None] * (K // 2) + at[None, :, :], mask=ok, other=0)
        even, odd = e2m1_pair(packed)
        values = tl.join(even * s, odd * s)  # [BN, G, GB, 2]: element 2i, 2i+1
        ptrs = out_ptr + rows[:, None, None, None] * K + 2 * at[None, :, :, None] + tl.arange(0, 2)[None, None, None, :]
        tl.store(ptrs, values.to(out_ptr.dtype.element_ty), mask=ok[:, :, :, None])
    else:
        ok = n_ok[:, None, None] & (at < K)[None, :, :]
        if FORMAT == _INT8:
            values = tl.load(b_ptr + rows[:, None, None] * K + at[None, :, :], mask=ok, other=0).to(tl.float32)
        else:  # MXFP8's E4M3 codes
            values = tl.load(b_ptr + rows[:, None, None] * K + at[None, :, :], mask=ok, other=0.0).to(tl.float32)
            values = values * s
        tl.store(out_ptr + rows[:, None, None] * K + at[None, :, :], values.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _epilogue_kernel(y_ptr, r_ptr, x_scale_ptr, bias_ptr, c_ptr, M, N, HAS_ROW_SCALE: tl.constexpr,
                     HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    at = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptr + at, mask=mask, other=0.0)
    if HAS_ROW_SCALE:
        y = y * tl.load(r_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_X_SCALE:
        y = y * tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + at, y.to(c_ptr.dtype.element_ty), mask=mask)


def expand_weight(fmt: int, weight: torch.Tensor, scale: torch.Tensor | None, n: int, k: int, fp4_group: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The exact values ``[N, K]`` of a stored INT8 / NVFP4 / MXFP4 / MXFP8 weight, in ``dtype``."""
    if fmt in GROUP_SCALED:
        raise ValueError(f"weight FORMAT {fmt} is group-scaled: its values are not exact in BF16 (use group_mma)")
    g = scale_group(fmt, 0, fp4_group)
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    groups = max(1, 512 // group_bytes(fmt, g))
    num_groups = scale_columns(fmt, scale)
    _wo_expand_kernel[(triton.cdiv(n, 16), triton.cdiv(triton.cdiv(k, g), groups))](
        weight, scale if scale is not None else weight, out, n, k, num_groups, FORMAT=fmt, GROUP=g, BLOCK_N=16,
        GROUPS=groups, num_warps=4)
    return out


def expanded_gemm(x: torch.Tensor, fmt: int, weight: torch.Tensor, scale: torch.Tensor | None,
                  row_scale: torch.Tensor | None, bias: torch.Tensor | None, n: int, k: int, fp4_group: int,
                  x_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``x [M, K]`` times an expanded copy of the weight (see the module docstring)."""
    m = x.shape[0]
    values_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    w = expand_weight(fmt, weight, scale, n, k, fp4_group, values_dtype)
    if x.dtype != w.dtype:
        x = x.float()
    if row_scale is None and x_scale is None and x.is_cuda and x.dtype == out_dtype:
        return torch.mm(x, w.t()) if bias is None else torch.addmm(bias.to(out_dtype), x, w.t())
    y = _mm_float32(x, w.t())
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    _epilogue_kernel[(triton.cdiv(m, 32), triton.cdiv(n, 128))](
        y, row_scale if row_scale is not None else y, x_scale if x_scale is not None else y,
        bias if bias is not None else y, out, m, n, HAS_ROW_SCALE=row_scale is not None,
        HAS_X_SCALE=x_scale is not None, HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return out


@triton.jit
def _wo_mma_kernel(a_ptr, b_ptr, s_ptr, r_ptr, x_scale_ptr, c_ptr, bias_ptr, ws_ptr, locks_ptr, bases_ptr, slots_ptr,
                   M, N, K, stride_am, stride_b, stride_cm, num_groups, FORMAT: tl.constexpr, GROUP: tl.constexpr,
                   HAS_ROW_SCALE: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PUSH: tl.constexpr, RANK: tl.constexpr,
                   WORLD: tl.constexpr, ROW_ELEMS: tl.constexpr):
    """``c[M, N]`` for any weight format. Group-scaled formats (FP8_BLOCK, INT4) take one scale group per K
    tile (``BLOCK_K == GROUP``) and scale its partial product; the others fold their exact group scale
    into the decoded values and chain the MMAs. Programs walk M within bands of ``GROUP_M`` tiles so that
    neighbours share weight tiles in L2.

    ``SPLIT_K > 1``: program ``(tile, s)`` stores its float32 partial sums in ``ws[s]`` (``[SPLIT_K, M, N]``)
    and counts itself in ``locks[tile]``; the last of a tile's programs to arrive adds the partials in
    split order (the same bits whichever arrives last), finishes the tile (scales, bias, output dtype) and
    sets its lock back to 0 for the next call. No zero-filled buffer, no atomics on the data, no cast after.
    ``PUSH``: each finished tile also goes to the peers' fused all-reduce buffers (``push_rows``)."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    band = GROUP_M * grid_n
    first_m = (pid // band) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % size_m
    pid_n = (pid % band) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    rows = offs_n.to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, k_tiles)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(first, last):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x_t = tl.load(a_ptr + offs_m[None, :].to(tl.int64) * stride_am + offs_k[:, None],
                      mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        acc = mma_tile_product(acc, x_t, b_ptr, s_ptr, rows, n_ok, t, K, stride_b, num_groups, FORMAT, GROUP, BLOCK_N,
                               BLOCK_K, DOT_F32)
    mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        _wo_mma_finish(acc, r_ptr, x_scale_ptr, bias_ptr, c_ptr, offs_m, offs_n, m_ok, n_ok, mask, stride_cm,
                       bases_ptr, slots_ptr, HAS_ROW_SCALE, HAS_X_SCALE, HAS_BIAS, PUSH, RANK, WORLD, ROW_ELEMS)
    else:
        part_at = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * M * N + part_at, acc, mask=mask)
        tl.debug_barrier()  # every thread's partials stored before the count releases them
        arrived = tl.atomic_add(locks_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tl.debug_barrier()
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(SPLIT_K):  # split order, not arrival order
                total += tl.load(ws_ptr + s * M.to(tl.int64) * N + part_at, mask=mask, other=0.0, cache_modifier=".cg")
            _wo_mma_finish(total, r_ptr, x_scale_ptr, bias_ptr, c_ptr, offs_m, offs_n, m_ok, n_ok, mask, stride_cm,
                           bases_ptr, slots_ptr, HAS_ROW_SCALE, HAS_X_SCALE, HAS_BIAS, PUSH, RANK, WORLD, ROW_ELEMS)
            tl.store(locks_ptr + pid, 0)


@triton.jit
def _wo_mma_finish(acc, r_ptr, x_scale_ptr, bias_ptr, c_ptr, offs_m, offs_n, m_ok, n_ok, mask, stride_cm, bases_ptr,
                   slots_ptr, HAS_ROW_SCALE: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   PUSH: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, ROW_ELEMS: tl.constexpr):
    """The epilogue of a ``[BLOCK_N, BLOCK_M]`` tile of sums: row scale, activation scale, bias, output dtype;
    with ``PUSH`` the tile as written also goes to the peers."""
    if HAS_ROW_SCALE:
        acc = acc * tl.load(r_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    if HAS_X_SCALE:
        acc = acc * tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    ptrs = c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    values = acc.to(c_ptr.dtype.element_ty)
    tl.store(ptrs, values, mask=mask)
    if PUSH:
        push_rows(tl.trans(values), offs_m, offs_n, tl.trans(mask), bases_ptr, slots_ptr, RANK, WORLD, ROW_ELEMS)


MMA_SMALL_M = 256


@dataclass(frozen=True)
class MmaTiles:
    block_m: int
    block_n: int
    block_k: int  # the scale group for group-scaled formats
    num_warps: int
    num_stages: int


def mma_tiles(fmt: int, m: int, group: int, dtype: torch.dtype) -> MmaTiles:
    """By M bucket, from sweeps on an H200 (``bench/sweep_weight_only.py``, 2026-11-26, Llama-3-8B shapes):
    64 weight rows and 4 warps per program up to a few hundred tokens (best at M=16 and within 2% at
    M=128 for INT4, NVFP4, INT8 and FP8 blocks), 128x128 tiles and 8 warps for prefill (M=4096). Float32
    activations take smaller tiles (twice the bytes)."""
    block_k = group if fmt in GROUP_SCALED else 128
    if dtype == torch.float32:
        return MmaTiles(min(32, max(16, triton.next_power_of_2(m))), 64, block_k, 4, 2)
    if m <= MMA_SMALL_M:
        return MmaTiles(min(128, max(16, triton.next_power_of_2(m))), 64, block_k, 4, 3)
    return MmaTiles(128, 128, block_k, 8, 3)


def wo_mma(x: torch.Tensor, fmt: int, weight: torch.Tensor, scale: torch.Tensor | None,
           row_scale: torch.Tensor | None, bias: torch.Tensor | None, n: int, k: int, group: int, fp4_group: int,
           x_scale: torch.Tensor | None, out_dtype: torch.dtype, interpreted: bool,
           tiles: MmaTiles | None = None, push: PeerRows | None = None) -> torch.Tensor:
    """``x [M, K]`` times any stored weight on the tensor cores; K is split across programs when too few
    output tiles would stream the weights. ``push``: also send the output rows to the peers' fused all-reduce
    (``triton_allreduce_norm.push_rows``) as each tile is finished."""
    m = x.shape[0]
    t = tiles or mma_tiles(fmt, m, group, x.dtype)
    g = scale_group(fmt, group, fp4_group)
    if fmt in GROUP_SCALED and t.block_k != g:
        raise ValueError(f"group-scaled weights need BLOCK_K == their group ({g}), got {t.block_k}")
    programs = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
    split = split_k(programs, triton.cdiv(k, t.block_k), x.device, t.block_m)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    dummy = weight
    if split > 1:
        workspace, locks = torch.empty((split, m, n), dtype=torch.float32, device=x.device), split_k_locks(x.device)
    else:
        workspace = locks = dummy
    num_groups = scale_columns(fmt, scale)
    if push is not None:
        check_push(push, m, n, out_dtype)
    push_pointers, push_constants = push_arguments(push, dummy)
    _wo_mma_kernel[(programs, split)](
        x, weight, scale if scale is not None else dummy, row_scale if row_scale is not None else dummy,
        x_scale if x_scale is not None else dummy, out, bias if bias is not None else dummy, workspace, locks,
        *push_pointers, m, n, k, x.stride(0), weight.stride(0), out.stride(0), num_groups, FORMAT=fmt, GROUP=g,
        HAS_ROW_SCALE=row_scale is not None, HAS_X_SCALE=x_scale is not None, HAS_BIAS=bias is not None,
        SPLIT_K=split, DOT_F32=interpreted or x.dtype == torch.float32, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        BLOCK_K=t.block_k, GROUP_M=8, **push_constants, num_warps=t.num_warps, num_stages=t.num_stages)
    return out


# Split-K model, fitted on an H200 (bench/sweep_wo_split.py, NVFP4 on Llama-3-8B shapes whole and per rank of
# two, weights cold; bench/results/sweep-wo-split-h200-2026-11-27.txt): a program of BLOCK_M tokens shares its
# SM with about 64 / BLOCK_M others (1 at 64 tokens, 4 at 16), so a split costs
# waves * K tiles per program, plus 2% per extra partial to add. Powers of two only: K tiles of Llama-like
# shapes divide evenly (a 5- or 6-way split of 32 tiles leaves one program short and the rest waiting).
# Against the earlier rule (2 x SMs programs, any split): 7% less time summed over the 8 shapes at 16 and at 64
# tokens, and within 11% of each shape's best split.
MAX_SPLIT_K = 8
LOCKS = 1 << 16  # output tiles a split call may have (N / 64 x M / BLOCK_M); more run unsplit
SPLIT_K_COST = 0.02


def split_k(programs: int, k_tiles: int, device: torch.device, block_m: int) -> int:
    """How many programs share each output tile's K (``programs`` output tiles of ``block_m`` tokens, ``k_tiles``
    K tiles each), at least two K tiles each: the split with the fewest waves times K tiles a program."""
    slots = _num_sms(device) * max(1, 64 // block_m)
    best, best_cost, split = 1, float("inf"), 1
    while programs <= LOCKS and split <= min(MAX_SPLIT_K, max(1, k_tiles // 2)):
        cost = triton.cdiv(programs * split, slots) * triton.cdiv(k_tiles, split) * (1 + SPLIT_K_COST * split)
        if cost < best_cost:
            best, best_cost = split, cost
        split *= 2
    return best


_LOCKS: dict[tuple[str, int | None], torch.Tensor] = {}


def split_k_locks(device: torch.device) -> torch.Tensor:
    """The device's split-K arrival counters (int32, one per output tile), zero between calls: each call's
    last program of a tile sets its counter back. Made once per device, before any CUDA graph is captured
    (the eager warm-up's calls make it); the split calls on one device share it, so they must not run
    concurrently on two streams (an engine runs one step at a time)."""
    device = torch.device(device)
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    key = (device.type, index)
    locks = _LOCKS.get(key)
    if locks is None:
        locks = _LOCKS[key] = torch.zeros(LOCKS, dtype=torch.int32, device=device)
    return locks
