"""One Triton kernel family that decodes weights in registers: FP8 128x128 blocks, INT4 groups, INT8 channels,
NVFP4, MXFP4 and MXFP8 weights, times activations that are unquantized (the weight-only schemes) or
already quantized to values exact in BF16 (INT8 SmoothQuant and W4A8's FP8 codes, their scale in the
epilogue; MXFP8 / MXFP4 values).

The formats differ only in how a tile of weights decodes (``FORMAT``, a constexpr):

* ``FP8_BLOCK``: E4M3 codes, exact in BF16; the row's 128x128-block scale multiplies each 128-wide
  K tile's partial product (``BLOCK_K`` = 128).
* ``INT4``: two's-complement nibbles (``mopt.quant.formats.int4.pack_k``) decoded by bit placement:
  ``0x6400 | (nibble ^ 8)`` is the float16 ``1024 + q + 8``, one subtraction gives ``q`` (no integer
  to float conversion); the group scale multiplies each ``g``-wide tile's partial product
  (``BLOCK_K`` = g).
* ``INT8``: codes, exact in BF16; the channel scale in the epilogue.
* ``NVFP4``: E2M1 codes placed into float16 bit fields (``triton_gemm._e2m1_pair``) times their E4M3
  block scale, exact in BF16; ``weight_scale_2`` in the epilogue.
* ``MXFP4``: the same codes times their E8M0 power of two, made by placing the exponent byte into a
  float32's exponent field; exact in BF16. ``MXFP8``: E4M3 codes times that power of two.

Weights are read as (even-k, odd-k) pairs, the layout 4-bit formats are packed in; 8-bit formats load
both halves strided. Products are exact and accumulate in float32; BF16/FP16 activations use BF16
MMAs (``tl.dot``), float32 activations IEEE float32 dots, ``BLOCK_M == 1`` (decode of one token) FMA
reductions. Small M splits K across programs (``SPLIT_K``) so that enough programs stream the
weights, adding into a float32 buffer atomically. Results equal ``mopt.kernels.reference_formats``
up to float32 summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from mopt.kernels import triton_quant
from mopt.kernels.linear import LinearScheme, flatten_tokens, per_token_fp8, register_linear_kernel
from mopt.kernels.triton_gemm import _e2m1_pair, _num_sms, _output
from mopt.kernels.triton_linear import _CudaKernel
from mopt.quant.formats import int8, mx

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

FP8_BLOCK, INT4, INT8, NVFP4, MXFP4, MXFP8 = 0, 1, 2, 3, 4, 5  # the kernel's FORMAT, on the host
# The same values for the kernels: @triton.jit code may read only constexpr globals (the interpreter reads
# any, so only the compiler catches this: tests/kernels/hopper_compile.py).
_FP8_BLOCK, _INT4, _INT8, _NVFP4, _MXFP8 = (tl.constexpr(v) for v in (FP8_BLOCK, INT4, INT8, NVFP4, MXFP8))
GROUP_SCALED = (FP8_BLOCK, INT4)  # one scale per row and BLOCK_K-wide tile, applied to its partial product


@triton.jit
def _int4_pair(packed):
    """Signed nibbles of ``uint8 [BN, H]`` (element 2i low) as float32 (even, odd), by bit placement."""
    b = packed.to(tl.int32)
    lo = (((b & 0xF) ^ 8) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) - 1032.0
    hi = ((((b >> 4) & 0xF) ^ 8) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) - 1032.0
    return lo, hi


@triton.jit
def _scale_groups(values, scale, BLOCK_N: tl.constexpr, HALF_K: tl.constexpr, PAIRS: tl.constexpr):
    """``values [BN, H]`` (one parity) times ``scale [BN, H / PAIRS]``: PAIRS pairs share a scale."""
    v = tl.reshape(values, (BLOCK_N, HALF_K // PAIRS, PAIRS)) * scale[:, :, None]
    return tl.reshape(v, (BLOCK_N, HALF_K))


@triton.jit
def _e8m0_pairs(even, odd, s_ptr, rows, t, n_ok, K, BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                HALF_K: tl.constexpr):
    """Multiply (even, odd) values by their E8M0 power of two per 32 elements (16 pairs), made by placing
    the exponent byte (plus ``BIAS``, folded powers of two) into a float32's exponent field."""
    offs_s = t * (HALF_K // 16) + tl.arange(0, HALF_K // 16)
    e = tl.load(s_ptr + rows * (K // 32) + offs_s[None, :],
                mask=n_ok[:, None] & (offs_s < K // 32)[None, :], other=0).to(tl.int32)
    s = (tl.minimum(e + BIAS, 254) << 23).to(tl.float32, bitcast=True)
    return _scale_groups(even, s, BLOCK_N, HALF_K, 16), _scale_groups(odd, s, BLOCK_N, HALF_K, 16)


@triton.jit
def _decode(b_ptr, s_ptr, rows, offs_h, t, n_ok, K, FORMAT: tl.constexpr, FP4_GROUP: tl.constexpr,
            BLOCK_N: tl.constexpr, HALF_K: tl.constexpr):
    """Float32 values (even-k, odd-k) ``[BN, H]`` of the weight tile at pair indices ``offs_h``."""
    k_ok = n_ok[:, None] & (offs_h < K // 2)[None, :]
    if FORMAT == _FP8_BLOCK or FORMAT == _MXFP8:
        base = b_ptr + rows * K + 2 * offs_h[None, :]
        even = tl.load(base, mask=k_ok, other=0.0).to(tl.float32)
        odd = tl.load(base + 1, mask=k_ok, other=0.0).to(tl.float32)
        if FORMAT == _MXFP8:
            even, odd = _e8m0_pairs(even, odd, s_ptr, rows, t, n_ok, K, 0, BLOCK_N, HALF_K)
    elif FORMAT == _INT8:
        base = b_ptr + rows * K + 2 * offs_h[None, :]
        even = tl.load(base, mask=k_ok, other=0).to(tl.float32)
        odd = tl.load(base + 1, mask=k_ok, other=0).to(tl.float32)
    else:
        packed = tl.load(b_ptr + rows * (K // 2) + offs_h[None, :], mask=k_ok, other=0)
        if FORMAT == _INT4:
            even, odd = _int4_pair(packed)
        else:
            even, odd = _e2m1_pair(packed)  # values times 2**-14
            if FORMAT == _NVFP4:  # E4M3 scale per FP4_GROUP (16, or 32 for W4A8) elements
                PAIRS: tl.constexpr = FP4_GROUP // 2
                offs_s = t * (HALF_K // PAIRS) + tl.arange(0, HALF_K // PAIRS)
                s = tl.load(s_ptr + rows * (K // FP4_GROUP) + offs_s[None, :],
                            mask=n_ok[:, None] & (offs_s < K // FP4_GROUP)[None, :], other=0.0)
                s = s.to(tl.float32) * 16384.0
                even = _scale_groups(even, s, BLOCK_N, HALF_K, PAIRS)
                odd = _scale_groups(odd, s, BLOCK_N, HALF_K, PAIRS)
            else:  # MXFP4, the 2**14 folded into the exponent
                even, odd = _e8m0_pairs(even, odd, s_ptr, rows, t, n_ok, K, 14, BLOCK_N, HALF_K)
    return even, odd


@triton.jit
def _weight_only_kernel(a_ptr, b_ptr, s_ptr, r_ptr, x_scale_ptr, c_ptr, bias_ptr, M, N, K, stride_am, stride_cm,
                        num_groups, FORMAT: tl.constexpr, FP4_GROUP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                        HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                        DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = tl.program_id(2) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    rows = offs_n[:, None].to(tl.int64)
    if BLOCK_M == 1:
        acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first, last):
        offs_h = t * HALF_K + tl.arange(0, HALF_K)
        we, wo = _decode(b_ptr, s_ptr, rows, offs_h, t, n_ok, K, FORMAT, FP4_GROUP, BLOCK_N, HALF_K)
        k_ok = offs_h < K // 2
        if BLOCK_M == 1:
            xe = tl.load(a_ptr + 2 * offs_h, mask=k_ok, other=0.0).to(tl.float32)
            xo = tl.load(a_ptr + 2 * offs_h + 1, mask=k_ok, other=0.0).to(tl.float32)
            part1 = tl.sum(we * xe[None, :] + wo * xo[None, :], axis=1)
        else:
            a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + 2 * offs_h[None, :]
            a_mask = m_ok[:, None] & k_ok[None, :]
            ae = tl.load(a_rows, mask=a_mask, other=0.0)
            ao = tl.load(a_rows + 1, mask=a_mask, other=0.0)
            if DOT_F32:
                part = tl.dot(ae.to(tl.float32), tl.trans(we), input_precision="ieee")
                part = tl.dot(ao.to(tl.float32), tl.trans(wo), part, input_precision="ieee")
            else:
                part = tl.dot(ae.to(tl.bfloat16), tl.trans(we.to(tl.bfloat16)))
                part = tl.dot(ao.to(tl.bfloat16), tl.trans(wo.to(tl.bfloat16)), part)
        if FORMAT == _FP8_BLOCK or FORMAT == _INT4:  # BLOCK_K is the group: one scale per row and tile
            g = tl.load(s_ptr + offs_n.to(tl.int64) * num_groups + t, mask=n_ok, other=0.0)
            if BLOCK_M == 1:
                part1 = part1 * g
            else:
                part = part * g[None, :]
        if BLOCK_M == 1:
            acc1 += part1
        else:
            acc += part
    if BLOCK_M == 1:
        acc = acc1[None, :]
    if HAS_ROW_SCALE:  # weight rows' scale, times a static activation scale
        acc = acc * tl.load(r_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_X_SCALE:  # dynamic per-token activation scale
        acc = acc * tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        if tl.program_id(2) == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


DECODE_MAX_M = 16


def tiles(fmt: int, m: int, n: int, k: int, group: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by M bucket; group-scaled formats take one group per K tile.
    Not tuned on a GPU yet; float32 activations get half-size prefill tiles (their operands are twice
    as large in shared memory)."""
    block_k = group if fmt in GROUP_SCALED else 256
    if m == 1:
        return 1, (32 if n >= 16384 else 64), block_k, 4
    if m <= DECODE_MAX_M:
        return 16, 64, block_k, 4
    if dtype == torch.float32:
        return 64, 64, min(block_k, 128), 8
    return 64, 128, block_k, 8


def weight_only_gemm(x: torch.Tensor, fmt: int, weight: torch.Tensor, scale: torch.Tensor | None,
                     row_scale: torch.Tensor | None, bias: torch.Tensor | None, k: int, n: int, group: int = 0,
                     fp4_group: int = 16, x_scale: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for a canonical weight layout (see the module docstring). ``scale``: the weight's
    group / block scales; ``row_scale [N]`` and ``x_scale [M]`` multiply the result (epilogue)."""
    m = x.shape[0]
    out_dtype = out_dtype or x.dtype
    bm, bn, bk, warps = tiles(fmt, m, n, k, group, x.dtype)
    grid_m, grid_n = triton.cdiv(m, bm), triton.cdiv(n, bn)
    k_tiles = triton.cdiv(k, bk)
    split = 1
    if m <= DECODE_MAX_M and grid_m * grid_n < 2 * _num_sms(x.device):
        split = max(1, min(k_tiles // 2, triton.cdiv(2 * _num_sms(x.device), grid_m * grid_n)))
    out = _output(m, n, out_dtype, split, x.device)
    dummy = weight
    _weight_only_kernel[(grid_m, grid_n, split)](
        x, weight, scale if scale is not None else dummy, row_scale if row_scale is not None else dummy,
        x_scale if x_scale is not None else dummy, out, bias if bias is not None else dummy, m, n, k, x.stride(0),
        out.stride(0), scale.shape[-1] if scale is not None else 1, FORMAT=fmt, FP4_GROUP=fp4_group,
        HAS_ROW_SCALE=row_scale is not None, HAS_X_SCALE=x_scale is not None, HAS_BIAS=bias is not None,
        SPLIT_K=split, DOT_F32=INTERPRETED or x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps)
    return out.to(out_dtype) if out.dtype != out_dtype else out


# -- activations: what the kernel multiplies, exact in BF16 ----------------------------------------------

def _as_is(layer, x2):
    return x2, None


def _fp8_codes(layer, x2):
    """FP8 E4M3 codes (static per-tensor scale folded into the row scale, or per token)."""
    if layer.input_scale is not None:
        return triton_quant.fp8_static(x2, layer.input_scale).to(x2.dtype), None
    reduce_amax = getattr(layer, "reduce_token_amax", None)  # row-parallel: the whole row's amax
    q, scale = per_token_fp8(x2, reduce_amax) if reduce_amax is not None else triton_quant.fp8_per_token(x2)
    return q.to(x2.dtype), scale.reshape(-1)


def _int8_codes(layer, x2):
    return int8.quantize_static(x2, layer.input_scale).to(x2.dtype), None


def _mxfp8_values(layer, x2):
    return mx.fake_quantize_mxfp8(x2).to(x2.dtype), None


def _mxfp4_values(layer, x2):
    return mx.fake_quantize_mxfp4(x2).to(x2.dtype), None


@dataclass(frozen=True)
class SchemeSpec:
    """How a scheme runs on the kernel: weight FORMAT, activation step, the weight's per-row scale."""

    fmt: int
    activation: Callable = _as_is
    row_scale: Callable | None = None  # (layer) -> [N] float32
    static_input: bool = False  # the row scale also carries the static activation scale
    fp4_group: int = 16


def _rows(name):
    return lambda l: getattr(l, name)


S = LinearScheme
SCHEMES: dict[LinearScheme, SchemeSpec] = {
    S.FP8_BLOCK_WO: SchemeSpec(FP8_BLOCK),
    S.INT4_WO: SchemeSpec(INT4),
    S.INT8_WO: SchemeSpec(INT8, row_scale=_rows("weight_scale")),
    S.NVFP4_WO: SchemeSpec(NVFP4, row_scale=_rows("weight_scale_2")),
    S.MXFP4_WO: SchemeSpec(MXFP4),
    S.INT8_SQ: SchemeSpec(INT8, _int8_codes, _rows("weight_scale"), static_input=True),
    S.W4A8_NVFP4: SchemeSpec(NVFP4, _fp8_codes, _rows("weight_scale_2"), static_input=True, fp4_group=32),
    S.W4A8_MXFP4: SchemeSpec(MXFP4, _fp8_codes, static_input=True),
    S.MXFP8: SchemeSpec(MXFP8, _mxfp8_values),
    S.MXFP4: SchemeSpec(MXFP4, _mxfp4_values),
}


class TritonWeightOnlyKernel(_CudaKernel):
    """Weight-decoding GEMMs for every M (one token, decode batches, prefill MMA tiles): the weight-only
    schemes, and those whose activations are quantized to values exact in BF16 first (INT8 SmoothQuant,
    W4A8 NVFP4/MXFP4 with FP8 activations, MXFP8 and MXFP4 W4A4) by ``triton_quant`` or the torch
    reference quantizers on the GPU."""

    name, backend = "triton-weight-only", "triton"
    capability, capability_for = (8, 0), "BF16 tensor cores"
    schemes = tuple(SCHEMES)

    @classmethod
    def can_implement(cls, shape):
        ok, why = super().can_implement(shape)
        if ok and shape.in_features % 32:
            return False, f"K={shape.in_features} is not a multiple of 32"
        return ok, why

    def process_weights(self, layer) -> None:
        spec = SCHEMES[layer.linear_shape.scheme]
        k, n = layer.linear_shape.in_features, layer.linear_shape.out_features
        group = {FP8_BLOCK: 128, INT4: k // layer.weight_scale.shape[-1]}.get(spec.fmt, 0)
        if spec.fmt in GROUP_SCALED and (group % 32 or group > 256):
            raise ValueError(f"{getattr(layer, 'prefix', '')}: the weight-only kernel needs groups that are a "
                             f"multiple of 32 up to 256, got {group}")
        layer.wo_group = group
        layer.wo_scale = (layer.weight_scale.float().contiguous() if spec.fmt in GROUP_SCALED
                          else None if spec.fmt == INT8 else layer.weight_scale)
        rows = spec.row_scale(layer).float().reshape(-1).expand(n) if spec.row_scale is not None else None
        if spec.static_input and getattr(layer, "input_scale", None) is not None:
            rows = (rows if rows is not None else torch.ones(n, device=layer.weight.device)) * layer.input_scale.float()
        layer.wo_rows = rows.contiguous() if rows is not None else None

    def apply(self, layer, x, bias):
        spec = SCHEMES[layer.linear_shape.scheme]
        x2, restore = flatten_tokens(x)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        values, x_scale = spec.activation(layer, x2)
        y = weight_only_gemm(values, spec.fmt, layer.weight, layer.wo_scale, layer.wo_rows, bias,
                             layer.linear_shape.in_features, layer.linear_shape.out_features, layer.wo_group,
                             spec.fp4_group, x_scale, x.dtype)
        return restore(y)


register_linear_kernel("cuda", TritonWeightOnlyKernel)
