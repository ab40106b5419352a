"""Triton paged attention, varlen prefill: new tokens of several sequences packed back to back, each
attending causally over its cached context and itself (chunked prefill: context + new tokens), BLOCK_M
queries a program, sliding windows honoured.

Cache layout, formats, dequantization, softmax and the E4M3 output are those of ``triton_attention``'s
decode (its module docstring), through the same tile helpers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mopt.kernels.paged_attention import PackedKV
from mopt.kernels.triton_attention import _attend_tile, _jit_step_metadata
from mopt.kernels.triton_glue import _store_out, output_format
from mopt.kernels.triton_kv import kv_format_args


@_jit_step_metadata(("bt_ptr", "seq_lens_ptr", "qsl_ptr"), ("stride_bt",))
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_bs_ptr, v_bs_ptr, k_bias_ptr, v_bias_ptr, out_ptr, bt_ptr,
                    seq_lens_ptr, qsl_ptr, out_scale_ptr, k_scale, v_scale, sm_scale, stride_qt, stride_qh, stride_bt,
                    num_heads, num_kv_heads, window, GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FMT: tl.constexpr, AFFINE: tl.constexpr,
                    IEEE: tl.constexpr, FP8_OUT: tl.constexpr):
    mb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if mb * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + b)
        context = seq_len - q_len
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < q_len
        q_pos = context + rows
        cols = tl.arange(0, D)
        tokens = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + tokens[:, None] * stride_qt + h * stride_qh + cols[None, :], mask=rmask[:, None],
                    other=0.0)
        kv_head = h // GROUP
        hi = tl.minimum(seq_len, context + (mb + 1) * BLOCK_M)
        lo = tl.where(window > 0, tl.maximum(context + mb * BLOCK_M - window + 1, 0), 0)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        table = bt_ptr + b * stride_bt
        for start in range(lo, hi, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            tmask = tok < hi
            keep = tmask[None, :] & (tok[None, :] <= q_pos[:, None])
            if window > 0:
                keep = keep & (q_pos[:, None] - tok[None, :] < window)
            m, l, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, (k_bs_ptr, v_bs_ptr, k_bias_ptr, v_bias_ptr),
                                     table, tok, tmask, keep, kv_head, num_kv_heads, cols, k_scale, v_scale, sm_scale,
                                     m, l, acc, PAGE, D, FMT, AFFINE, IEEE)
        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        _store_out(out_ptr + (tokens[:, None] * num_heads + h) * D + cols[None, :], o.to(q.dtype), out_scale_ptr,
                   rmask[:, None], FP8_OUT)


def prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int, scale: float,
            k_scale: float, v_scale: float, window: int = 0, out_scale: torch.Tensor | None = None,
            packed: PackedKV | None = None) -> torch.Tensor:
    """``q [N, H, D]``: the new tokens of ``B`` sequences (``query_start_loc [B + 1]``), in the cache
    already -> ``[N, H, D]`` (E4M3 codes under ``out_scale`` if given)."""
    n, num_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    out_dtype, _ = output_format(head_dim, q.dtype, out_scale, None, "attention prefill")
    out = torch.empty((n, num_heads, head_dim), dtype=out_dtype, device=q.device)
    if not n:
        return out
    ieee = q.dtype == torch.float32
    block_m = 64 if q.is_cuda and not ieee else 16
    block_n = 64 if q.is_cuda and not ieee else 32
    grid = (triton.cdiv(max_query_len, block_m), batch, num_heads)
    fmt, affine, ks, vs, *kv = kv_format_args(k_cache, k_scale, v_scale, packed)
    _prefill_kernel[grid](
        q, k_cache, v_cache, *kv, out, block_tables, seq_lens, query_start_loc,
        out_scale if out_scale is not None else q, ks, vs, scale, q.stride(0), q.stride(1), block_tables.stride(0),
        num_heads, num_kv_heads, window, GROUP=num_heads // num_kv_heads, D=head_dim, PAGE=page, BLOCK_M=block_m,
        BLOCK_N=block_n, FMT=fmt, AFFINE=affine, IEEE=ieee, FP8_OUT=out_scale is not None, num_warps=4,
        num_stages=2)
    return out
