"""One Triton kernel family that decodes weights in registers: FP8 128x128 blocks, INT4 groups, INT8 channels,
NVFP4, MXFP4 and MXFP8 weights (``triton_weight_decode`` says how each decodes), times activations that
are unquantized (the weight-only schemes) or already quantized to values exact in BF16 (INT8 SmoothQuant
and W4A8's FP8 codes, their scale in the epilogue; MXFP8 / MXFP4 values).

Three paths by the number of tokens M:

* M == 1: ``triton_weight_gemv`` streams the stored weights once (FMA reductions, no split K);
* 2 <= M <= ``MMA_MAX_M``, and any M for group-scaled formats: ``triton_weight_prefill.wo_mma``, BF16
  MMAs on weights decoded in registers (K split across programs when few output tiles would stream
  the weights);
* larger M: ``triton_weight_prefill.expanded_gemm``: weights expanded once for cuBLAS (their values are
  exact in BF16).

Products are exact and accumulate in float32 (float32 activations: IEEE float32 dots). Results equal
``mopt.kernels.reference_formats`` up to float32 rounding order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from mopt.kernels import triton_quant, triton_quant_mx
from mopt.kernels.linear import LinearScheme, flatten_tokens, layer_per_token_fp8, register_linear_kernel
from mopt.kernels.triton_linear import _CudaKernel
from mopt.kernels.triton_weight_decode import FP8_BLOCK, GROUP_SCALED, INT4, INT8, MXFP4, MXFP8, NVFP4
from mopt.kernels.triton_weight_gemv import weight_gemv
from mopt.kernels.triton_weight_prefill import expanded_gemm, wo_mma

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
__all__ = ["FP8_BLOCK", "INT4", "INT8", "NVFP4", "MXFP4", "MXFP8", "weight_only_gemm", "TritonWeightOnlyKernel"]


MMA_MAX_M = 256  # above: expanding the weights once for cuBLAS costs less than decoding them per tile


def weight_only_gemm(x: torch.Tensor, fmt: int, weight: torch.Tensor, scale: torch.Tensor | None,
                     row_scale: torch.Tensor | None, bias: torch.Tensor | None, k: int, n: int, group: int = 0,
                     fp4_group: int = 16, x_scale: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for a canonical weight layout (see the module docstring). ``scale``: the weight's
    group / block scales; ``row_scale [N]`` and ``x_scale [M]`` multiply the result (epilogue)."""
    m = x.shape[0]
    out_dtype = out_dtype or x.dtype
    if m == 1:
        return weight_gemv(x, fmt, weight, scale, row_scale, bias, n, k, group, fp4_group, x_scale, out_dtype)
    if m <= MMA_MAX_M or fmt in GROUP_SCALED:
        return wo_mma(x, fmt, weight, scale, row_scale, bias, n, k, group, fp4_group, x_scale, out_dtype,
                      INTERPRETED)
    return expanded_gemm(x, fmt, weight, scale, row_scale, bias, n, k, fp4_group, x_scale, out_dtype)


# -- activations: what the kernel multiplies, exact in BF16 ----------------------------------------------

def _as_is(layer, x2):
    return x2, None


def _fp8_codes(layer, x2):
    """FP8 E4M3 codes (static per-tensor scale folded into the row scale, or per token)."""
    if layer.input_scale is not None:
        return triton_quant.fp8_static(x2, layer.input_scale).to(x2.dtype), None
    q, scale = layer_per_token_fp8(layer, x2, triton_quant.fp8_per_token)
    return q.to(x2.dtype), scale.reshape(-1)


def _int8_codes(layer, x2):
    """INT8 codes under the static per-tensor scale (folded into the row scale), as ``x2.dtype`` values."""
    return triton_quant.int8_static(x2, layer.input_scale, x2.dtype), None


def _mxfp8_values(layer, x2):
    return triton_quant_mx.mxfp8_values(x2), None


def _mxfp4_values(layer, x2):
    return triton_quant_mx.mxfp4_values(x2), None


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
    W4A8 NVFP4/MXFP4 with FP8 activations, MXFP8 and MXFP4 W4A4) by ``triton_quant`` /
    ``triton_quant_mx``, one launch each, bit-exact with the reference quantizers."""

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
