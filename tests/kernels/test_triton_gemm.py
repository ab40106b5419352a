"""GPU linear kernels against the reference backend (same canonical weights, same inputs).

On CPU through Triton's interpreter at small shapes (Triton kernels only); on the GPU (``-m gpu``)
at Llama-like shapes, every kernel including cuBLASLt's. Tolerances, relative L2 error of the
output: 1e-5 where the accumulation is float32 (the interpreter; BF16 MMAs of the exact NVFP4
block values; the mma.sync tiles Triton uses for M <= 16); 5e-4 for FP8 on Hopper's warpgroup
MMAs, which accumulate with about 14 bits of precision between promotions to float32 (measured
1.2e-4 to 1.9e-4 for cuBLASLt's per-tensor GEMM and the block kernel on an H100, 2026-11-25);
4e-3 when the output is BF16 (rowwise ``_scaled_mm`` produces BF16 only: 2^-9 relative).
"""

from __future__ import annotations

import os

import pytest
import torch

from canonical import S, canonical_layer
from mopt.kernels.reference import ReferenceLinearKernel

triton_linear = pytest.importorskip("mopt.kernels.triton_linear")

TRITON_KERNELS = {
    S.FP8_TENSOR: triton_linear.TritonFp8Kernel,
    S.FP8_CHANNEL_TOKEN: triton_linear.TritonFp8Kernel,
    S.FP8_BLOCK: triton_linear.TritonFp8BlockKernel,
    S.NVFP4: triton_linear.TritonNvfp4Kernel,
}


def _rel(a, b) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _run(kernel_cls, scheme, n, k, m, device, per_row_scale=True):
    layer = canonical_layer(scheme, n, k)
    if scheme is S.FP8_TENSOR and not per_row_scale:
        layer.weight_scale = layer.weight_scale.max().reshape(())
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2
    bias = torch.randn(n)
    expected = ReferenceLinearKernel().apply(layer, x, bias)
    for name, value in list(vars(layer).items()) + list(layer.named_parameters()):
        if isinstance(value, torch.Tensor):
            setattr(layer, name, value.to(device))
    kernel = kernel_cls()
    kernel.process_weights(layer)
    got = kernel.apply(layer, x.to(device), bias.to(device))
    return got, expected


@pytest.mark.parametrize("scheme", list(TRITON_KERNELS))
@pytest.mark.parametrize("n,k,m", [(64, 256, 1), (96, 272, 5), (130, 128, 20)])
def test_triton_kernels_interpreted(scheme, n, k, m):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter run (TRITON_INTERPRET=1)")
    if scheme is not S.NVFP4 and k % 16:
        pytest.skip("FP8 kernels need K % 16 == 0")
    got, expected = _run(TRITON_KERNELS[scheme], scheme, n, k, m, "cpu")
    assert _rel(got, expected) <= 1e-5


GPU_SHAPES = [(4096, 4096, 1), (6144, 4096, 16), (3072, 4096, 32), (6144, 4096, 64), (576, 576, 33), (28672, 4096, 3),
              (4096, 14336, 128), (4096, 4096, 2048),
              (576, 576, 7), (1536, 576, 300), (192, 576, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", list(TRITON_KERNELS))
@pytest.mark.parametrize("n,k,m", GPU_SHAPES)
def test_triton_kernels_gpu(scheme, n, k, m):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    got, expected = _run(TRITON_KERNELS[scheme], scheme, n, k, m, "cuda")
    assert _rel(got, expected) <= (1e-5 if scheme is S.NVFP4 or m <= 16 else 5e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cublas-fp8", "hopper-fp8"])
@pytest.mark.parametrize("scheme,per_row", [(S.FP8_TENSOR, False), (S.FP8_TENSOR, True), (S.FP8_CHANNEL_TOKEN, True)])
@pytest.mark.parametrize("n,k,m", GPU_SHAPES)
def test_fp8_dispatch_gpu(kernel, scheme, per_row, n, k, m):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    cls = {"cublas-fp8": triton_linear.CublasFp8Kernel, "hopper-fp8": triton_linear.HopperFp8Kernel}[kernel]
    got, expected = _run(cls, scheme, n, k, m, "cuda", per_row)
    layer_rows = 32 if per_row or scheme is S.FP8_CHANNEL_TOKEN else 16
    assert layer_rows == (triton_linear.FP8_ROWWISE_GEMV_MAX_M if layer_rows > 16 else triton_linear.FP8_GEMV_MAX_M)
    cublas = kernel == "cublas-fp8" or m > layer_rows
    bf16_out = cublas and (per_row or scheme is S.FP8_CHANNEL_TOKEN)
    assert _rel(got, expected) <= (4e-3 if bf16_out else 5e-4 if cublas or m > 16 else 1e-5)


@pytest.mark.gpu
def test_gpu_selector_defaults():
    from mopt.kernels.linear import LinearShape, select_linear_kernel

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    dev = torch.device("cuda")
    names = {s: select_linear_kernel(LinearShape(s, 4096, 4096), dev).name for s in list(TRITON_KERNELS) + [S.UNQUANTIZED]}
    assert names == {S.FP8_TENSOR: "hopper-fp8", S.FP8_CHANNEL_TOKEN: "hopper-fp8",
                     S.FP8_BLOCK: "triton-fp8-block", S.NVFP4: "triton-nvfp4", S.UNQUANTIZED: "triton-gemv"}


@pytest.mark.parametrize("n,k", [(64, 256), (96, 272), (5, 32)])
def test_nvfp4_dequantize_exact(n, k):
    from mopt.kernels import triton_gemm
    from mopt.quant.formats import nvfp4

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
    packed, scale = nvfp4.quantize(w, nvfp4.global_scale_from_amax(w.abs().max()))
    got = triton_gemm.nvfp4_dequantize(packed.to(device), scale.to(device))
    assert torch.equal(got.float().cpu(), nvfp4.dequantize_to_block_values(packed, scale))


def test_nvfp4_alpha_only_for_one_global_scale():
    from mopt.kernels import triton_gemm

    a = torch.tensor(0.5)
    assert triton_gemm.nvfp4_alpha(a, torch.full((6,), 0.25)) == 0.125
    assert triton_gemm.nvfp4_alpha(a, torch.tensor([0.25, 0.25, 0.5])) is None


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,m", [(4096, 4096, 300), (1536, 576, 2048)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_nvfp4_bf16_epilogue_gpu(n, k, m, with_bias):
    """BF16 activations, one global weight scale: cuBLAS applies both global scales to its float32
    accumulator (alpha) and writes BF16 once; 4e-3 (2^-9 relative BF16 rounding of the output)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    layer = canonical_layer(S.NVFP4, n, k)
    layer.weight_scale_2 = layer.weight_scale_2.max().expand(n).contiguous()
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).bfloat16()
    bias = torch.randn(n).bfloat16() if with_bias else None
    expected = ReferenceLinearKernel().apply(layer, x.float(), None if bias is None else bias.float())
    for name, value in list(vars(layer).items()) + list(layer.named_parameters()):
        if isinstance(value, torch.Tensor):
            setattr(layer, name, value.to("cuda"))
    kernel = triton_linear.TritonNvfp4Kernel()
    kernel.process_weights(layer)
    assert layer.nvfp4_alpha is not None
    got = kernel.apply(layer, x.cuda(), None if bias is None else bias.cuda())
    assert got.dtype == torch.bfloat16 and _rel(got.float(), expected) <= 4e-3
