"""The Triton weight-only kernel family against the reference backend (same canonical weights and inputs).

On CPU through Triton's interpreter at small shapes; on the GPU (``-m gpu``) at Llama-like shapes.
Weight values are exact in BF16 and accumulate in float32, so the only difference from the reference
is summation order: 1e-5 relative L2 (float32 activations, and BF16 activations against the
reference fed the same BF16 values); the BF16 output of a BF16 layer adds its rounding, 2**-9 (4e-3).
"""

from __future__ import annotations

import os

import pytest
import torch

from triton_device import triton_device

from mopt.kernels.linear import LinearScheme as S
from mopt.kernels.linear import LinearShape
from mopt.kernels.reference import ReferenceLinearKernel
from mopt.quant.formats import fp8, int4, int8, mx, nvfp4

triton_weight_only = pytest.importorskip("mopt.kernels.triton_weight_only")
import triton  # noqa: E402  (after the skip: the package imports without Triton)

SCHEMES = [S.FP8_BLOCK_WO, S.INT4_WO, S.INT8_WO, S.NVFP4_WO, S.MXFP4_WO,  # weight-only
           S.INT8_SQ, S.W4A8_NVFP4, S.W4A8_MXFP4, S.MXFP8, S.MXFP4]  # activations quantized first


def canonical_layer(scheme: S, n: int, k: int, device: str = "cpu") -> torch.nn.Module:
    """A layer holding ``scheme``'s canonical processed weights (``mopt.kernels.linear``), quantized on
    ``device`` (the GPU tests' Llama-sized weights took ~10 s each to quantize on a CPU)."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = (torch.randn(n, k, generator=g) * (1 + 4 * torch.rand(n, 1, generator=g)) * 0.05).to(device)
    layer = torch.nn.Module()
    if scheme is S.FP8_BLOCK_WO:
        q, scale = fp8.quantize_blocks(w)
        layer.weight, layer.weight_scale = q, fp8.expand_block_scale(scale, (n, k))[:, ::128].contiguous()
    elif scheme is S.INT4_WO:
        q, layer.weight_scale = int4.quantize(w, 128)
        layer.weight = int4.pack_k(q)
    elif scheme in (S.INT8_WO, S.INT8_SQ):
        layer.weight, layer.weight_scale = int8.quantize_per_channel(w)
        layer.input_scale = torch.tensor(6.0 / 127, device=device)
    elif scheme in (S.NVFP4_WO, S.W4A8_NVFP4):
        block = 32 if scheme is S.W4A8_NVFP4 else 16
        # One global scale per row (the general case of fused shards); W4A8's is amax / 448.
        ws2 = w.abs().amax(dim=1) / (448 if block == 32 else 6 * 448)
        layer.weight, layer.weight_scale = nvfp4.quantize(w, ws2[:, None], block_size=block)
        layer.weight_scale_2, layer.input_scale = ws2, torch.tensor(6.0 / 448, device=device)
    elif scheme is S.MXFP8:
        layer.weight, layer.weight_scale = mx.quantize_mxfp8(w)
    else:
        layer.weight, layer.weight_scale = mx.quantize_mxfp4(w)
        # W4A8_MXFP4: static FP8 activations when N is even here, per-token when odd (no input_scale)
        layer.input_scale = torch.tensor(6.0 / 448, device=device) if n % 2 == 0 else None
    layer.linear_shape = LinearShape(scheme, k, n)
    return layer


def _rel(a, b) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _run(scheme, n, k, m, device, dtype=torch.float32, bias=True):
    """The kernel's output and the reference backend's (float32, same device, same canonical weights and
    inputs)."""
    layer = canonical_layer(scheme, n, k, device)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).to(device, dtype)
    b = torch.randn(n).to(device, dtype) if bias else None
    expected = ReferenceLinearKernel().apply(layer, x.float(), None if b is None else b.float())
    if scheme is not S.W4A8_MXFP4:
        layer.input_scale = getattr(layer, "input_scale", None)
    kernel = triton_weight_only.TritonWeightOnlyKernel()
    kernel.process_weights(layer)
    return kernel.apply(layer, x, b), expected


# (n, k, m): each path of weight_only_gemm: one token (GEMV), MMAs with and without split K (the
# interpreter counts 4 SMs: K split 4 ways at 40x1024 M=5, 2 ways at 131x640 M=20), and above MMA_MAX_M
# the expansion for a GEMM and its epilogue (group-scaled formats: MMAs); odd N; K=320 gives FP8 a
# partial 128-wide block (INT4 needs K % 128 == 0).
SHAPES = [(64, 256, 1), (96, 384, 5), (131, 256, 20), (48, 320, 3), (40, 320, 1), (37, 320, 17), (37, 320, 300),
          (40, 1024, 5), (131, 640, 20)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n,k,m", SHAPES)
def test_weight_only_kernel_interpreted(scheme, n, k, m):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter run (TRITON_INTERPRET=1)")
    if scheme is S.INT4_WO and k % 128:
        pytest.skip("INT4 groups of 128")
    got, expected = _run(scheme, n, k, m, "cpu")
    assert _rel(got, expected) <= 1e-5, f"{scheme.value} {n}x{k} M={m}: {_rel(got, expected):.2e}"


@pytest.mark.parametrize("n,k,m,split", [(40, 1024, 5, 4), (131, 640, 20, 2)])
def test_split_k_finishes_each_tile_once_and_frees_its_locks_interpreted(n, k, m, split):
    """The shapes above that split K do split (4 SMs under the interpreter), give the same bits on every call,
    and leave every arrival counter at 0 for the next call."""
    device = triton_device(False)
    from mopt.kernels import triton_weight_prefill as twp

    t = twp.mma_tiles(triton_weight_only.NVFP4, m, 0, torch.float32)
    programs = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
    assert twp.split_k(programs, triton.cdiv(k, t.block_k), torch.device("cpu"), t.block_m) == split
    layer = canonical_layer(S.NVFP4_WO, n, k)
    x, bias = torch.randn(m, k) * 2, torch.randn(n)
    expected = ReferenceLinearKernel().apply(layer, x, bias)
    kernel = triton_weight_only.TritonWeightOnlyKernel()
    kernel.process_weights(layer)
    first = kernel.apply(layer, x, bias)
    assert torch.equal(kernel.apply(layer, x, bias), first) and _rel(first, expected) <= 1e-5
    assert not twp.split_k_locks(torch.device(device)).any()


def test_int4_decode_places_bits_exactly():
    """Every nibble decodes to its two's-complement value through the float16 bit placement."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter run (TRITON_INTERPRET=1)")
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 16)  # [2, 256]: each value 16 times per row
    layer = torch.nn.Module()
    layer.weight, layer.weight_scale = int4.pack_k(q), torch.ones(2, 2)
    layer.linear_shape = LinearShape(S.INT4_WO, 256, 2)
    kernel = triton_weight_only.TritonWeightOnlyKernel()
    kernel.process_weights(layer)
    eye = torch.eye(256)[:32]  # rows of the identity read single weights back
    assert torch.equal(kernel.apply(layer, eye, None), q[:, :32].float().t())


