"""Triton glue kernels beside their torch references in ``kernels.glue``: RMSNorm with the residual
add, the SiLU-gated product, and one rank's rows of a vocabulary-parallel embedding (a copy, bit for
bit the reference's). One pass over the activations each; the first two can write E4M3 codes
under the next GEMM's static input scale, or NVFP4 block values under its global input scale
(``kernels.quantized_input``), instead of its output, so that GEMM needs no quantization pass.

Rounding follows the references step by step: the residual sum is rounded to the activation dtype
before it is normalized, the normalized value times the weight is rounded once, the SiLU is rounded
to the dtype before it multiplies ``up``; E4M3 codes quantize the rounded output exactly as
``triton_quant.fp8_static`` does, NVFP4 block values as ``triton_quant.nvfp4_block_values`` does.
Reductions (the mean square) sum in another order than torch, and ``exp``/``rsqrt`` are the GPU's
approximations, so results may differ from the reference by a last-place rounding of the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mopt.kernels.quantized_input import check_output_format, mark_nvfp4_block_values
from mopt.kernels.triton_pdl import launch_options, pdl_prologue
from mopt.kernels.triton_quant import _to_fp8, nvfp4_block_value, nvfp4_quantize_blocks
from mopt.quant.formats import fp8

TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _store_out(ptr, y, scale_ptr, mask, FP8_OUT: tl.constexpr, NVFP4_OUT: tl.constexpr = False):
    """Store ``y``, or its E4M3 codes under the scale at ``scale_ptr`` (``FP8_OUT``), or its NVFP4 block
    values in BF16 under the global scale there (``NVFP4_OUT``: the tile's last axis holds whole 16-element
    blocks from a multiple of 16; masked elements are zeros, which change no block's maximum)."""
    if FP8_OUT:
        tl.store(ptr, _to_fp8(y.to(tl.float32), tl.load(scale_ptr)), mask=mask)
    elif NVFP4_OUT:
        blocks = tl.reshape(tl.where(mask, y.to(tl.float32), 0.0), (y.numel // 16, 16))
        code, negative, s = nvfp4_quantize_blocks(blocks, tl.load(scale_ptr))
        values = tl.reshape(nvfp4_block_value(code, negative, s), y.shape)
        tl.store(ptr, values.to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptr, y, mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, stride_x, stride_r, n, eps,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr, NVFP4_OUT: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(dtype)
        tl.store(res_out_ptr + row * n + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    _store_out(out_ptr + row * n + cols, (w * (x * rstd)).to(dtype), scale_ptr, mask, FP8_OUT, NVFP4_OUT)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, scale_ptr, stride_x, n, BLOCK: tl.constexpr, FP8_OUT: tl.constexpr,
                     NVFP4_OUT: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    _store_out(out_ptr + row * n + cols, (silu * up).to(dtype), scale_ptr, mask, FP8_OUT, NVFP4_OUT)


@triton.jit
def _vocab_rows_kernel(ids_ptr, w_ptr, out_ptr, start, count, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    local = tl.load(ids_ptr + token).to(tl.int64) - start
    inside = (local >= 0) & (local < count)
    width = tl.where(inside, n, 0)  # columns to read: none for an id outside this rank's rows
    row = tl.load(w_ptr + tl.where(inside, local, 0) * n + cols, mask=cols < width, other=0.0)
    tl.store(out_ptr + token * n + cols, row, mask=cols < n)


def _warps(block: int, quantized) -> int:
    """About 16 elements a thread; 8 when the output is quantized (an IEEE division per element made the
    FP8 RMSNorm 45% slower than the BF16 one at one 4096-wide row on an H100)."""
    return min(32, max(1, block // (256 if quantized is not None else 512)))


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def output_format(n: int, dtype: torch.dtype, fp8_scale: torch.Tensor | None, nvfp4_scale: torch.Tensor | None,
                  who: str) -> tuple[torch.dtype, torch.Tensor | None]:
    """``(output dtype, the scale the kernel reads)`` of a producer of ``n`` columns in ``dtype``: E4M3 codes
    under ``fp8_scale``, BF16 NVFP4 block values under ``nvfp4_scale`` (``n`` a multiple of 16), or ``dtype``."""
    check_output_format(n, fp8_scale, nvfp4_scale, who)
    if nvfp4_scale is not None:
        return torch.bfloat16, nvfp4_scale
    return (fp8.FP8_DTYPE, fp8_scale) if fp8_scale is not None else (dtype, None)


def marked(out: torch.Tensor, nvfp4_scale: torch.Tensor | None) -> torch.Tensor:
    """A producer's output, marked as block values when it wrote them (``nvfp4_scale`` given)."""
    return mark_nvfp4_block_values(out) if nvfp4_scale is not None else out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             fp8_scale: torch.Tensor | None = None,
             nvfp4_scale: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * x / rms(x)``; with ``residual``, of ``x + residual``, returning ``(normed, x + residual)``.
    With ``fp8_scale`` the normed output is E4M3 codes under that static scale; with ``nvfp4_scale``,
    marked NVFP4 block values under that global scale (``kernels.quantized_input``)."""
    x2 = _rows(x)
    m, n = x2.shape
    out_dtype, scale = output_format(n, x.dtype, fp8_scale, nvfp4_scale, "rms_norm")
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    r2 = _rows(residual) if residual is not None else x2
    res_out = torch.empty((m, n), dtype=x.dtype, device=x.device) if residual is not None else x2
    if m:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(m,)](x2, r2, weight, out, res_out, scale if scale is not None else weight,
                               x2.stride(0), r2.stride(0), n, eps, BLOCK=block, HAS_RESIDUAL=residual is not None,
                               FP8_OUT=fp8_scale is not None, NVFP4_OUT=nvfp4_scale is not None,
                               num_warps=_warps(block, scale), **launch_options(x.device))
    normed = marked(out.view(x.shape), nvfp4_scale)
    if residual is None:
        return normed
    return normed, res_out.view(x.shape)


def silu_mul(x: torch.Tensor, fp8_scale: torch.Tensor | None = None,
             nvfp4_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``x [..., 2I]`` = ``[gate | up]`` -> ``[..., I]`` (E4M3 codes under ``fp8_scale``,
    or marked NVFP4 block values under ``nvfp4_scale``)."""
    x2 = _rows(x)
    m, n2 = x2.shape
    n = n2 // 2
    out_dtype, scale = output_format(n, x.dtype, fp8_scale, nvfp4_scale, "silu_mul")
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(m, triton.cdiv(n, block))](x2, out, scale if scale is not None else x2,
                                                     x2.stride(0), n, BLOCK=block, FP8_OUT=fp8_scale is not None,
                                                     NVFP4_OUT=nvfp4_scale is not None,
                                                     num_warps=_warps(block, scale), **launch_options(x.device))
    return marked(out.view(*x.shape[:-1], n), nvfp4_scale)


def vocab_rows(ids: torch.Tensor, weight: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``glue.vocab_rows_reference`` in one kernel (it replaces six elementwise launches a decode step):
    ``weight [rows, n]`` contiguous, ``ids`` any integer shape."""
    n = weight.shape[-1]
    flat = ids.reshape(-1)
    out = torch.empty((flat.numel(), n), dtype=weight.dtype, device=weight.device)
    if flat.numel():
        block = min(1024, triton.next_power_of_2(n))
        _vocab_rows_kernel[(flat.numel(), triton.cdiv(n, block))](
            flat, weight.contiguous(), out, start, count, n, BLOCK=block, num_warps=4,
            **launch_options(weight.device))
    return out.view(*ids.shape, n)
