"""Reference GEMMs of the weight-only, INT8 and microscaling schemes (see ``mopt.kernels.linear``).

Every scheme here is one computation with three format-specific steps, declared as data in
:data:`SCHEMES`:

* the activations: unquantized, or quantized exactly as a GPU kernel quantizes them, giving
  float32 values and an optional per-row or per-tensor scale applied after the GEMM;
* the weight's float32 *values*: codes, or codes times a scale that keeps them exact;
* the weight's scales: per K group applied to each group's partial product (INT4 groups, FP8
  128x128 blocks), and/or per output row applied after the GEMM.

``y = sum_g (x_values[:, g] @ w_values[:, g]^T) * group_scale[:, g]`` (one group when there is no
group scale), times the row scale and the activation scale. Float32 throughout; weights a kernel
stored pre-decoded (float16/float32 values, ``CpuDecodedLinearKernel``) are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mopt.kernels.linear import LinearScheme, flatten_tokens, per_token_fp8
from mopt.quant.formats import fp8, int4, int8, mx, nvfp4

S = LinearScheme
_DECODED = (torch.float16, torch.float32, torch.bfloat16)

Activation = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _unquantized(layer, x2):
    return x2.float(), None


def _fp8_static_or_per_token(layer, x2):
    scale = getattr(layer, "input_scale", None)
    if scale is None:  # per token; a row-parallel layer's token amax is the whole row's
        q, s = per_token_fp8(x2, getattr(layer, "reduce_token_amax", None))
        return fp8.to_float32(q), s
    return fp8.to_float32(fp8.quantize(x2, scale)), scale.float()


def _int8_static(layer, x2):
    return int8.quantize_static(x2, layer.input_scale).float(), layer.input_scale.float()


def _mxfp8(layer, x2):
    return mx.fake_quantize_mxfp8(x2), None


def _mxfp4(layer, x2):
    return mx.fake_quantize_mxfp4(x2), None


@dataclass(frozen=True)
class GemmSpec:
    """How one scheme computes (see the module docstring)."""

    activation: Activation
    weight_values: Callable[[torch.nn.Module], torch.Tensor]  # float32 [N, K] from the canonical weight
    group_scale: Callable[[torch.nn.Module], torch.Tensor] | None = None  # [N, groups]
    group_size: Callable[[torch.nn.Module], int] | None = None
    row_scale: Callable[[torch.nn.Module], torch.Tensor] | None = None  # [N]
    exact_in_fp16: bool = True  # decoded values always fit float16 exactly (else checked per layer)


def _nvfp4_values(block: int):
    return lambda l: nvfp4.dequantize_to_block_values(l.weight, l.weight_scale, block)[:, : l.linear_shape.in_features]


SCHEMES: dict[LinearScheme, GemmSpec] = {
    S.FP8_BLOCK_WO: GemmSpec(_unquantized, lambda l: fp8.to_float32(l.weight), lambda l: l.weight_scale,
                             lambda l: fp8.BLOCK_SHAPE[1]),
    S.INT4_WO: GemmSpec(_unquantized, lambda l: int4.unpack_k(l.weight).float(), lambda l: l.weight_scale,
                        lambda l: l.linear_shape.in_features // l.weight_scale.shape[-1]),
    S.INT8_WO: GemmSpec(_unquantized, lambda l: l.weight.float(), row_scale=lambda l: l.weight_scale),
    S.INT8_SQ: GemmSpec(_int8_static, lambda l: l.weight.float(), row_scale=lambda l: l.weight_scale),
    S.MXFP8: GemmSpec(_mxfp8, lambda l: mx.dequantize_mxfp8(l.weight, l.weight_scale), exact_in_fp16=False),
    S.MXFP4: GemmSpec(_mxfp4, lambda l: mx.dequantize_mxfp4(l.weight, l.weight_scale), exact_in_fp16=False),
    S.MXFP4_WO: GemmSpec(_unquantized, lambda l: mx.dequantize_mxfp4(l.weight, l.weight_scale), exact_in_fp16=False),
    S.W4A8_MXFP4: GemmSpec(_fp8_static_or_per_token, lambda l: mx.dequantize_mxfp4(l.weight, l.weight_scale),
                           exact_in_fp16=False),
    S.NVFP4_WO: GemmSpec(_unquantized, _nvfp4_values(nvfp4.BLOCK_SIZE), row_scale=lambda l: l.weight_scale_2),
    S.W4A8_NVFP4: GemmSpec(_fp8_static_or_per_token, _nvfp4_values(mx.BLOCK_SIZE), row_scale=lambda l: l.weight_scale_2),
}


def weight_values(layer: torch.nn.Module) -> torch.Tensor:
    """Float32 weight values ``[N, K]`` the scheme's GEMM multiplies (pre-decoded weights as stored)."""
    if layer.weight.dtype in _DECODED:
        return layer.weight.float()
    return SCHEMES[layer.linear_shape.scheme].weight_values(layer)


def gemm(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    spec = SCHEMES[layer.linear_shape.scheme]
    x2, restore = flatten_tokens(x)
    xv, x_scale = spec.activation(layer, x2)
    wv = weight_values(layer)
    if spec.group_scale is None:
        y = xv @ wv.t()
    else:
        scale, group, k = spec.group_scale(layer).float(), spec.group_size(layer), xv.shape[-1]
        y = torch.zeros((xv.shape[0], wv.shape[0]), dtype=torch.float32, device=x.device)
        for g, start in enumerate(range(0, k, group)):
            cols = slice(start, min(start + group, k))
            y += (xv[:, cols] @ wv[:, cols].t()) * scale[:, g].unsqueeze(0)
    if spec.row_scale is not None:
        y = y * spec.row_scale(layer).float().unsqueeze(0)
    if x_scale is not None:
        y = y * x_scale
    if bias is not None:
        y = y + bias.float()
    return restore(y.to(x.dtype))


def decode_for_cpu(layer: torch.nn.Module) -> torch.Tensor:
    """The weight values stored once for the CPU backend: float16 where that is exact, else float32."""
    values = weight_values(layer)
    if SCHEMES[layer.linear_shape.scheme].exact_in_fp16:
        return values.to(torch.float16)
    half = values.to(torch.float16)
    return half if torch.equal(half.float(), values) else values
