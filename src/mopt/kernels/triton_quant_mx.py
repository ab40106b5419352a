"""Triton MX activation quantizers, bit-exact with ``mopt.quant.formats.mx`` (one pass over the input).

* ``mxfp8_values``: ``mx.fake_quantize_mxfp8(x).to(x.dtype)``;
* ``mxfp4_values``: ``mx.fake_quantize_mxfp4(x).to(x.dtype)``.

Each 32-element block along K gets the E8M0 exponent ``ceil(log2(amax / max_value))`` of the float32
quotient (``max_value`` 448 or 6), read from its bits, never from a float ``log2``; the values round to
nearest, ties to even, and come back multiplied by the block's power of two (exact in float32), then
cast to the input's dtype. Special blocks follow the reference: an all-zero block or one holding a NaN
gets the smallest scale ``2**-127`` (``ratio > 0`` is false); one whose amax is infinite gets
``2**0``, the exponent ``torch.frexp`` gives for infinity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_quant import _e2m1_code, _rows, round_e4m3
from mopt.quant.formats import mx


@triton.jit
def e8m0_code(amax, MAX_VALUE: tl.constexpr):
    """Biased E8M0 codes (int32, 0..254) of block maxima ``amax >= 0`` (or NaN), as ``mx.e8m0_exponent``."""
    ratio = tl.math.div_rn(amax, MAX_VALUE)
    bits = ratio.to(tl.int32, bitcast=True)
    field = (bits >> 23) & 0xFF
    fraction = bits & 0x7FFFFF
    unbiased = field - 127 + (fraction != 0).to(tl.int32)  # ceil(log2) of a normal number
    # A subnormal ratio is below 2**-126: its ceil(log2) is -126 above 2**-127, else clamped to -127.
    unbiased = tl.where(field == 0, tl.where(fraction > 0x400000, -126, -127), unbiased)
    unbiased = tl.where(field == 255, 0, unbiased)  # infinity: frexp's exponent 0 (NaN fails ratio > 0)
    unbiased = tl.where(ratio > 0, unbiased, -127)
    return tl.minimum(tl.maximum(unbiased, -127), 127) + 127


@triton.jit
def e8m0_value(code):
    """``2 ** (code - 127)`` in float32 by its bits (code 0 is the subnormal 2**-127)."""
    return tl.where(code > 0, code << 23, 0x400000).to(tl.float32, bitcast=True)


@triton.jit
def bf16_bits(v):
    """Float32 to bfloat16 bits (int16), round to nearest even, subnormals kept, NaN kept NaN."""
    bits = v.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(v != v, 0x7FC0, rounded).to(tl.int16)


@triton.jit
def _mx_values_kernel(x_ptr, out_ptr, k, stride_x, BLOCKS: tl.constexpr, FP4: tl.constexpr,
                      BF16_BITS: tl.constexpr):
    """One program per (row, BLOCKS x 32 columns); K is a multiple of 32. ``BF16_BITS``: ``x_ptr`` and
    ``out_ptr`` are the int16 views of bfloat16 tensors, converted by their bits (exact, and the
    interpreter's conversions get subnormals wrong)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    cols = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    mask = cols < k
    if BF16_BITS:
        x = (tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32,
                                                                                                 bitcast=True)
    else:
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    code = e8m0_code(tl.max(tl.abs(x), axis=1), 6.0 if FP4 else 448.0)
    # torch's amax propagates NaN (giving code 0); the GPU's max reduction drops it.
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    scale = e8m0_value(tl.where(has_nan, 0, code))[:, None]
    y = tl.math.div_rn(x, scale)
    if FP4:
        # E2M1 magnitude code (NaN -> 0, beyond 6 -> 6), its value placed into float32's fields, and the
        # sign as a bit, so a negative value that rounds to zero gives -0.0 as the reference's decode does.
        c = _e2m1_code(y)
        e = c >> 1
        m = c & 1
        magnitude = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))
        q = (magnitude | ((y < 0).to(tl.int32) << 31)).to(tl.float32, bitcast=True)
    else:
        clamped = tl.minimum(tl.maximum(y, -448.0), 448.0)
        q = round_e4m3(tl.where(y != y, y, clamped))  # NaN stays NaN, as torch's clamp keeps it
    # Exact (at most 4 significant bits, none below 2**-149), except that an amax within half an E4M3 step
    # of float32's maximum rounds to 2**128 = inf, as the reference's product does.
    value = q * scale
    if BF16_BITS:
        tl.store(out_ptr + row * k + cols, bf16_bits(value), mask=mask)
    else:
        tl.store(out_ptr + row * k + cols, value.to(out_ptr.dtype.element_ty), mask=mask)


_BLOCKS = 8  # 32-element blocks per program: 256 columns


def _mx_values(x: torch.Tensor, fp4: bool) -> torch.Tensor:
    if x.shape[-1] % mx.BLOCK_SIZE:
        raise ValueError(f"MX formats need the last dim to be a multiple of {mx.BLOCK_SIZE}, got shape {tuple(x.shape)}")
    x2 = _rows(x)
    m, k = x2.shape
    out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m and k:
        grid = (m, triton.cdiv(k // mx.BLOCK_SIZE, _BLOCKS))
        bf16 = out.dtype == torch.bfloat16
        as_bits = (lambda t: t.view(torch.int16)) if bf16 else (lambda t: t)
        _mx_values_kernel[grid](as_bits(x2), as_bits(out), k, x2.stride(0), BLOCKS=_BLOCKS, FP4=fp4, BF16_BITS=bf16)
    return out.reshape(x.shape)


def mxfp8_values(x: torch.Tensor) -> torch.Tensor:
    """``mx.fake_quantize_mxfp8(x).to(x.dtype)`` for ``x [..., K]``, K a multiple of 32."""
    return _mx_values(x, fp4=False)


def mxfp4_values(x: torch.Tensor) -> torch.Tensor:
    """``mx.fake_quantize_mxfp4(x).to(x.dtype)`` for ``x [..., K]``, K a multiple of 32."""
    return _mx_values(x, fp4=True)
