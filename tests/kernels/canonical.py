"""Layers holding a scheme's canonical processed weights, for kernel tests."""

import torch

from mopt.kernels.linear import LinearScheme, LinearShape
from mopt.quant.formats import fp8, nvfp4

S = LinearScheme


def canonical_layer(scheme: LinearScheme, n: int, k: int) -> torch.nn.Module:
    """A layer holding ``scheme``'s canonical processed weights (see mopt.kernels.linear)."""
    torch.manual_seed(n * 1000 + k)
    w = torch.randn(n, k) * (1 + 4 * torch.rand(n, 1))
    layer = torch.nn.Module()
    if scheme is S.NVFP4:
        ws2 = nvfp4.global_scale_from_amax(w.abs().amax()).expand(n).contiguous()
        layer.weight, layer.weight_scale = nvfp4.quantize(w, ws2[0])
        layer.weight_scale_2 = ws2
        layer.input_scale = torch.tensor(0.02)
    elif scheme is S.FP8_BLOCK:
        q, scale = fp8.quantize_blocks(w)
        layer.weight, layer.weight_scale = q, fp8.expand_block_scale(scale, (n, k))[:, ::128].contiguous()
    else:
        layer.weight, layer.weight_scale = fp8.quantize_per_channel(w)
        layer.input_scale = torch.tensor(0.01)
    layer.linear_shape = LinearShape(scheme, k, n)
    return layer
