"""The reference backend: exact format numerics in float32 on any device.

Activations are quantized by the reference formats exactly as a GPU kernel quantizes them.
GEMMs accumulate in float32 with the scales applied where a kernel applies them: per-tensor and
per-channel/per-token scales after the full-K product (the epilogue), block scales after each
128-wide K block, and NVFP4's two global scales after the product of the block-scaled values
(which are exact in float32).
"""

from __future__ import annotations

import torch

from mopt.kernels.linear import (
    LinearKernel,
    LinearScheme,
    LinearShape,
    flatten_tokens,
    register_linear_kernel,
)
from mopt.quant.formats import fp8, nvfp4


def _finish(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def fp8_tensor_gemm(x, weight, weight_scale, input_scale, bias=None):
    x2, restore = flatten_tokens(x)
    xq = fp8.quantize(x2, input_scale)
    acc = xq.float() @ weight.float().t()
    y = acc * (input_scale.float() * weight_scale.float())
    return restore(_finish(y, bias, x.dtype))


def fp8_channel_token_gemm(x, weight, weight_scale, bias=None):
    x2, restore = flatten_tokens(x)
    xq, x_scale = fp8.quantize_per_token(x2)
    acc = xq.float() @ weight.float().t()
    y = acc * x_scale * weight_scale.float().unsqueeze(0)
    return restore(_finish(y, bias, x.dtype))


def fp8_block_gemm(x, weight, weight_scale, bias=None, group: int = fp8.GROUP_SIZE):
    """``weight_scale`` is row-expanded ``[N, ceil(K/group)]`` (see kernels.linear)."""
    x2, restore = flatten_tokens(x)
    xq, x_scale = fp8.quantize_groups(x2, group)
    k = x2.shape[-1]
    y = torch.zeros((x2.shape[0], weight.shape[0]), dtype=torch.float32, device=x.device)
    for kb, start in enumerate(range(0, k, group)):
        cols = slice(start, min(start + group, k))
        partial = xq[:, cols].float() @ weight[:, cols].float().t()
        y += partial * x_scale[:, kb : kb + 1] * weight_scale[:, kb].float().unsqueeze(0)
    return restore(_finish(y, bias, x.dtype))


def nvfp4_gemm(x, weight, weight_scale, weight_scale_2, input_scale, bias=None):
    x2, restore = flatten_tokens(x)
    k = x2.shape[-1]
    xq, x_block_scale = nvfp4.quantize(x2, input_scale)
    xv = nvfp4.dequantize_to_block_values(xq, x_block_scale)[:, :k]
    wv = nvfp4.dequantize_to_block_values(weight, weight_scale)[:, :k]
    acc = xv @ wv.t()
    y = acc * (input_scale.float() * weight_scale_2.float()).unsqueeze(0)
    return restore(_finish(y, bias, x.dtype))


def unquantized_gemm(x, weight, bias=None):
    y = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y


class ReferenceLinearKernel(LinearKernel):
    name = "reference"
    backend = "reference"

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def can_implement(cls, shape: LinearShape) -> tuple[bool, str]:
        return True, ""

    def apply(self, layer, x, bias):
        return _GEMM_BY_SCHEME[layer.linear_shape.scheme](layer, x, bias)


_GEMM_BY_SCHEME = {
    LinearScheme.UNQUANTIZED: lambda l, x, b: unquantized_gemm(x, l.weight, b),
    LinearScheme.FP8_TENSOR: lambda l, x, b: fp8_tensor_gemm(
        x, l.weight, l.weight_scale, l.input_scale, b
    ),
    LinearScheme.FP8_CHANNEL_TOKEN: lambda l, x, b: fp8_channel_token_gemm(
        x, l.weight, l.weight_scale, b
    ),
    LinearScheme.FP8_BLOCK: lambda l, x, b: fp8_block_gemm(x, l.weight, l.weight_scale, b),
    LinearScheme.NVFP4: lambda l, x, b: nvfp4_gemm(
        x, l.weight, l.weight_scale, l.weight_scale_2, l.input_scale, b
    ),
}

register_linear_kernel("any", ReferenceLinearKernel)
