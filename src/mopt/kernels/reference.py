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
    per_token_fp8,
    register_linear_kernel,
)
from mopt.kernels import reference_formats
from mopt.quant.formats import fp8, nvfp4


def _values(w: torch.Tensor) -> torch.Tensor:
    """Float32 values of FP8 codes, or of weights a kernel stored pre-decoded (float16, exact)."""
    return fp8.to_float32(w) if w.dtype == fp8.FP8_DTYPE else w.float()


def _finish(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def fp8_tensor_gemm(x, weight, weight_scale, input_scale, bias=None):
    x2, restore = flatten_tokens(x)
    xq = fp8.quantize(x2, input_scale)
    acc = fp8.to_float32(xq) @ _values(weight).t()
    y = acc * (input_scale.float() * weight_scale.float())
    return restore(_finish(y, bias, x.dtype))


def fp8_channel_token_gemm(x, weight, weight_scale, bias=None, reduce_amax=None):
    """``reduce_amax``: see ``kernels.linear.per_token_fp8`` (row-parallel layers)."""
    x2, restore = flatten_tokens(x)
    xq, x_scale = per_token_fp8(x2, reduce_amax)
    acc = fp8.to_float32(xq) @ _values(weight).t()
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
        partial = fp8.to_float32(xq[:, cols]) @ _values(weight[:, cols]).t()
        y += partial * x_scale[:, kb : kb + 1] * weight_scale[:, kb].float().unsqueeze(0)
    return restore(_finish(y, bias, x.dtype))


def nvfp4_gemm(x, weight, weight_scale, weight_scale_2, input_scale, bias=None):
    """``weight`` is packed uint8, or block values ``[N, K]`` a kernel stored pre-decoded."""
    x2, restore = flatten_tokens(x)
    k = x2.shape[-1]
    xq, x_block_scale = nvfp4.quantize(x2, input_scale)
    xv = nvfp4.dequantize_to_block_values(xq, x_block_scale)[:, :k]
    if weight.dtype == torch.uint8:
        wv = nvfp4.dequantize_to_block_values(weight, weight_scale)[:, :k]
    else:
        wv = weight.float()
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
        x, l.weight, l.weight_scale, b, getattr(l, "reduce_token_amax", None)
    ),
    LinearScheme.FP8_BLOCK: lambda l, x, b: fp8_block_gemm(x, l.weight, l.weight_scale, b),
    LinearScheme.NVFP4: lambda l, x, b: nvfp4_gemm(
        x, l.weight, l.weight_scale, l.weight_scale_2, l.input_scale, b
    ),
}
_GEMM_BY_SCHEME.update({scheme: reference_formats.gemm for scheme in reference_formats.SCHEMES})


class CpuDecodedLinearKernel(ReferenceLinearKernel):
    """The reference numerics with weights decoded once, for CPUs.

    FP8 codes and NVFP4 block values (E2M1 value times E4M3 block scale) are stored as float16,
    which holds every one of them exactly (at most 6 significant bits, magnitudes 2^-10..2688),
    so results equal the reference backend's bit for bit. Decoding per call costs 5-10x the
    GEMV itself on CPUs; this trades it for 2 bytes per weight (half of float32; FP8 checkpoints
    take 1, NVFP4 0.56). ``MOPT_BACKEND=reference`` keeps the checkpoint's bytes instead.
    """

    name = "cpu-decoded"
    backend = "cpu"

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str]:
        return (True, "") if device.type == "cpu" else (False, f"CPU only, not {device.type}")

    @classmethod
    def can_implement(cls, shape: LinearShape) -> tuple[bool, str]:
        if shape.scheme is LinearScheme.UNQUANTIZED:
            return False, "unquantized weights need no decoding"
        return True, ""

    def process_weights(self, layer: torch.nn.Module) -> None:
        if layer.linear_shape.scheme in reference_formats.SCHEMES:
            values = reference_formats.decode_for_cpu(layer)
            layer.weight = torch.nn.Parameter(values, requires_grad=False)
            return
        if layer.linear_shape.scheme is LinearScheme.NVFP4:
            values = nvfp4.dequantize_to_block_values(layer.weight.data, layer.weight_scale)
            values = values[:, : layer.linear_shape.in_features]
        else:
            values = fp8.to_float32(layer.weight.data)
        layer.weight = torch.nn.Parameter(values.to(torch.float16), requires_grad=False)


register_linear_kernel("any", ReferenceLinearKernel)
register_linear_kernel("cpu", CpuDecodedLinearKernel)
