"""KV-cache formats inside the Triton attention kernels: write codes, read values.

The formats and their reference numerics are ``mopt.quant.formats.kv_cache``'s (the reference paged
path is ``mopt.kernels.paged_attention``); a cache tensor's dtype says which it is:

* ``FMT_NONE``: values in the cache's dtype;
* ``FMT_FP8``: ``e4m3(x / scale)``, read back as ``code * scale``;
* ``FMT_INT8``: ``clamp(round_half_even(x / scale), -128, 127)``, read back as ``code * scale``;
* ``FMT_NVFP4``: per token and head, ``D / 2`` bytes of E2M1 codes (element ``2i`` in the low nibble)
  and ``D / 16`` E4M3 block scales, under the global scale ``g = scale / 6`` (the host passes ``g``),
  read back as ``e2m1 * (block_scale * g)``; ``AFFINE`` (NVFP4_AFFINE) quantizes ``x - bias`` and adds
  the float32 ``[Hkv, D]`` bias back on read.

Writes round as the reference does (IEEE division, ties to even; the attention kernels compile the
write with FMA contraction off), so the cache bytes equal the reference's. Reads compute in float32
and round to the query dtype once.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from mopt.kernels.paged_attention import PackedKV
from mopt.kernels.triton_quant import _to_fp8, nvfp4_quantize_blocks
from mopt.quant.formats import fp8, nvfp4

FMT_NONE, FMT_FP8, FMT_INT8, FMT_NVFP4 = 0, 1, 2, 3


def kv_format_args(k_cache: torch.Tensor, k_scale: float, v_scale: float, packed: PackedKV | None):
    """``(FMT, AFFINE, k scale, v scale, k block scales, v block scales, k bias, v bias)`` for a kernel
    launch; the scales as the kernels take them (NVFP4: the global scale ``scale / 6`` in float32), unused
    pointers filled with the cache (never read)."""
    if k_cache.dtype == torch.uint8:
        if packed is None:
            raise ValueError("an NVFP4 KV cache (uint8 codes) needs its block scales (packed=PackedKV(...))")
        k_g, v_g = (float(np.float32(s) / np.float32(nvfp4.E2M1_MAX)) for s in (k_scale, v_scale))
        affine = packed.k_bias is not None
        biases = (packed.k_bias, packed.v_bias) if affine else (k_cache, k_cache)
        return (FMT_NVFP4, affine, k_g, v_g, packed.k_block_scales, packed.v_block_scales, *biases)
    fmt = {fp8.FP8_DTYPE: FMT_FP8, torch.int8: FMT_INT8}.get(k_cache.dtype, FMT_NONE)
    return fmt, False, float(k_scale), float(v_scale), k_cache, k_cache, k_cache, k_cache


@triton.jit
def _to_int8(x, scale):
    y = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -128.0), 127.0)  # integer bounds: clamping before rounding is the same
    y = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: round to an integer, ties to even
    return y.to(tl.int8)


@triton.jit
def store_elementwise(cache_ptr, slot, num_kv_heads, heads, hmask, cols, x, scale, D: tl.constexpr,
                      FMT: tl.constexpr):
    """Store ``x`` float32 ``[heads, cols]`` of one token (FMT_NONE / FP8 / INT8)."""
    ptrs = cache_ptr + (slot * num_kv_heads + heads[:, None]) * D + cols[None, :]
    if FMT == 1:
        tl.store(ptrs, _to_fp8(x, scale), mask=hmask[:, None])
    elif FMT == 2:
        tl.store(ptrs, _to_int8(x, scale), mask=hmask[:, None])
    else:
        tl.store(ptrs, x.to(cache_ptr.dtype.element_ty), mask=hmask[:, None])


@triton.jit
def store_nvfp4(codes_ptr, scales_ptr, slot, num_kv_heads, heads, hmask, x, g, BLOCK_H: tl.constexpr,
                D: tl.constexpr):
    """Quantize ``x`` float32 ``[BLOCK_H, D]`` (one token's heads) to NVFP4 under ``g``; store codes and scales."""
    NB: tl.constexpr = D // 16
    code, negative, s = nvfp4_quantize_blocks(tl.reshape(x, (BLOCK_H * NB, 16)), g)
    code = code | tl.where(negative, 8, 0)
    lo, hi = tl.split(tl.reshape(code, (BLOCK_H * NB, 8, 2)))
    byte = tl.reshape((lo | (hi << 4)).to(tl.uint8), (BLOCK_H, D // 2))
    base = slot * num_kv_heads + heads
    tl.store(codes_ptr + base[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], byte, mask=hmask[:, None])
    s = tl.reshape(s, (BLOCK_H, NB))
    tl.store(scales_ptr + base[:, None] * NB + tl.arange(0, NB)[None, :], s.to(tl.float8e4nv), mask=hmask[:, None])


@triton.jit
def _e2m1_decode(code):
    """E2M1 codes (int32, 0..15) to float32 by placing their fields into float32's, as
    ``nvfp4.e2m1_decode`` does: exact, no table."""
    e = (code >> 1) & 3
    m = code & 1
    normal = ((e + 126) << 23) | (m << 22)
    magnitude = tl.where(e == 0, m * (126 << 23), normal)
    return (magnitude | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def load_values(cache_ptr, scales_ptr, bias_ptr, slot, tmask, kv_head, num_kv_heads, cols, scale,
                dtype: tl.constexpr, D: tl.constexpr, FMT: tl.constexpr, AFFINE: tl.constexpr):
    """``[N, D]`` values of cache slots ``slot [N]`` (``tmask``: which exist) of ``kv_head``, in ``dtype``."""
    base = slot * num_kv_heads + kv_head
    if FMT == 3:
        # Each byte is loaded for both of its nibbles, each scale for its 16 columns: the same addresses,
        # so the memory traffic stays D / 2 + D / 16 bytes a row.
        byte = tl.load(cache_ptr + base[:, None] * (D // 2) + (cols // 2)[None, :], mask=tmask[:, None], other=0)
        code = (byte.to(tl.int32) >> ((cols % 2) * 4)[None, :]) & 0xF
        s = tl.load(scales_ptr + base[:, None] * (D // 16) + (cols // 16)[None, :], mask=tmask[:, None], other=0.0)
        x = _e2m1_decode(code) * (s.to(tl.float32) * scale)
        if AFFINE:
            x = x + tl.load(bias_ptr + kv_head * D + cols)[None, :]
        return x.to(dtype)
    x = tl.load(cache_ptr + base[:, None] * D + cols[None, :], mask=tmask[:, None], other=0.0)
    if FMT == 1 or FMT == 2:
        return (x.to(tl.float32) * scale).to(dtype)
    return x.to(dtype)
