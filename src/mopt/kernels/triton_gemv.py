"""Decode GEMV: ``y[M, N] = (a[M, K] @ W[N, K]^T) * a_scale * w_scale (+ bias)`` for small M.

Decode reads each weight once and does almost no arithmetic, so the kernel is built to stream
``W`` (row-major; E4M3 codes, or BF16/FP16 for unquantized layers) at memory speed and to write the
output dtype directly: no split-K, hence no zero-filled float32 buffer, no atomics and no cast
afterwards (three launches fewer than the prefill GEMM's split-K path), and a deterministic
summation order. FP8 activations arrive as E4M3 codes (quantized by the norm or activation kernel
before it, or by ``triton_quant``); unquantized layers take the activations as they are, scales 1.

Two inner loops, picked by the tile config:

* ``DOT``: M rows, padded to 16 and a power of two (``BLOCK_M``, up to 64), against ``BLOCK_N`` weight rows
  on the tensor cores;
* FMA (``M == 1``): products summed in float32 on the CUDA cores, ``BLOCK_N x BLOCK_K`` per step.

Both sum exact products in float32 (E4M3 x E4M3 and BF16 x BF16 fit in float32), in another order
than the reference's GEMM, except 64-row E4M3 tiles (WGMMA, E4M3 weights at 17-64 tokens): they sum up to
``PROMOTE_EVERY`` products in Hopper's narrower FP8 accumulator before each promotion into float32, as
cuBLASLt's FP8 GEMM does. Scales: ``a_scale`` scalar or per row ``[M]``; ``w_scale`` scalar or per output
row ``[N]``.

The plain tensor-core loop can also split K over programs (``GemvTiles.split_k``; the last program of each
output tile adds the shares in split order, so the bits do not depend on timing). ``gemv_tiles`` picks it for
narrow E4M3 layers at 17-64 rows (``bench/sweep_fp8_gemv_rows.py`` sweeps it).

``silu_gated_gemv`` runs a fused gate/up projection and the SiLU-gated product after it in one kernel:
each program takes matching gate and up rows, rounds both outputs to the activation dtype and
finishes as ``triton_glue.silu_mul`` does (optionally as the down projection's E4M3 codes), so the
bits equal the two kernels'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mopt.kernels import triton_allreduce_norm
from mopt.kernels.triton_allreduce_norm import push_rows
from mopt.kernels.triton_gemm import scale_tile
from mopt.kernels.triton_glue import TL_DTYPES, _store_out
from mopt.kernels.triton_pdl import launch_options, pdl_launch_dependents, pdl_wait
from mopt.kernels.triton_weight_prefill import LOCKS, split_k_locks
from mopt.quant.formats import fp8


@dataclass(frozen=True)
class GemvTiles:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    dot: bool
    block_m: int = 0  # 0: the rows padded to 16 and a power of two
    split_k: int = 1  # > 1: K split across programs (plain tensor-core GEMV only; see _gemv_kernel)


@triton.jit
def _gemv_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, out_scale_ptr, bases_ptr, slots_ptr, ws_ptr,
                 locks_ptr, M, N, K, stride_am, stride_bn, stride_cm, A_ROWWISE: tl.constexpr, B_ROWWISE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT: tl.constexpr, GATED: tl.constexpr, DTYPE: tl.constexpr, FP8_OUT: tl.constexpr,
                 PUSH: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, ROW_ELEMS: tl.constexpr,
                 SPLIT_K: tl.constexpr, IMPRECISE: tl.constexpr, PDL: tl.constexpr):
    """``GATED``: ``b`` holds ``2N`` rows, gate then up; a program takes ``BLOCK_N`` of each and writes
    ``silu(gate) * up`` as ``triton_glue.silu_mul`` computes it from the GEMV's ``DTYPE`` output.
    ``PUSH``: the output tile also goes to the peers' fused all-reduce buffers (``push_rows``).
    ``SPLIT_K > 1`` (plain ``DOT`` only): program ``(tile, s)`` sums the ``s``-th share of whole K tiles and
    stores it in ``ws[s]`` (``[SPLIT_K, M, N]`` float32), then counts itself in ``locks[tile]``; the last to
    arrive adds the shares in split order (the same bits whichever arrives last), finishes the tile and sets
    its lock back to 0, as ``triton_weight_prefill``'s split MMA does."""
    pdl_launch_dependents(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    b_rows = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn
    up_rows = b_rows + N.to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = 0
    end = K
    if DOT:
        if SPLIT_K > 1:
            per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
            start = tl.program_id(1) * per_split
            end = tl.minimum(start + per_split, K)
        pdl_wait(PDL)
    else:  # one token: the first K tile of weights loads before the activations may be read (triton_pdl)
        b, b_up = _weight_tile(b_rows, up_rows, 0, n_ok, K, BLOCK_K, GATED)
        pdl_wait(PDL)
        acc, acc_up, acc1, acc1_up = _gemv_step(a_ptr, b, b_up, 0, offs_m, m_ok, K, stride_am, acc, acc_up, acc1,
                                                acc1_up, BLOCK_K, DOT, GATED, IMPRECISE)
        start = BLOCK_K
    for k0 in range(start, end, BLOCK_K):
        b, b_up = _weight_tile(b_rows, up_rows, k0, n_ok, K, BLOCK_K, GATED)
        acc, acc_up, acc1, acc1_up = _gemv_step(a_ptr, b, b_up, k0, offs_m, m_ok, K, stride_am, acc, acc_up, acc1,
                                                acc1_up, BLOCK_K, DOT, GATED, IMPRECISE)
    if not DOT:
        acc = acc1[None, :]
        acc_up = acc1_up[None, :]
    if SPLIT_K == 1:
        _epilogue(acc, acc_up, a_scale_ptr, b_scale_ptr, bias_ptr, out_scale_ptr, c_ptr, bases_ptr, slots_ptr, offs_m,
                  offs_n, m_ok, n_ok, N, stride_cm, A_ROWWISE, B_ROWWISE, HAS_BIAS, GATED, DTYPE, FP8_OUT, PUSH, RANK,
                  WORLD, ROW_ELEMS)
    else:
        mask = m_ok[:, None] & n_ok[None, :]
        part_at = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * M * N + part_at, acc, mask=mask)
        tl.debug_barrier()  # every thread's partials stored before the count releases them
        arrived = tl.atomic_add(locks_ptr + tl.program_id(0), 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tl.debug_barrier()
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):  # split order, not arrival order
                total += tl.load(ws_ptr + s * M.to(tl.int64) * N + part_at, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            _epilogue(total, total, a_scale_ptr, b_scale_ptr, bias_ptr, out_scale_ptr, c_ptr, bases_ptr, slots_ptr,
                      offs_m, offs_n, m_ok, n_ok, N, stride_cm, A_ROWWISE, B_ROWWISE, HAS_BIAS, GATED, DTYPE, FP8_OUT,
                      PUSH, RANK, WORLD, ROW_ELEMS)
            tl.store(locks_ptr + tl.program_id(0), 0)


@triton.jit
def _epilogue(acc, acc_up, a_scale_ptr, b_scale_ptr, bias_ptr, out_scale_ptr, c_ptr, bases_ptr, slots_ptr, offs_m,
              offs_n, m_ok, n_ok, N, stride_cm, A_ROWWISE: tl.constexpr, B_ROWWISE: tl.constexpr,
              HAS_BIAS: tl.constexpr, GATED: tl.constexpr, DTYPE: tl.constexpr, FP8_OUT: tl.constexpr,
              PUSH: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, ROW_ELEMS: tl.constexpr):
    """Scales, bias and the output of a tile of sums (``acc``; ``acc_up`` the up rows' when ``GATED``)."""
    out = _finish(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, A_ROWWISE, B_ROWWISE,
                  HAS_BIAS)
    ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if GATED:
        if B_ROWWISE:
            up_scale_ptr = b_scale_ptr + N
        else:
            up_scale_ptr = b_scale_ptr
        up = _finish(acc_up, a_scale_ptr, up_scale_ptr, bias_ptr + N, offs_m, offs_n, m_ok, n_ok, A_ROWWISE,
                     B_ROWWISE, HAS_BIAS)
        gate = out.to(DTYPE).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)
        _store_out(ptrs, (silu * up.to(DTYPE).to(tl.float32)).to(DTYPE), out_scale_ptr, mask, FP8_OUT)
    else:
        values = out.to(c_ptr.dtype.element_ty)
        tl.store(ptrs, values, mask=mask)
        if PUSH:
            push_rows(values, offs_m, offs_n, mask, bases_ptr, slots_ptr, RANK, WORLD, ROW_ELEMS)


