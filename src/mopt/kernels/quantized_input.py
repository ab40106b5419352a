"""Activations quantized for a GEMM by the kernel that produced them.

A linear kernel says what it takes instead of activations (``LinearKernel.fp8_input_scale`` and
``nvfp4_input_scale``), and the kernel before it (RMSNorm, the SiLU-gated product, the fused all-reduce
+ RMSNorm, decode attention) quantizes its output in the same pass, so the GEMM needs no quantization
kernel of its own.

E4M3 codes show what they are by their dtype. NVFP4 block values (BF16 ``[..., K]``: each element's E2M1
value times its 16-element block's E4M3 scale, without the global scale; exact, as
``triton_quant.nvfp4_block_values`` writes them) look like any BF16 activations, so a producer returns
them as :class:`Nvfp4BlockValues`. Only the tensor the producer returned carries the mark: any torch
operation on it (a reshape, a slice, arithmetic) gives a plain tensor, so values that something changed
are never taken for block values.
"""

from __future__ import annotations

import torch

from mopt.quant.formats import nvfp4


class Nvfp4BlockValues(torch.Tensor):
    """BF16 NVFP4 block values, quantized under the global scale of the layer that takes them."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results of operations are plain tensors


def mark_nvfp4_block_values(values: torch.Tensor) -> Nvfp4BlockValues:
    """``values`` (a producer's BF16 output of block values) marked for the NVFP4 GEMM after it."""
    return values.as_subclass(Nvfp4BlockValues)


def nvfp4_block_values_of(x: torch.Tensor) -> torch.Tensor | None:
    """The block values ``x`` holds as a plain tensor if a producer marked it, else None."""
    return x.as_subclass(torch.Tensor) if isinstance(x, Nvfp4BlockValues) else None


def check_output_format(n: int, fp8_scale: torch.Tensor | None, nvfp4_scale: torch.Tensor | None, who: str) -> None:
    """A producer of rows of ``n`` writes E4M3 codes or NVFP4 block values, never both; block values only
    in whole 16-element blocks."""
    if fp8_scale is not None and nvfp4_scale is not None:
        raise ValueError(f"{who}: fp8_scale and nvfp4_scale both given; a GEMM takes one input format")
    if nvfp4_scale is not None and n % nvfp4.BLOCK_SIZE:
        raise ValueError(f"{who}: NVFP4 block values need whole {nvfp4.BLOCK_SIZE}-element blocks, got rows of {n}")
