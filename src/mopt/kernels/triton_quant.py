"""Triton activation quantizers, bit-exact with ``mopt.quant.formats`` (one pass over the input).

* ``fp8_static``: ``e4m3(clamp(x / s))`` with a given per-tensor scale;
* ``int8_static``: ``clamp(round(x / s), -128, 127)`` with a given per-tensor scale (SmoothQuant),
  as int8 codes or as their values in the input's dtype (what the weight-only GEMM multiplies);
* ``fp8_per_token``: per-row scale ``amax / 448`` (1.0 for an all-zero row);
* ``fp8_groups``: per-row, per-128-column group scales (partial last group);
* ``nvfp4_packed`` / ``nvfp4_block_values``: 16-element blocks with E4M3 block scales under a given global scale; returns either
  the packed codes and block scales (the checkpoint layout) or the block values
  ``code value * block scale`` in BF16, which is exact and what the W4A4 GEMM consumes.

Rounding to E4M3 is done in float32 arithmetic before the cast (:func:`round_e4m3`), so the cast
itself is exact: Triton's interpreter rounds some values at binade edges wrongly, and this keeps one
code path for the interpreter and the GPU. Division is ``div_rn`` (IEEE), as torch divides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_pdl import launch_options, pdl_prologue

from mopt.quant.formats import fp8
from mopt.quant.formats import nvfp4 as nvfp4_format


@triton.jit
def round_e4m3(x):
    """Round float32 ``x`` (already within +-448) to the nearest E4M3 value, ties to even."""
    bits = x.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)  # subnormals share the smallest normal's spacing
    ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    t = tl.abs(x) / ulp  # exact: a power of two
    t = (t + 12582912.0) - 12582912.0  # 1.5 * 2**23: round to an integer, ties to even
    r = (t * ulp).to(tl.int32, bitcast=True)
    # The sign goes back as a bit, so values that round to zero keep it, as torch's cast does
    # (a float negation may be folded away by the GPU compiler for zeros).
    return (r | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _to_fp8(x, scale):
    y = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return round_e4m3(y).to(tl.float8e4nv)


@triton.jit
def _fp8_static_kernel(x_ptr, out_ptr, scale_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _to_fp8(x, tl.load(scale_ptr)), mask=mask)


@triton.jit
def _to_int8_value(x, scale):
    """``int8.quantize_static``'s code of float32 ``x`` as a float32 value."""
    y = tl.math.div_rn(x, scale)
    # Clamping to the integer bounds first gives what rounding first does, and keeps |y| < 2**22 for
    # the rounding trick below.
    y = tl.minimum(tl.maximum(y, -128.0), 127.0)
    y = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: round to an integer, ties to even (torch.round)
    # Through int32, so -0.0 (from -0.5 <= y < 0) becomes +0 as it does through torch's int8; then
    # through float32, since the interpreter converts int32 to bfloat16 wrongly.
    return y.to(tl.int32).to(tl.float32)


@triton.jit
def _int8_static_kernel(x_ptr, out_ptr, scale_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = _to_int8_value(x, tl.load(scale_ptr))
    tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """Float32 ``x`` rounded to ``DTYPE`` (to nearest, ties to even, as torch casts), as float32. BF16 by its bits:
    Triton's interpreter truncates in ``.to(tl.bfloat16)``."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _expert_static_kernel(x_ptr, experts_ptr, scale_ptr, smooth_ptr, out_ptr, out_scale_ptr, k, stride_x,
                          ROW_DIV: tl.constexpr, INT8: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr):
    """Row ``r`` of ``out``: row ``r // ROW_DIV`` of ``x``, times its expert's smoothing (``SMOOTH``, rounded
    to ``x``'s dtype as the reference multiplies), quantized under its expert's static scale; values in
    ``out``'s dtype, and that scale in ``out_scale[r]``."""
    pdl_prologue(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < k
    expert = tl.load(experts_ptr + row).to(tl.int64)
    x = tl.load(x_ptr + (row // ROW_DIV).to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if SMOOTH:  # in x's dtype: the smoothing rounded to it, then the product (exact in float32) rounded once
        smooth = tl.load(smooth_ptr + expert * k + cols, mask=mask, other=0.0)
        x = _round_to(x * _round_to(smooth, x_ptr.dtype.element_ty), x_ptr.dtype.element_ty)
    scale = tl.load(scale_ptr + expert)
    if INT8:
        q = _to_int8_value(x, scale)
    else:
        q = round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0))
    tl.store(out_ptr + row.to(tl.int64) * k + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    if tl.program_id(1) == 0:
        tl.store(out_scale_ptr + row, scale)


@triton.jit
def _fp8_per_token_kernel(x_ptr, out_ptr, scale_ptr, k, stride_x, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < k
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=0), 448.0)  # '/' by a constant becomes '* (1/448)'
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(out_ptr + row * k + cols, _to_fp8(x, scale), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _fp8_groups_kernel(x_ptr, out_ptr, scale_ptr, k, num_groups, stride_x, GROUP: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    mask = cols < k
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=0), 448.0)  # '/' by a constant becomes '* (1/448)'
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(out_ptr + row * k + cols, _to_fp8(x, scale), mask=mask)
    tl.store(scale_ptr + row * num_groups + g, scale)


@triton.jit
def _e2m1_code(v):
    """Magnitude code (0..7) of ``|v|`` on the E2M1 grid, ties to even code."""
    a = tl.abs(v)
    code = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) \
        + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    return code


@triton.jit
def _e2m1_value(code):
    """Value of a magnitude code 0..7: 0, .5, 1, 1.5, 2, 3, 4, 6."""
    e = code >> 1
    m = (code & 1).to(tl.float32)
    normal = (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32))
    return tl.where(e == 0, 0.5 * m, normal)