@triton.jit
def _weight_tile(b_rows, up_rows, k0, n_ok, K, BLOCK_K: tl.constexpr, GATED: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` weight tile at ``k0`` (and the up rows' when ``GATED``, else ``b`` again)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    b_mask = n_ok[:, None] & (offs_k < K)[None, :]
    b = tl.load(b_rows + offs_k[None, :], mask=b_mask, other=0.0)
    b_up = b
    if GATED:
        b_up = tl.load(up_rows + offs_k[None, :], mask=b_mask, other=0.0)
    return b, b_up


@triton.jit
def _gemv_step(a_ptr, b, b_up, k0, offs_m, m_ok, K, stride_am, acc, acc_up, acc1, acc1_up, BLOCK_K: tl.constexpr,
               DOT: tl.constexpr, GATED: tl.constexpr, IMPRECISE: tl.constexpr):
    """Adds one K tile's products: tensor-core dots into ``acc`` (``DOT``; E4M3 dots promoted into it every
    ``IMPRECISE`` products), else FMA sums into ``acc1``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    if DOT:
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=IMPRECISE)
        if GATED:
            acc_up = tl.dot(a, tl.trans(b_up), acc_up, max_num_imprecise_acc=IMPRECISE)
    else:
        a = tl.load(a_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        acc1 += tl.sum(b.to(tl.float32) * a[None, :], axis=1)
        if GATED:
            acc1_up += tl.sum(b_up.to(tl.float32) * a[None, :], axis=1)
    return acc, acc_up, acc1, acc1_up


@triton.jit
def _finish(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, A_ROWWISE: tl.constexpr,
            B_ROWWISE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The float32 output tile: sums times the scales, plus the bias."""
    out = scale_tile(acc, a_scale_ptr, b_scale_ptr, offs_m, offs_n, m_ok, n_ok, A_ROWWISE, B_ROWWISE)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return out


MAX_M = 64
# Hopper's WGMMA (64-row E4M3 dots) sums FP8 products in a narrower accumulator than float32: ~3e-3 relative
# over K = 4096 when left alone; promoted into the float32 one every 128 products, as cuBLASLt's FP8 GEMM
# does, 1.3e-4 relative to float32 sums at any K, as cuBLASLt's (bench/results/sweep-fp8-gemv-rows-h200-2026-11-27.txt).
# mma.sync (tiles of up to 32 rows) keeps float32 and ignores it.
PROMOTE_EVERY = 128
FP8_WGMMA_PROGRAMS = 192  # the fewest programs an E4M3 64-row launch takes larger tiles for (gemv_tiles)
FP8_SPLIT_MIN_K = 4096  # the shortest K a narrow E4M3 64-row launch splits in two (gemv_tiles)


def gemv_tiles(m: int, n: int, k: int, itemsize: int = 1, gated: bool = False) -> GemvTiles:
    """Tile settings from sweeps on an H100 (``bench/sweep_gemv.py``, Llama-3-8B layers whole and per rank
    of two). M=1 (second sweep, 2026-11-26, rows of up to 4 KiB): 8 rows of 2 KiB a step on 8 warps, for
    FP8 and BF16 alike, was within 3% (FP8) and 1% (BF16) of each shape's best on average; against the
    earlier 1 KiB rows it took the per-rank layers of two 3.2 us (FP8) and 5.7 us (BF16) less per
    Llama-3-8B layer (4096x7168 FP8: 13.3 -> 12.1 us; 6144x4096 FP8, the one shape it loses: 10.3 ->
    11.0). Loading each next tile before summing the current one was slower everywhere. M=16
    (2026-11-26): one config within 3.4% of each shape's best. 16-bit weights at M=32 and 64 (2026-11-26,
    H100): within 3-5% of each shape's best; BF16 at M=64 equal to cuBLAS or up to 9% faster (4096x7168:
    25.2 us, cuBLAS 27.6 with its split-K reduction). 16-bit weights take tiles of the same bytes (half
    the K), except at M <= 32 where twice the rows were best.

    E4M3 weights at 17-64 rows run 64-row WGMMA tiles (an H200 sweep, 2026-11-27,
    ``bench/sweep_fp8_gemv_rows.py``): the best tiles stream ``n`` in about 192-224 programs, 32 rows of
    256 K for the narrow layers, 64 or 128 rows of 128 K for gate/up (28672x4096: 32.7 us against 48.2 for
    64x256 tiles; 4096x4096: 10.8 against 12.7). ``n`` is the output columns a launch spreads over its
    programs (a SiLU-gated launch's half). Narrower layers (fewer than 192 tiles of 64 rows) with K >= 4096
    split K in two over 64x128 tiles (a second H200 sweep, 2026-11-27, ``bench/results/sweep-fp8-gemv-split-
    h200-2026-11-27.txt``): 32x256 tiles fill one program an SM, so 6144x4096's 192 of them ran in two waves
    (20.1 us; split, 96 x 2 programs of two an SM: 12.7), and 4096x7168 took 16.4 us (split: 14.3). Where K is
    2048 splitting lost (4096x2048: 6.8 -> 7.7 us). SiLU-gated launches do not split."""
    if m == 1:
        return GemvTiles(block_n=8, block_k=2048 // itemsize, num_warps=8, num_stages=5, dot=False)
    if m <= 16:
        return GemvTiles(block_n=32, block_k=512 // itemsize, num_warps=4, num_stages=5, dot=True)
    if itemsize == 1:
        block_n = next((rows for rows in (128, 64) if n // rows >= FP8_WGMMA_PROGRAMS), 32)
        if block_n == 32 and k >= FP8_SPLIT_MIN_K and not gated:
            return GemvTiles(block_n=64, block_k=128, num_warps=4, num_stages=5, dot=True, block_m=64, split_k=2)
        return GemvTiles(block_n=block_n, block_k=128 if block_n > 32 else 256, num_warps=4,
                         num_stages=3 if block_n == 128 else 5, dot=True, block_m=64)
    if m <= 32:  # 16-bit weights from here on
        return GemvTiles(block_n=32, block_k=256, num_warps=4, num_stages=5, dot=True)
    return GemvTiles(block_n=64, block_k=128, num_warps=4, num_stages=5, dot=True)


GATED_SHARED_BYTES = 200 * 1024  # of the H100's 227 KiB; stages change no sum, only how far loads run ahead


def _launch(a, b, a_scale, b_scale, bias, out_dtype, tiles, gated=False, fp8_scale=None, push=None) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0] // 2 if gated else b.shape[0]
    if push is not None:
        if gated or fp8_scale is not None:
            raise ValueError("gemv: only a plain output (not SiLU-gated, not E4M3 codes) can be pushed as partial sums")
        triton_allreduce_norm.check_push(push, m, n, out_dtype)
    push_pointers, push_constants = triton_allreduce_norm.push_arguments(push, b_scale)
    if m > MAX_M:
        raise ValueError(f"gemv: M={m} > {MAX_M}; use a GEMM")
    if gated and b.shape[0] % 2:
        raise ValueError(f"gated gemv: the weight's {b.shape[0]} rows are not gate and up halves")
    t = tiles or gemv_tiles(m, n, k, b.element_size(), gated)
    if m > 1 and not t.dot:
        raise ValueError(f"gemv: the FMA loop takes one row, got M={m}")
    out = torch.empty((m, n), dtype=fp8.FP8_DTYPE if fp8_scale is not None else out_dtype, device=a.device)
    block_m = (t.block_m or max(16, triton.next_power_of_2(m))) if t.dot else 1
    if block_m < m:
        raise ValueError(f"gemv: tiles of {block_m} rows for M={m}")
    split = t.split_k
    tiles_n = triton.cdiv(n, t.block_n)
    if split > 1 and (gated or not t.dot):
        raise ValueError("gemv: split K runs the plain tensor-core GEMV only (not SiLU-gated, not the one-token FMA loop)")
    if split > 1 and tiles_n > LOCKS:
        raise ValueError(f"gemv: {tiles_n} output tiles are more than the {LOCKS} split-K counters")
    workspace = torch.empty((split, m, n), dtype=torch.float32, device=a.device) if split > 1 else b_scale
    locks = split_k_locks(a.device) if split > 1 else b_scale
    stages = t.num_stages
    if gated and t.dot:  # two weight tiles a stage: fewer stages where the plain GEMV's would overflow
        stage_bytes = (block_m + 2 * t.block_n) * t.block_k * b.element_size()
        stages = max(2, min(stages, GATED_SHARED_BYTES // stage_bytes))
    if m:
        _gemv_kernel[(tiles_n, split)](
            a, b, out, a_scale, b_scale, bias if bias is not None else b_scale,
            fp8_scale if fp8_scale is not None else b_scale, *push_pointers, workspace, locks, m, n, k, a.stride(0),
            b.stride(0), out.stride(0), A_ROWWISE=a_scale.numel() > 1, B_ROWWISE=b_scale.numel() > 1,
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, DOT=t.dot,
            GATED=gated, DTYPE=TL_DTYPES[out_dtype], FP8_OUT=fp8_scale is not None, **push_constants,
            SPLIT_K=split, IMPRECISE=min(PROMOTE_EVERY, t.block_k), num_warps=t.num_warps, num_stages=stages, **launch_options(a.device))
    return out


def fp8_gemv(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, tiles: GemvTiles | None = None,
             push: triton_allreduce_norm.PeerRows | None = None) -> torch.Tensor:
    """``a [M, K]`` E4M3 codes (M <= MAX_M, rows contiguous), ``b [N, K]`` E4M3 -> ``[M, N]`` in ``out_dtype``.
    ``push``: also send the output rows to the peers' fused all-reduce (``triton_allreduce_norm.push_rows``)."""
    return _launch(a, b, a_scale, b_scale, bias, out_dtype, tiles, push=push)


_ONES: dict[torch.device, torch.Tensor] = {}


def _ones(device: torch.device) -> torch.Tensor:
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones(1, dtype=torch.float32, device=device)
    return one


def gemv(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
         tiles: GemvTiles | None = None, push: triton_allreduce_norm.PeerRows | None = None) -> torch.Tensor:
    """``a [M, K] @ b[N, K]^T (+ bias)`` for 16-bit ``a`` and ``b`` of one dtype (M <= MAX_M), in ``a``'s dtype.
    ``push``: as for :func:`fp8_gemv`."""
    return _launch(a, b, _ones(a.device), _ones(a.device), bias, a.dtype, tiles, push=push)


def silu_gated_gemv(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None, b_scale: torch.Tensor | None,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, fp8_scale: torch.Tensor | None = None,
                    tiles: GemvTiles | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``[gate | up] = a @ b^T * scales (+ bias)``, ``b [2I, K]`` (gate rows, then up
    rows; E4M3 with ``a`` E4M3 codes, or 16-bit like ``a`` with the scales None) -> ``[M, I]`` in
    ``out_dtype``, or E4M3 codes under ``fp8_scale``. The bits of the GEMV (``out_dtype`` output)
    followed by ``triton_glue.silu_mul``, in one kernel: no ``[M, 2I]`` round trip, one launch less."""
    if a_scale is None:
        a_scale = b_scale = _ones(a.device)
    return _launch(a, b, a_scale, b_scale, bias, out_dtype, tiles, gated=True, fp8_scale=fp8_scale)
