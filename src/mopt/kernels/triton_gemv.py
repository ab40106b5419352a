"""Decode GEMV for FP8 weights: ``y[M, N] = (a[M, K] @ W[N, K]^T) * a_scale * w_scale (+ bias)``, small M.

Decode reads each weight once and does almost no arithmetic, so the kernel is built to stream
``W`` (E4M3, row-major) at memory speed and to write the output dtype directly: no split-K, hence
no zero-filled float32 buffer, no atomics and no cast afterwards (three launches fewer than the
prefill GEMM's split-K path), and a deterministic summation order. Activations arrive as E4M3 codes
(quantized by the norm or activation kernel before it, or by ``triton_quant``).

Two inner loops, picked by the tile config:

* ``DOT``: ``BLOCK_M = 16`` rows (padded) against ``BLOCK_N`` weight rows on the tensor cores;
* FMA (``M == 1``): products summed in float32 on the CUDA cores, ``BLOCK_N x BLOCK_K`` per step.

Both are exact float32 sums of exact products (E4M3 x E4M3 fits in float32), in another order than
the reference's float32 GEMM. Scales: ``a_scale`` scalar or per row ``[M]``; ``w_scale`` scalar or
per output row ``[N]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvTiles:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    dot: bool


@triton.jit
def _fp8_gemv_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, stride_am, stride_bn,
                     stride_cm, A_ROWWISE: tl.constexpr, B_ROWWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    b_rows = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn
    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        b = tl.load(b_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT:
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
        else:
            a = tl.load(a_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            acc1 += tl.sum(b.to(tl.float32) * a[None, :], axis=1)
    if DOT:
        out = acc
    else:
        out = acc1[None, :]
    if A_ROWWISE:
        sa = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
    else:
        sa = tl.load(a_scale_ptr + tl.zeros_like(offs_m))
    if B_ROWWISE:
        sb = tl.load(b_scale_ptr + offs_n, mask=n_ok, other=0.0)
    else:
        sb = tl.load(b_scale_ptr + tl.zeros_like(offs_n))
    out = out * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(ptrs, out.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


MAX_M = 16


def fp8_gemv_tiles(m: int, n: int, k: int) -> GemvTiles:
    """Tile settings from a sweep on an H100 (``bench/sweep_gemv.py``, 2026-11-26, Llama-3-8B layers): one
    config per inner loop was within 0.5% (M=1) and 3.4% (M=16) of each shape's best; at M=1 it moved
    2.3-2.9 TB/s (6144x4096: 10.9 us, 28672x4096: 40.7 us; the split-K GEMM took 14.6 and 42.6)."""
    if m == 1:
        return GemvTiles(block_n=8, block_k=1024, num_warps=8, num_stages=5, dot=False)
    return GemvTiles(block_n=32, block_k=512, num_warps=4, num_stages=5, dot=True)


def fp8_gemv(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, tiles: GemvTiles | None = None) -> torch.Tensor:
    """``a [M, K]`` E4M3 codes (M <= 16, rows contiguous), ``b [N, K]`` E4M3 -> ``[M, N]`` in ``out_dtype``."""
    m, k = a.shape
    n = b.shape[0]
    if m > MAX_M:
        raise ValueError(f"fp8_gemv: M={m} > {MAX_M}; use the GEMM")
    t = tiles or fp8_gemv_tiles(m, n, k)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m:
        _fp8_gemv_kernel[(triton.cdiv(n, t.block_n),)](
            a, b, out, a_scale, b_scale, bias if bias is not None else b_scale, m, n, k, a.stride(0), b.stride(0),
            out.stride(0), A_ROWWISE=a_scale.numel() > 1, B_ROWWISE=b_scale.numel() > 1, HAS_BIAS=bias is not None,
            BLOCK_M=16 if t.dot else 1, BLOCK_N=t.block_n, BLOCK_K=t.block_k, DOT=t.dot, num_warps=t.num_warps,
            num_stages=t.num_stages)
    return out
