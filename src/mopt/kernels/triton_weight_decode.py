"""How each weight format of the weight-decoding family (``triton_weight_only``) turns stored bytes into
float32 values, as ``@triton.jit`` helpers shared by its kernels. Every decoded value is exact.

Formats (``FORMAT``, a constexpr) and what one weight is stored as:

* ``FP8_BLOCK``: an E4M3 code; a float32 scale per row and 128-wide K block (the 128x128 block's
  scale, repeated per row), applied to each block's partial product.
* ``INT4``: a two's-complement nibble, two per byte along K (element ``2i`` in the low nibble,
  ``mopt.quant.formats.int4.pack_k``); a float32 scale per row and ``g``-wide K group, applied to the
  group's partial product.
* ``INT8``: a code; the channel scale is a row scale (epilogue).
* ``NVFP4``: an E2M1 nibble (same packing), times its E4M3 scale per 16 (W4A8: 32) elements: exact in
  BF16; ``weight_scale_2`` is a row scale.
* ``MXFP4``: E2M1 nibbles times an E8M0 power of two per 32 elements. ``MXFP8``: E4M3 codes times it.
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_BLOCK, INT4, INT8, NVFP4, MXFP4, MXFP8 = 0, 1, 2, 3, 4, 5  # FORMAT, on the host
# The same values for the kernels: @triton.jit code may read only constexpr globals (the interpreter reads
# any, so only the compiler catches this: tests/kernels/hopper_compile.py).
_FP8_BLOCK, _INT4, _INT8, _NVFP4, _MXFP4, _MXFP8 = (tl.constexpr(v) for v in range(6))
GROUP_SCALED = (FP8_BLOCK, INT4)  # one scale per row and K group, applied to the group's partial product
FOUR_BIT = (INT4, NVFP4, MXFP4)


def scale_group(fmt: int, group: int, fp4_group: int) -> int:
    """Elements per scale along K (INT8, which has none, takes 128: any width works)."""
    return {FP8_BLOCK: 128, INT4: group, INT8: 128, NVFP4: fp4_group}.get(fmt, 32)


def scale_columns(fmt: int, scale) -> int:
    """Scale groups per weight row, as the kernels index ``scale`` (1 where there are none: INT8)."""
    return scale.shape[-1] if scale is not None and fmt != INT8 else 1


def group_bytes(fmt: int, group: int) -> int:
    """Stored bytes of ``group`` elements along K (4-bit formats pack two per byte)."""
    return group // 2 if fmt in FOUR_BIT else group


@triton.jit
def int4_pair(packed):
    """Signed nibbles of a ``uint8`` tile (element 2i low) as float32 (even, odd).

    ``0x4B000000 | (nibble ^ 8)`` is the float32 ``2**23 + q + 8``: one logic op places the bits, one
    subtraction gives ``q``; no integer-to-float conversion."""
    b = packed.to(tl.int32)
    lo = ((b & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
    hi = (((b >> 4) & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
    return lo, hi


@triton.jit
def e2m1_pair(packed):
    """E2M1 codes of a ``uint8`` tile (element 2i low) -> (even, odd) values times 2^-14, float32: the
    magnitude bits shifted into float16's exponent/mantissa fields (``(c & 7) << 9``) make a float16
    equal to the value times 2^-14 (code 1, value 0.5, lands on float16's subnormal 2^-15), so decoding
    is a shift, a bitcast and a convert; callers fold the 2^14 into their scales. Even and odd elements
    stay apart, in the tile's loaded (vectorized) layout."""
    b = packed.to(tl.int32)
    lo = ((b & 7) << 9) | ((b & 8) << 12)
    hi = ((b & 0x70) << 5) | ((b & 0x80) << 8)
    even = lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    odd = hi.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return even, odd


@triton.jit
def e8m0(e, BIAS: tl.constexpr):
    """An E8M0 exponent byte (any int tile) times ``2**BIAS`` as float32, by placing it into the exponent
    field (``BIAS`` folds powers of two the decoded codes carry)."""
    return (tl.minimum(e.to(tl.int32) + BIAS, 254) << 23).to(tl.float32, bitcast=True)


@triton.jit
def group_scales(s_ptr, rows, groups, ok, num_groups, FORMAT: tl.constexpr):
    """The float32 scale of each (row, K group) in ``rows [R, 1] x groups [1, G]`` (``ok`` masks), in the
    units the decoded codes need: E4M3 block scales times 2^14 and E8M0 powers of two times 2^14 for
    E2M1 codes (``e2m1_pair``'s 2^-14)."""
    ptrs = s_ptr + rows * num_groups + groups
    if FORMAT == _NVFP4:
        s = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * 16384.0
    elif FORMAT == _MXFP4:
        s = e8m0(tl.load(ptrs, mask=ok, other=0), 14)
    elif FORMAT == _MXFP8:
        s = e8m0(tl.load(ptrs, mask=ok, other=0), 0)
    else:
        s = tl.load(ptrs, mask=ok, other=0.0)
    return s.to(tl.float32)


@triton.jit
def mma_weight_tile(b_ptr, s_ptr, rows, n_ok, t, K, stride_b, num_groups, FORMAT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Float32 values of the weight tile ``[BLOCK_N, BLOCK_K]`` at K tile ``t`` of rows ``rows [BLOCK_N]`` (int64;
    ``n_ok`` masks), as the MMA kernels multiply it: group-scaled formats (FP8_BLOCK, INT4) give their codes, the
    caller scaling each tile's partial product (``BLOCK_K == GROUP``); INT8 its codes (the row scale comes in the
    epilogue); the others their codes times their exact block scales (``GROUP`` elements each)."""
    FOUR: tl.constexpr = FORMAT == _INT4 or FORMAT == _NVFP4 or FORMAT == _MXFP4
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    if FOUR:
        offs_h = t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(b_ptr + rows[:, None] * stride_b + offs_h[None, :],
                         mask=n_ok[:, None] & (offs_h < K // 2)[None, :], other=0)
        if FORMAT == _INT4:
            even, odd = int4_pair(packed)
        else:
            even, odd = e2m1_pair(packed)
        w = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
    elif FORMAT == _INT8:
        w = tl.load(b_ptr + rows[:, None] * stride_b + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
    else:
        w = tl.load(b_ptr + rows[:, None] * stride_b + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
    w = w.to(tl.float32)
    if FORMAT != _FP8_BLOCK and FORMAT != _INT4 and FORMAT != _INT8:  # exact block / E8M0 scales, folded in
        groups = t * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
        s = group_scales(s_ptr, rows[:, None], groups[None, :], n_ok[:, None] & (groups < num_groups)[None, :],
                         num_groups, FORMAT)
        w = tl.reshape(tl.reshape(w, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * s[:, :, None], (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def mma_tile_product(acc, x_t, b_ptr, s_ptr, rows, n_ok, t, K, stride_b, num_groups, FORMAT: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """``acc [BLOCK_N, BLOCK_M] + W tile . x_t`` for the activation tile ``x_t [BLOCK_K, BLOCK_M]`` (values exact in
    BF16): BF16 MMAs on the decoded weights (``DOT_F32``: IEEE float32 dots), a group-scaled format's partial
    product times its tile's scale before it is added."""
    w = mma_weight_tile(b_ptr, s_ptr, rows, n_ok, t, K, stride_b, num_groups, FORMAT, GROUP, BLOCK_N, BLOCK_K)
    if FORMAT == _FP8_BLOCK or FORMAT == _INT4:
        if DOT_F32:
            part = tl.dot(w, x_t.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(w.to(tl.bfloat16), x_t.to(tl.bfloat16))
        return acc + part * tl.load(s_ptr + rows * num_groups + t, mask=n_ok, other=0.0)[:, None]
    if DOT_F32:
        return tl.dot(w, x_t.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w.to(tl.bfloat16), x_t.to(tl.bfloat16), acc)