@triton.jit
def nvfp4_quantize_blocks(x, g):
    """``x`` float32 ``[R, 16]`` (one NVFP4 block per row) under global scale ``g`` -> ``(E2M1
    magnitude code int32 [R, 16], negative [R, 16], E4M3 block scale float32 [R])``, as
    ``nvfp4.quantize`` (a negative value that rounds to zero keeps its sign bit)."""
    s = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 6.0 * g)
    s = tl.where(s == 0, 1.0, s)
    s = round_e4m3(tl.minimum(tl.maximum(s, 0.001953125), 448.0))  # clamp to [2**-9, 448]
    scaled = tl.math.div_rn(x, (s * g)[:, None])
    return _e2m1_code(scaled), scaled < 0, s


@triton.jit
def nvfp4_block_value(code, negative, s):
    """Exact block value ``+-E2M1(code) * s`` (``s [R]`` broadcast over ``code [R, 16]``)."""
    value = _e2m1_value(code) * s[:, None]
    return tl.where(negative, -value, value)


@triton.jit
def _nvfp4_kernel(x_ptr, packed_ptr, scale_ptr, values_ptr, g_ptr, g_index_ptr, k, kp, stride_x,
                  BLOCKS: tl.constexpr, WRITE_VALUES: tl.constexpr, X_ROW_DIV: tl.constexpr = 1,
                  G_PER_ROW: tl.constexpr = False, G_INDEX: tl.constexpr = False, PDL: tl.constexpr = False):
    """One program per (output row, BLOCKS x 16 columns). ``kp``: K padded to 16. Output row ``r``
    quantizes input row ``r // X_ROW_DIV`` under global scale ``g[index[r]]`` (``G_INDEX``),
    ``g[r]`` (``G_PER_ROW``) or ``g[0]``."""
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    cols = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
    x = tl.load(x_ptr + (row // X_ROW_DIV) * stride_x + cols, mask=cols < k, other=0.0).to(tl.float32)
    if G_INDEX:
        g = tl.load(g_ptr + tl.load(g_index_ptr + row))
    elif G_PER_ROW:
        g = tl.load(g_ptr + row)
    else:
        g = tl.load(g_ptr)
    code, negative, s = nvfp4_quantize_blocks(x, g)
    bmask = blk < kp // 16
    if WRITE_VALUES:
        tl.store(values_ptr + row * kp + cols, nvfp4_block_value(code, negative, s).to(tl.bfloat16),
                 mask=bmask[:, None])
    else:
        code = code | tl.where(negative, 8, 0)
        pairs = tl.reshape(code, (BLOCKS, 8, 2))
        lo, hi = tl.split(pairs)
        byte = (lo | (hi << 4)).to(tl.uint8)
        bcols = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
        tl.store(packed_ptr + row * (kp // 2) + bcols, byte, mask=bmask[:, None])
        tl.store(scale_ptr + row * (kp // 16) + blk, s.to(tl.float8e4nv), mask=bmask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=fp8.FP8_DTYPE, device=x.device)
    n = x.numel()
    block = 1024
    _fp8_static_kernel[(triton.cdiv(n, block),)](x, out, scale.float().reshape(1), n, BLOCK=block,
                                                  **launch_options(x.device))
    return out


def int8_static(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """``int8.quantize_static(x, scale).to(out_dtype)`` for a per-tensor ``scale`` (one element), in one
    pass: ``out_dtype`` int8 gives the codes, a float dtype their (exact) values."""
    if scale.numel() != 1:
        raise ValueError(f"int8_static needs one per-tensor scale, got shape {tuple(scale.shape)}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n = x.numel()
    block = 1024
    if n:
        _int8_static_kernel[(triton.cdiv(n, block),)](x, out, scale.float().reshape(1), n, BLOCK=block,
                                                       **launch_options(x.device))
    return out


def expert_static_values(x: torch.Tensor, experts: torch.Tensor, scale: torch.Tensor,
                         smoothing: torch.Tensor | None, int8: bool, row_div: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations quantized under a static scale per expert, one launch: row ``r`` is row ``r // row_div`` of
    ``x [T, K]`` (a token's ``row_div`` routed pairs), times ``smoothing[experts[r]]`` (``[E, K]``, SmoothQuant)
    in ``x``'s dtype, then ``int8.quantize_static`` (``int8``) or ``fp8.quantize`` under ``scale[experts[r]]``
    (``scale [E]``). Returns ``(values [R, K]`` in ``x``'s dtype, exact, ``scales [R]`` float32), bit-equal to
    those quantizers on ``x.repeat_interleave(row_div, 0)``."""
    x2 = _rows(x)
    rows, k = experts.numel(), x2.shape[-1]
    out = torch.empty((rows, k), dtype=x2.dtype, device=x2.device)
    scales = torch.empty(rows, dtype=torch.float32, device=x2.device)
    if rows:
        block = min(1024, triton.next_power_of_2(k))
        _expert_static_kernel[(rows, triton.cdiv(k, block))](
            x2, experts.reshape(-1), scale.float().reshape(-1).contiguous(),
            smoothing.float().contiguous() if smoothing is not None else scales, out, scales, k, x2.stride(0),
            ROW_DIV=row_div, INT8=int8, SMOOTH=smoothing is not None, BLOCK=block, **launch_options(x2.device))
    return out, scales


def fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [M, K], scale [M, 1])`` for ``x [..., K]`` flattened to rows."""
    x2 = _rows(x)
    m, k = x2.shape
    out = torch.empty((m, k), dtype=fp8.FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        # One program per row holds the whole row: enough warps that each thread keeps ~16 values
        # (a 14336-wide row on 4 warps spills and took 10 us alone at M=1).
        warps = min(32, max(4, block // 512))
        _fp8_per_token_kernel[(m,)](x2, out, scale, k, x2.stride(0), BLOCK_K=block, num_warps=warps,
                                    **launch_options(x.device))
    return out, scale


def fp8_groups(x: torch.Tensor, group: int = fp8.GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [M, K], scale [M, ceil(K/group)])``."""
    x2 = _rows(x)
    m, k = x2.shape
    num_groups = triton.cdiv(k, group)
    out = torch.empty((m, k), dtype=fp8.FP8_DTYPE, device=x.device)
    scale = torch.empty((m, num_groups), dtype=torch.float32, device=x.device)
    if m:
        _fp8_groups_kernel[(m, num_groups)](x2, out, scale, k, num_groups, x2.stride(0), GROUP=group,
                                            **launch_options(x.device))
    return out, scale


_NVFP4_BLOCKS = 16  # 16-element blocks per program: 256 columns


def nvfp4_packed(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [M, Kp/2], block_scale e4m3 [M, Kp/16])`` as ``nvfp4.quantize`` (packed codes and block scales)."""
    x2 = _rows(x)
    m, k = x2.shape
    kp = triton.cdiv(k, nvfp4_format.BLOCK_SIZE) * nvfp4_format.BLOCK_SIZE
    packed = torch.empty((m, kp // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m, kp // 16), dtype=fp8.FP8_DTYPE, device=x.device)
    if m:
        grid = (m, triton.cdiv(kp // 16, _NVFP4_BLOCKS))
        _nvfp4_kernel[grid](x2, packed, scale, packed, global_scale.float().reshape(1), packed, k, kp, x2.stride(0),
                            BLOCKS=_NVFP4_BLOCKS, WRITE_VALUES=False, **launch_options(x.device))
    return packed, scale


def nvfp4_block_values(x: torch.Tensor, global_scale: torch.Tensor, repeat: int = 1,
                       index: torch.Tensor | None = None) -> torch.Tensor:
    """BF16 ``[M * repeat, Kp]``: each element's E2M1 value times its E4M3 block scale (exact), i.e.
    ``nvfp4.dequantize_to_block_values(*nvfp4.quantize(x, global_scale))``.

    ``global_scale`` is a scalar, one per output row (``[M * repeat]``), or, with ``index``
    (``[M * repeat]`` integers), a table that output row ``r`` reads at ``index[r]``; output row
    ``r`` is input row ``r // repeat`` (fused MoE quantizes each token once per routed expert,
    under that expert's input scale)."""
    x2 = _rows(x)
    m, k = x2.shape
    rows = m * repeat
    per_row = index is None and global_scale.numel() > 1
    count = index.numel() if index is not None else global_scale.numel()
    if (index is not None or per_row) and count != rows:
        what = "indices" if index is not None else "global scales"
        raise ValueError(f"nvfp4_block_values: {count} {what} for {rows} rows")
    kp = triton.cdiv(k, nvfp4_format.BLOCK_SIZE) * nvfp4_format.BLOCK_SIZE
    values = torch.empty((rows, kp), dtype=torch.bfloat16, device=x.device)
    if rows:
        g = global_scale.reshape(-1)
        g = g if g.dtype == torch.float32 and g.is_contiguous() else g.float().contiguous()
        grid = (rows, triton.cdiv(kp // 16, _NVFP4_BLOCKS))
        _nvfp4_kernel[grid](x2, values, values, values, g, index.reshape(-1) if index is not None else g, k, kp,
                            x2.stride(0), BLOCKS=_NVFP4_BLOCKS, WRITE_VALUES=True, X_ROW_DIV=repeat,
                            G_PER_ROW=per_row, G_INDEX=index is not None, **launch_options(x.device))
    return values