def test_selector_declares_support():
    from mopt.kernels.linear import LinearShape

    cls = triton_weight_only.TritonWeightOnlyKernel
    assert cls.can_implement(LinearShape(S.INT4_WO, 4096, 4096)) == (True, "")
    assert not cls.can_implement(LinearShape(S.INT4_WO, 4004, 4096))[0]
    assert "implements" in cls.can_implement(LinearShape(S.NVFP4, 4096, 4096))[1]
    assert cls.is_supported(torch.device("cpu")) == (False, "needs a CUDA device, not cpu")


GPU_SHAPES = [(4096, 4096, 1), (6144, 4096, 16), (28672, 4096, 3), (4096, 14336, 128), (4096, 4096, 2048),
              (576, 576, 7), (1536, 576, 300), (192, 576, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n,k,m", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_kernel_gpu(scheme, n, k, m, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if scheme is S.INT4_WO and k % 128:
        pytest.skip("INT4 groups of 128")
    got, expected = _run(scheme, n, k, m, "cuda", dtype)
    if dtype is torch.bfloat16:  # the reference above saw the same BF16 activations, in float32
        assert got.dtype == torch.bfloat16 and _rel(got.float(), expected) <= 4e-3
    else:
        assert _rel(got, expected) <= 1e-5


@pytest.mark.gpu
def test_gpu_selector_picks_the_weight_only_kernel():
    from mopt.kernels.linear import select_linear_kernel

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    for scheme in SCHEMES:
        assert select_linear_kernel(LinearShape(scheme, 4096, 4096), torch.device("cuda")).name == "triton-weight-only"


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,m", [(4096, 4096, 64), (3072, 4096, 16), (4096, 7168, 64)])
def test_split_k_gives_the_same_bits_on_every_call_gpu(n, k, m):
    """Per-rank Llama-3-8B shapes that split K on an H100/H200: however the programs of a tile arrive, the
    last one adds the partials in split order, so 20 calls agree bit for bit, and every lock is back at 0."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from mopt.kernels import triton_weight_prefill as twp

    layer = canonical_layer(S.NVFP4_WO, n, k, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    kernel = triton_weight_only.TritonWeightOnlyKernel()
    kernel.process_weights(layer)
    t = twp.mma_tiles(triton_weight_only.NVFP4, m, 0, x.dtype)
    programs = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
    assert twp.split_k(programs, triton.cdiv(k, t.block_k), x.device, t.block_m) > 1
    first = kernel.apply(layer, x, None)
    for _ in range(20):
        assert torch.equal(kernel.apply(layer, x, None), first)
    assert not twp.split_k_locks(x.device).any()
