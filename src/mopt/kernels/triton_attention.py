"""Triton paged attention: RoPE fused with the KV-cache write, split-KV decode (varlen prefill:
``triton_prefill_attention``, on the tile helpers here).

Cache layout and slot convention are those of ``mopt.kernels.paged_attention`` (the reference):
``[num_blocks, page, num_kv_heads, width]``, token ``t`` of a sequence in slot
``block_table[t // page] * page + t % page``. The cache's dtype says its format
(``mopt.kernels.triton_kv``): model dtype, FP8, INT8 codes, or NVFP4 packed codes (``width =
head_dim / 2``) with E4M3 block scales and, for NVFP4_AFFINE, biases passed as a ``PackedKV``.

* ``rope_and_write``: one program per token rotates its query and key heads (rotate-half RoPE from
  a ``[positions, head_dim]`` cos|sin table) and stores keys and values into their slots, quantized
  to the cache's format (NVFP4: per 16-element block, the block scale computed as the token is
  written). Every rounding step is the reference's (float32 products and sums, FMA contraction off,
  the rotated key rounded to the model dtype before quantization), so the cache bytes equal the
  reference's. Slots < 0 (padding rows of a CUDA-graph batch) are not written.
* ``decode``: one query token per sequence. A program owns one KV head, all query heads of its
  GQA group (padded to 16 rows for the tensor cores) and one of ``num_splits`` contiguous slices
  of the context (flash-decoding); a second kernel merges the slices by their log-sum-exp (merging
  in the last program of each KV head instead, behind an atomic counter, measured 10.7 us against
  4.2 + 2.3 us on an H100: the merge then runs serially per head). The split count depends only on
  the batch shape, so a captured CUDA graph stays valid for any context length; each program picks
  its tile width (``decode_tiles``) from its slice's length at run time. Given the step's
  unrotated keys and values (``NewTokens``), it also does ``rope_and_write``'s work: every program rotates
  its query heads, and the one whose slice holds the new token writes that token's key and value first
  (one launch fewer a layer).
Quantized keys and values are dequantized in the kernel, tile by tile, as the reference does
(``code * scale``, NVFP4 ``e2m1 * (block_scale * scale / 6)`` (+ bias), in float32, rounded to the
query dtype); nothing is dequantized outside the kernels. With ``out_scale`` the output (rounded to
the query dtype) is written as E4M3 codes under it, for an FP8 ``o_proj`` that takes those. Softmax
is online, in float32; probabilities meet the values in the query dtype. A sequence with no cached
tokens (``seq_len == 0``) gets a zero output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mopt.kernels.paged_attention import PackedKV
from mopt.kernels.triton_glue import TL_DTYPES, _store_out, marked, output_format
from mopt.kernels.triton_pdl import launch_options, pdl_prologue
from mopt.kernels.triton_kv import FMT_NONE, kv_format_args, load_values, store_elementwise, store_nvfp4


def _jit_step_metadata(pointers: tuple[str, ...], ints: tuple[str, ...] = ()):
    """``triton.jit`` that does not specialize on the step's metadata: the alignment of ``pointers`` (slices of
    the one packed int32 array a step's inputs cross in, 16-byte aligned or not by the token count) and the
    divisibility of ``ints``. Else an eager prefill compiles a new variant for each such pattern, inside
    a served request (1.6 s at TP=2 on 2x H200, ``bench/results/serve-prefill-runs-h200x2-2026-11-27.txt``)."""
    try:
        return triton.jit(do_not_specialize=ints, do_not_specialize_on_alignment=pointers)
    except TypeError:  # a Triton without the alignment switch: not specializing covers alignment there
        return triton.jit(do_not_specialize=ints + pointers)


MAX_DECODE_SPLITS = 16  # 256 tokens a split at 4096 of context; fewer partials for the merge to read


@triton.jit
def _rotated(rows, mask, cos_sin_ptr, pos, D: tl.constexpr):
    """Rotate-half RoPE of ``[R, D]`` rows (``rows``: each row's first element) at position ``pos``, float32:
    column i against its partner i +- D/2, ``x * cos - partner * sin`` in the first half and ``x * cos +
    partner * sin`` in the second, the products the reference forms (callers compile without FMA
    contraction)."""
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, D)
    jj = cols % HALF
    c = tl.load(cos_sin_ptr + pos * D + jj)[None, :]
    s = tl.load(cos_sin_ptr + pos * D + HALF + jj)[None, :]
    x = tl.load(rows + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    partner = tl.load(rows + ((cols + HALF) % D)[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    return tl.where(cols[None, :] < HALF, x * c - partner * s, x * c + partner * s)


@triton.jit
def _write_token(k_rows, v_rows, kmask, kv_heads, slot, pos, cos_sin_ptr, k_cache_ptr, v_cache_ptr, kv, k_scale,
                 v_scale, num_kv_heads, dtype: tl.constexpr, BLOCK_KV: tl.constexpr, D: tl.constexpr,
                 FMT: tl.constexpr, AFFINE: tl.constexpr):
    """One token's rotated keys and its values (``[BLOCK_KV, D]`` rows of ``kv_heads``) into cache slot
    ``slot``, quantized to the cache's format. ``kv``: the (k block scales, v block scales, k bias, v bias)
    pointers of an NVFP4 cache."""
    k_bs_ptr, v_bs_ptr, k_bias_ptr, v_bias_ptr = kv
    cols = tl.arange(0, D)
    # The reference rounds the rotated key to the model dtype before the cache quantizes it.
    key = _rotated(k_rows, kmask, cos_sin_ptr, pos, D).to(dtype).to(tl.float32)
    v = tl.load(v_rows + cols[None, :], mask=kmask[:, None], other=0.0).to(tl.float32)
    if FMT == 3:
        if AFFINE:
            bias_at = kv_heads[:, None] * D + cols[None, :]
            key = key - tl.load(k_bias_ptr + bias_at, mask=kmask[:, None], other=0.0)
            v = v - tl.load(v_bias_ptr + bias_at, mask=kmask[:, None], other=0.0)
        store_nvfp4(k_cache_ptr, k_bs_ptr, slot, num_kv_heads, kv_heads, kmask, key, k_scale, BLOCK_KV, D)
        store_nvfp4(v_cache_ptr, v_bs_ptr, slot, num_kv_heads, kv_heads, kmask, v, v_scale, BLOCK_KV, D)
    else:
        store_elementwise(k_cache_ptr, slot, num_kv_heads, kv_heads, kmask, cols, key, k_scale, D, FMT)
        store_elementwise(v_cache_ptr, slot, num_kv_heads, kv_heads, kmask, cols, v, v_scale, D, FMT)


@_jit_step_metadata(("pos_ptr", "slot_ptr"))
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, pos_ptr, cos_sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                       k_bs_ptr, v_bs_ptr, k_bias_ptr, v_bias_ptr, k_scale, v_scale, stride_qt, stride_qh,
                       stride_kt, stride_kh, stride_vt, stride_vh, num_heads, num_kv_heads, HALF: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, FMT: tl.constexpr, AFFINE: tl.constexpr,
                       PDL: tl.constexpr):
    pdl_prologue(PDL)
    t = tl.program_id(0).to(tl.int64)
    D: tl.constexpr = 2 * HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, D)
    dtype = q_out_ptr.dtype.element_ty
    qmask = heads < num_heads
    q = _rotated(q_ptr + t * stride_qt + heads[:, None] * stride_qh, qmask, cos_sin_ptr, pos, D)
    tl.store(q_out_ptr + (t * num_heads + heads[:, None]) * D + cols[None, :], q.to(dtype), mask=qmask[:, None])
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        kv_heads = tl.arange(0, BLOCK_KV)
        _write_token(k_ptr + t * stride_kt + kv_heads[:, None] * stride_kh,
                     v_ptr + t * stride_vt + kv_heads[:, None] * stride_vh, kv_heads < num_kv_heads, kv_heads, slot,
                     pos, cos_sin_ptr, k_cache_ptr, v_cache_ptr, (k_bs_ptr, v_bs_ptr, k_bias_ptr, v_bias_ptr),
                     k_scale, v_scale, num_kv_heads, dtype, BLOCK_KV, D, FMT, AFFINE)


@triton.jit
def _load_kv(cache_ptr, scales_ptr, bias_ptr, block_table_row, tok, tmask, kv_head, num_kv_heads, cols, scale,
             dtype: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, FMT: tl.constexpr, AFFINE: tl.constexpr):
    """``[BLOCK_N, D]`` keys or values of tokens ``tok`` through the block table, in ``dtype``."""
    page = tl.load(block_table_row + tok // PAGE, mask=tmask, other=0).to(tl.int64)
    slot = page * PAGE + tok % PAGE
    return load_values(cache_ptr, scales_ptr, bias_ptr, slot, tmask, kv_head, num_kv_heads, cols, scale, dtype, D,
                       FMT, AFFINE)


@triton.jit
def _scores(q, k, sm_scale, IEEE: tl.constexpr):
    if IEEE:  # float32 models: no TF32 rounding
        return tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
    return tl.dot(q, tl.trans(k)) * sm_scale


@triton.jit
def _pv(p, v, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    return tl.dot(p.to(v.dtype), v, acc)


@triton.jit
def _online_softmax(s, m, l, acc):
    """One tile of scores ``s [R, N]`` (masked entries -inf) into the running max, sum and output."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    return p, m_new, l * alpha + tl.sum(p, axis=1), acc * alpha[:, None]


@triton.jit
def _attend_tile(q, k_cache_ptr, v_cache_ptr, kv, table, tok, tmask, keep, kv_head, num_kv_heads, cols, k_scale,
                 v_scale, sm_scale, m, l, acc, PAGE: tl.constexpr, D: tl.constexpr, FMT: tl.constexpr,
                 AFFINE: tl.constexpr, IEEE: tl.constexpr):
    """Queries ``q [R, D]`` against the keys/values of tokens ``tok`` (``keep [R, N]``: which pairs count).
    ``kv``: the (k block scales, v block scales, k bias, v bias) pointers of an NVFP4 cache."""
    k_bs_ptr, v_bs_ptr, k_bias_ptr, v_bias_ptr = kv
    k = _load_kv(k_cache_ptr, k_bs_ptr, k_bias_ptr, table, tok, tmask, kv_head, num_kv_heads, cols, k_scale, q.dtype,
                 PAGE, D, FMT, AFFINE)
    s = tl.where(keep, _scores(q, k, sm_scale, IEEE), float("-inf"))
    p, m, l, acc = _online_softmax(s, m, l, acc)
    v = _load_kv(v_cache_ptr, v_bs_ptr, v_bias_ptr, table, tok, tmask, kv_head, num_kv_heads, cols, v_scale, q.dtype,
                 PAGE, D, FMT, AFFINE)
    return m, l, _pv(p, v, acc, IEEE)


@triton.jit
def _attend_range(q, k_cache_ptr, v_cache_ptr, kv, table, lo, hi, kv_head, num_kv_heads, cols, k_scale, v_scale,
                  sm_scale, m, l, acc, TILE: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, FMT: tl.constexpr,
                  AFFINE: tl.constexpr, IEEE: tl.constexpr):
    """Tokens ``lo .. hi - 1`` in tiles of ``TILE`` into the running max, sum and output."""
    for start in range(lo, hi, TILE):
        tok = start + tl.arange(0, TILE)
        tmask = tok < hi
        m, l, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, kv, table, tok, tmask, tmask[None, :], kv_head,
                                 num_kv_heads, cols, k_scale, v_scale, sm_scale, m, l, acc, PAGE, D, FMT, AFFINE, IEEE)
    return m, l, acc


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_bs_ptr, v_bs_ptr, k_bias_ptr, v_bias_ptr, bt_ptr, seq_lens_ptr,
                   out_ptr, part_ptr, lse_ptr, out_scale_ptr, k_new_ptr, v_new_ptr, pos_ptr, cos_sin_ptr, slot_ptr,
                   k_scale, v_scale, sm_scale, stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_bt, num_heads, num_kv_heads, window, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                   D: tl.constexpr, PAGE: tl.constexpr, TILE_S: tl.constexpr, TILE_M: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, FMT: tl.constexpr, AFFINE: tl.constexpr, IEEE: tl.constexpr,
                   FP8_OUT: tl.constexpr, NVFP4_OUT: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr):
    """``ROPE``: ``q`` and the new token's ``k``, ``v`` arrive unrotated; each program rotates its query
    heads, and the program whose slice holds the new token rotates its key and writes key and value into
    the cache (as ``_rope_write_kernel``) before it reads them back."""
    pdl_prologue(PDL)
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    # Slices of at most TILE_S tokens when that covers the context (short contexts over many slices);
    # otherwise whole TILE_M tiles, as many as the slices need.
    even = tl.cdiv(seq_len - first, NUM_SPLITS)
    per_split = tl.where(even <= TILE_S, TILE_S, tl.cdiv(even, TILE_M) * TILE_M)
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    rows = tl.arange(0, BLOCK_H)
    hmask = rows < GROUP
    qmask = rows < tl.where(lo < hi, GROUP, 0)  # an empty slice reads nothing; it leaves only a -inf LSE
    heads = kv_head * GROUP + rows
    cols = tl.arange(0, D)
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    if ROPE:
        pos = tl.load(pos_ptr + b).to(tl.int64)
        q = _rotated(q_rows, qmask, cos_sin_ptr, pos, D).to(q_ptr.dtype.element_ty)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        if (slot >= 0) & (lo <= seq_len - 1) & (seq_len - 1 < hi):
            one = kv_head + tl.arange(0, 1)
            _write_token(k_new_ptr + b * stride_kt + one[:, None] * stride_kh,
                         v_new_ptr + b * stride_vt + one[:, None] * stride_vh, one < num_kv_heads, one, slot, pos,
                         cos_sin_ptr, k_cache_ptr, v_cache_ptr, (k_bs_ptr, v_bs_ptr, k_bias_ptr, v_bias_ptr),
                         k_scale, v_scale, num_kv_heads, q_ptr.dtype.element_ty, 1, D, FMT, AFFINE)
            tl.debug_barrier()  # the program's own writes, visible to all its threads before the loop reads them
    else:
        q = tl.load(q_rows + cols[None, :], mask=qmask[:, None], other=0.0)
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D), tl.float32)
    table = bt_ptr + b * stride_bt
    kv = (k_bs_ptr, v_bs_ptr, k_bias_ptr, v_bias_ptr)
    # A slice of at most TILE_S tokens takes one narrow tile, which wastes less of it; longer slices take
    # TILE_M-token tiles. Decided per program at run time, so one captured graph serves every context.
    if hi - lo <= TILE_S:
        m, l, acc = _attend_range(q, k_cache_ptr, v_cache_ptr, kv, table, lo, hi, kv_head, num_kv_heads, cols,
                                  k_scale, v_scale, sm_scale, m, l, acc, TILE_S, PAGE, D, FMT, AFFINE, IEEE)
    else:
        m, l, acc = _attend_range(q, k_cache_ptr, v_cache_ptr, kv, table, lo, hi, kv_head, num_kv_heads, cols,
                                  k_scale, v_scale, sm_scale, m, l, acc, TILE_M, PAGE, D, FMT, AFFINE, IEEE)
    has = l > 0
    o = acc / tl.where(has, l, 1.0)[:, None]
    if NUM_SPLITS == 1:
        _store_out(out_ptr + (b * num_heads + heads[:, None]) * D + cols[None, :], o.to(q.dtype), out_scale_ptr,
                   hmask[:, None], FP8_OUT, NVFP4_OUT)
    else:
        idx = (b * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_ptr + idx[:, None] * D + cols[None, :], o, mask=qmask[:, None])
        tl.store(lse_ptr + idx, tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf")), mask=hmask)


@triton.jit
def _decode_merge_kernel(part_ptr, lse_ptr, out_ptr, out_scale_ptr, NUM_SPLITS: tl.constexpr, D: tl.constexpr,
                         DTYPE: tl.constexpr, FP8_OUT: tl.constexpr, NVFP4_OUT: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)  # b * num_heads + h
    splits = tl.arange(0, NUM_SPLITS)
    lse = tl.load(lse_ptr + row * NUM_SPLITS + splits)
    top = tl.max(lse, axis=0)
    filled = lse > float("-inf")  # empty slices store no partial
    w = tl.where(filled, tl.exp(lse - tl.where(top > float("-inf"), top, 0.0)), 0.0)
    total = tl.sum(w, axis=0)
    cols = tl.arange(0, D)
    parts = tl.load(part_ptr + (row * NUM_SPLITS + splits)[:, None] * D + cols[None, :], mask=filled[:, None],
                    other=0.0)
    merged = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    _store_out(out_ptr + row * D + cols, merged.to(DTYPE), out_scale_ptr, cols < D, FP8_OUT, NVFP4_OUT)


def rope_and_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float, v_scale: float,
                   packed: PackedKV | None = None) -> torch.Tensor:
    """``q [N, H, D]``, ``k, v [N, Hkv, D]`` (last dim contiguous) -> rotated ``q [N, H, D]``; rotated
    keys and values go into the caches at ``slot_mapping [N]``. ``cos_sin_cache [P, D]`` float32;
    ``packed``: an NVFP4 cache's block scales (and NVFP4_AFFINE biases)."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"rope_and_write: head_dim {head_dim} must be a power of two")
    q_out = torch.empty((n, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if n:
        fmt, affine, ks, vs, *kv = kv_format_args(k_cache, k_scale, v_scale, packed)
        _rope_write_kernel[(n,)](
            q, k, v, q_out, positions, cos_sin_cache, slot_mapping, k_cache, v_cache, *kv, ks, vs, q.stride(0),
            q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), num_heads, num_kv_heads,
            HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(num_heads),
            BLOCK_KV=triton.next_power_of_2(num_kv_heads), FMT=fmt, AFFINE=affine,
            num_warps=4 if fmt == FMT_NONE else 8, enable_fp_fusion=False, **launch_options(q.device))
    return q_out


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Context slices per (sequence, KV head): enough programs for two waves, a power of two."""
    want = triton.cdiv(2 * _num_sms(device), max(1, batch * num_kv_heads))
    return min(MAX_DECODE_SPLITS, triton.next_power_of_2(want))


