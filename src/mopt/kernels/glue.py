"""Glue between the GEMMs: RMSNorm (optionally with the residual add), the SiLU-gated product, and the
vocabulary-parallel embedding's lookup of one rank's rows.

The torch functions here are the references (CPU, and any device with ``MOPT_BACKEND=reference``);
on CUDA the same calls run the one-pass Triton kernels of ``kernels.triton_glue``. With
``fp8_scale`` (the next GEMM's static input scale, when its kernel takes E4M3 input) the output is
``e4m3(y / fp8_scale)`` of the output ``y`` in the activation dtype: what that GEMM would compute.
With ``nvfp4_scale`` (the next GEMM's global input scale, when its kernel takes NVFP4 block values) it
is ``y``'s block values under that scale, in BF16, marked (``kernels.quantized_input``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from mopt.kernels.linear import BACKEND_ENV
from mopt.kernels.quantized_input import check_output_format, mark_nvfp4_block_values
from mopt.quant.formats import fp8, nvfp4


def _quantized(y: torch.Tensor, fp8_scale: torch.Tensor | None, nvfp4_scale: torch.Tensor | None,
               who: str) -> torch.Tensor:
    check_output_format(y.shape[-1], fp8_scale, nvfp4_scale, who)
    if nvfp4_scale is not None:
        values = nvfp4.dequantize_to_block_values(*nvfp4.quantize(y, nvfp4_scale))
        return mark_nvfp4_block_values(values.to(torch.bfloat16))
    return y if fp8_scale is None else fp8.quantize(y, fp8_scale)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                       fp8_scale: torch.Tensor | None = None, nvfp4_scale: torch.Tensor | None = None):
    """``weight * x / rms(x)`` in float32, rounded to ``x``'s dtype once; with ``residual``, normalizes
    ``s = x + residual`` (rounded to the dtype first) and returns ``(normed, s)``."""
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    xf = x.float()
    y = (weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(dtype)
    y = _quantized(y, fp8_scale, nvfp4_scale, "rms_norm")
    return y if residual is None else (y, residual)


def silu_mul_reference(x: torch.Tensor, fp8_scale: torch.Tensor | None = None,
                       nvfp4_scale: torch.Tensor | None = None) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return _quantized(nn.functional.silu(gate) * up, fp8_scale, nvfp4_scale, "silu_mul")


def _triton_glue(x: torch.Tensor):
    if not x.is_cuda or os.environ.get(BACKEND_ENV) == "reference":
        return None
    try:
        from mopt.kernels import triton_glue
    except ImportError:
        return None
    return triton_glue


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             fp8_scale: torch.Tensor | None = None, nvfp4_scale: torch.Tensor | None = None):
    kernels = _triton_glue(x)
    if kernels is None:
        return rms_norm_reference(x, weight, eps, residual, fp8_scale, nvfp4_scale)
    return kernels.rms_norm(x, weight, eps, residual, fp8_scale, nvfp4_scale)


def silu_mul(x: torch.Tensor, fp8_scale: torch.Tensor | None = None,
             nvfp4_scale: torch.Tensor | None = None) -> torch.Tensor:
    kernels = _triton_glue(x)
    if kernels is None:
        return silu_mul_reference(x, fp8_scale, nvfp4_scale)
    return kernels.silu_mul(x, fp8_scale, nvfp4_scale)


def vocab_rows_reference(ids: torch.Tensor, weight: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``[..., hidden]``: row ``ids - start`` of ``weight`` for ids in ``[start, start + count)``, zeros (+0.0)
    for the others (one rank's share of a vocabulary-parallel embedding)."""
    local = ids - start
    outside = (local < 0) | (local >= count)
    return nn.functional.embedding(local.masked_fill(outside, 0), weight).masked_fill(outside[..., None], 0)


def vocab_rows(ids: torch.Tensor, weight: torch.Tensor, start: int, count: int) -> torch.Tensor:
    kernels = _triton_glue(weight)
    if kernels is None:
        return vocab_rows_reference(ids, weight, start, count)
    return kernels.vocab_rows(ids, weight, start, count)


def all_reduce_rms_norm_reference(partials: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor,
                                  eps: float, fp8_scale: torch.Tensor | None = None,
                                  nvfp4_scale: torch.Tensor | None = None):
    """The reference of ``triton_allreduce_norm``: the ranks' partial sums added in rank order in float32
    and rounded to their dtype once, then :func:`rms_norm_reference` with ``residual``: ``(normed, s)``,
    ``s`` the rounded sum itself where there is no residual."""
    total = partials[0].float()
    for p in partials[1:]:
        total = total + p.float()
    total = total.to(partials[0].dtype)
    if residual is None:
        return rms_norm_reference(total, weight, eps, None, fp8_scale, nvfp4_scale), total
    return rms_norm_reference(total, weight, eps, residual, fp8_scale, nvfp4_scale)