def decode_tiles(page: int) -> tuple[int, int]:
    """``decode``'s (narrow, middle) tile widths over a context slice. A context whose slices fit one
    narrow tile each (batch 1: up to 16 x 32 tokens) takes those; other contexts take slices of whole
    middle tiles, as before the narrow tier. A third tier, 128 tokens for long slices, measured up to
    1.7x faster alone (an H200, ``bench/sweep_decode_tiles.py``) but 2-4% slower inside a decode step,
    at 128 and at 4000 tokens of context, so there is none."""
    middle = max(16, min(64, 4 * page))
    return max(16, middle // 2), middle


class NewTokens(NamedTuple):
    """A decode step's new keys and values ``[B, Hkv, D]`` before RoPE (last dim contiguous), their positions
    ``[B]``, the ``[P, D]`` float32 cos|sin table and their cache slots ``[B]`` (< 0: padding, not written)."""
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, scale: float, k_scale: float, v_scale: float, window: int = 0,
           num_splits: int | None = None, out_scale: torch.Tensor | None = None,
           packed: PackedKV | None = None, new: NewTokens | None = None,
           nvfp4_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``q [B, H, D]`` (one new token per sequence, already in the cache) -> ``[B, H, D]``, or E4M3 codes
    of it under ``out_scale`` (the next GEMM's static input scale), or its marked NVFP4 block values under
    ``nvfp4_scale`` (the next GEMM's global input scale, ``kernels.quantized_input``; blocks of 16 along
    ``D``). With ``new``, ``q`` is unrotated and the
    new tokens are not in the cache yet: the kernel does ``rope_and_write``'s work itself (same bits), one
    launch instead of two. Compiled without FMA contraction, as the RoPE kernel is, so either way gives
    the same bits."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    if new is not None and (head_dim % 2 or head_dim & (head_dim - 1)):
        raise ValueError(f"decode: head_dim {head_dim} must be a power of two for RoPE")
    splits = num_splits or decode_splits(batch, num_kv_heads, q.device)
    out_dtype, quant_scale = output_format(head_dim, q.dtype, out_scale, nvfp4_scale, "attention decode")
    out = torch.empty((batch, num_heads, head_dim), dtype=out_dtype, device=q.device)
    if not batch:
        return marked(out, nvfp4_scale)
    if splits > 1:
        part = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    else:
        part = lse = out
    scale_arg = quant_scale if quant_scale is not None else q
    fmt, affine, ks, vs, *kv = kv_format_args(k_cache, k_scale, v_scale, packed)
    narrow, middle = decode_tiles(page)
    if new is not None:
        rope = (new.k, new.v, new.positions, new.cos_sin_cache, new.slot_mapping, new.k.stride(0), new.k.stride(1),
                new.v.stride(0), new.v.stride(1))
    else:
        rope = (q, q, seq_lens, scale_arg, seq_lens, 0, 0, 0, 0)
    _decode_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, *kv, block_tables, seq_lens, out, part, lse, scale_arg, *rope[:5], ks, vs, scale,
        q.stride(0), q.stride(1), *rope[5:], block_tables.stride(0), num_heads, num_kv_heads, window, GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)), D=head_dim, PAGE=page, TILE_S=narrow, TILE_M=middle,
        NUM_SPLITS=splits, FMT=fmt, AFFINE=affine, IEEE=q.dtype == torch.float32,
        FP8_OUT=out_scale is not None, NVFP4_OUT=nvfp4_scale is not None, ROPE=new is not None, num_warps=4,
        num_stages=2, enable_fp_fusion=False, **launch_options(q.device))
    if splits > 1:
        _decode_merge_kernel[(batch * num_heads,)](part, lse, out, scale_arg, NUM_SPLITS=splits, D=head_dim,
                                                   DTYPE=TL_DTYPES[q.dtype], FP8_OUT=out_scale is not None,
                                                   NVFP4_OUT=nvfp4_scale is not None, **launch_options(q.device))
    return marked(out, nvfp4_scale)
