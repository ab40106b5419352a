"""The FP8 decode GEMV against the reference GEMM, and the E4M3-input protocol between kernels.

Through the interpreter (float32) the GEMV's sums of exact products agree with the reference to
1e-6 relative (order of summation only); on the GPU likewise for both inner loops up to 16 rows
(mma.sync keeps full float32), up to 1e-5 for K = 14336 (float32 rounding grows like sqrt(K) * 2^-24);
E4M3 weights at 17-64 rows (WGMMA, promoted to float32 every 128 products) to 3e-4; BF16 outputs to one
rounding (4e-3). Pre-quantized input (E4M3 codes under the static input scale,
as the norm and SiLU kernels write them) must give the same bits as letting the layer quantize.
"""

from __future__ import annotations


import pytest
import torch

from triton_device import triton_device

from canonical import S, canonical_layer
from mopt.kernels.reference import ReferenceLinearKernel
from mopt.quant.formats import fp8

triton_gemv = pytest.importorskip("mopt.kernels.triton_gemv")
triton_linear = pytest.importorskip("mopt.kernels.triton_linear")




def _rel(a, b) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _check_gemv(device, n, k, m, tiles, out_dtype, rowwise):
    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=g) * (1 + 3 * torch.rand(n, 1, generator=g))
    if rowwise:
        wq, ws = fp8.quantize_per_channel(w)
        ws = ws.reshape(-1)
        xq, xs = fp8.quantize_per_token(torch.randn(m, k, generator=g))
        xs = xs.reshape(-1)
    else:
        wq, ws = fp8.quantize_per_tensor(w)
        xq, xs = fp8.quantize_per_tensor(torch.randn(m, k, generator=g))
        xs, ws = xs.reshape(1), ws.reshape(1)
    bias = torch.randn(n, generator=g)
    want = (fp8.to_float32(xq) @ fp8.to_float32(wq).t()) * xs.reshape(-1, 1) * ws.reshape(1, -1) + bias
    to = lambda t: t.to(device)
    got = triton_gemv.fp8_gemv(to(xq), to(wq), to(xs), to(ws), to(bias), out_dtype, tiles)
    assert got.dtype == out_dtype and got.shape == (m, n)
    # float32 sums of K exact products in another order: about sqrt(K) * 2^-24 relative; on a GPU, 64-row
    # tiles sum 128 products at a time in Hopper's FP8 accumulator (1.3e-4 measured, cuBLASLt's FP8 GEMM's too)
    wgmma = torch.device(device).type == "cuda" and (tiles or triton_gemv.gemv_tiles(m, n, k, 1)).block_m == 64
    exact = 3e-4 if wgmma else (1e-6 if k <= 1024 else 1e-5)
    assert _rel(got, want) <= (exact if out_dtype == torch.float32 else 4e-3)


TILES = {"fma": triton_gemv.GemvTiles(16, 128, 4, 2, dot=False), "dot": triton_gemv.GemvTiles(16, 64, 4, 2, dot=True),
         "fma_steps": triton_gemv.GemvTiles(16, 32, 4, 2, dot=False),  # 3-8 steps of K at these sizes
         "auto": None,  # gemv_tiles: 64-row tiles for E4M3 weights from 17 rows
         "split": triton_gemv.GemvTiles(16, 64, 4, 2, dot=True, split_k=3),  # K tiles in shares of 3, 3, 2 (K=512)
         "split_empty": triton_gemv.GemvTiles(16, 128, 4, 2, dot=True, split_k=4)}  # K=384: the 4th share empty


@pytest.mark.parametrize("n,k,m,variant", [(48, 256, 1, "fma"), (50, 200, 1, "fma"), (48, 256, 1, "dot"),
                                           (48, 256, 1, "fma_steps"), (50, 200, 1, "fma_steps"),
                                           (70, 96, 5, "dot"), (32, 512, 16, "dot"),
                                           (40, 128, 17, "dot"), (32, 64, 32, "dot"), (40, 256, 48, "dot"),
                                           (32, 320, 64, "dot"), (40, 640, 20, "auto"), (96, 256, 64, "auto"),
                                           (48, 512, 5, "split"), (50, 384, 20, "split_empty"),
                                           (40, 512, 64, "split")])
@pytest.mark.parametrize("rowwise", [False, True])
def test_fp8_gemv_interpreted(n, k, m, variant, rowwise):
    _check_gemv(triton_device(False), n, k, m, TILES[variant], torch.float32, rowwise)


@pytest.mark.parametrize("m,dtype,variant", [(1, torch.bfloat16, "fma"), (1, torch.bfloat16, "fma_steps"),
                                             (1, torch.float16, "dot"),
                                             (7, torch.float16, "dot"), (50, torch.float16, "dot"),
                                             (9, torch.float16, "split")])
def test_gemv_16bit_interpreted(m, dtype, variant):
    """Unquantized 16-bit weights (scales 1): float32 sums of exact products, rounded once to the dtype."""
    g = torch.Generator().manual_seed(m)
    a, b, bias = (torch.randn(m, 200, generator=g).to(dtype), torch.randn(50, 200, generator=g).to(dtype),
                  torch.randn(50, generator=g).to(dtype))
    got = triton_gemv.gemv(a.to(triton_device(False)), b, bias, TILES[variant])
    want = a.float() @ b.float().t() + bias.float()
    assert got.dtype == dtype and _rel(got, want) <= 4e-3


def test_split_k_repeats_its_bits_and_frees_its_counters():
    """The last program of a tile adds the shares in split order whichever arrives last, and sets the tile's
    counter back to 0, so a second call (a CUDA graph replay) finds them free and gives the same bits."""
    from mopt.kernels.triton_weight_prefill import split_k_locks

    device = triton_device(False)
    g = torch.Generator().manual_seed(11)
    wq, ws = fp8.quantize_per_channel(torch.randn(96, 512, generator=g))
    xq, xs = fp8.quantize_per_token(torch.randn(7, 512, generator=g))
    args = [t.to(device) for t in (xq, wq, xs.reshape(-1), ws.reshape(-1))]
    first = triton_gemv.fp8_gemv(*args, None, torch.float32, TILES["split"])
    assert not split_k_locks(device)[:8].any()
    assert torch.equal(triton_gemv.fp8_gemv(*args, None, torch.float32, TILES["split"]), first)


@pytest.mark.parametrize("call,fp8_out", [("gated", False), ("gated", True), ("fma", False)])
def test_split_k_is_refused_where_it_does_not_run(call, fp8_out):
    a, w = torch.zeros(2 if call != "fma" else 1, 256, dtype=fp8.FP8_DTYPE), torch.zeros(64, 256, dtype=fp8.FP8_DTYPE)
    one = torch.ones(1)
    with pytest.raises(ValueError, match="split K runs the plain tensor-core GEMV only"):
        if call == "fma":
            triton_gemv.fp8_gemv(a, w, one, one, None, torch.float32,
                                 triton_gemv.GemvTiles(8, 128, 4, 2, dot=False, split_k=2))
        else:
            triton_gemv.silu_gated_gemv(a, w, one, one, None, torch.float32, one if fp8_out else None,
                                        TILES["split"])


# (m, n, k, gated) -> (block_n, block_k, split_k): Llama-3-8B's layers whole and per rank of two, from the
# H200 sweeps gemv_tiles cites
@pytest.mark.parametrize("m,n,k,gated,want", [
    (64, 28672, 4096, False, (128, 128, 1)), (64, 14336, 4096, False, (64, 128, 1)),
    (64, 6144, 4096, False, (64, 128, 2)), (64, 3072, 4096, False, (64, 128, 2)),
    (64, 4096, 14336, False, (64, 128, 2)), (64, 4096, 7168, False, (64, 128, 2)),
    (64, 4096, 2048, False, (32, 256, 1)),  # K too short to share
    (17, 6144, 4096, False, (64, 128, 2)),
    (64, 7168, 4096, True, (32, 256, 1)),  # a gated launch (TP=2's gate/up halves) never splits
    (16, 6144, 4096, False, (32, 512, 1)), (1, 6144, 4096, False, (8, 2048, 1))])
def test_fp8_gemv_tiles_split_narrow_layers_with_long_k(m, n, k, gated, want):
    t = triton_gemv.gemv_tiles(m, n, k, 1, gated)
    assert (t.block_n, t.block_k, t.split_k) == want


def test_default_tiles_of_a_gated_launch_run():
    """A SiLU-gated launch whose plain GEMV would split K takes the unsplit tiles (no ValueError)."""
    device = triton_device(False)
    g = torch.Generator().manual_seed(5)
    k = triton_gemv.FP8_SPLIT_MIN_K
    wq, ws = fp8.quantize_per_tensor(torch.randn(2 * 32, k, generator=g))
    xq, xs = fp8.quantize_per_tensor(torch.randn(17, k, generator=g))
    assert triton_gemv.gemv_tiles(17, 32, k, 1).split_k == 2
    out = triton_gemv.silu_gated_gemv(xq.to(device), wq.to(device), xs.reshape(1).to(device),
                                      ws.reshape(1).to(device), None, torch.float32)
    assert out.shape == (17, 32)


def test_fp8_gemv_rejects_large_m():
    with pytest.raises(ValueError, match="M=65"):
        triton_gemv.fp8_gemv(torch.zeros(65, 16, dtype=fp8.FP8_DTYPE), torch.zeros(16, 16, dtype=fp8.FP8_DTYPE),
                             torch.ones(1), torch.ones(1), None, torch.float32)


@pytest.mark.parametrize("m", [1, 9])
def test_fp8_codes_as_input_equal_quantizing_inside(m):
    """A per-tensor FP8 layer given E4M3 codes under its input scale computes what it computes when it
    quantizes the same activations itself (the protocol the norm and SiLU kernels use)."""
    device = triton_device(False)
    layer = canonical_layer(S.FP8_TENSOR, 64, 256)
    layer.params_dtype = torch.float32
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)) * 2
    kernel = triton_linear.HopperFp8Kernel()
    assert kernel.fp8_input_scale(layer) is layer.input_scale
    codes = fp8.quantize(x, layer.input_scale)
    assert torch.equal(kernel.apply(layer, codes.to(device), None), kernel.apply(layer, x.to(device), None))
    expected = ReferenceLinearKernel().apply(layer, x, None)
    assert _rel(kernel.apply(layer, codes.to(device), None), expected) <= 1e-5
    channel = canonical_layer(S.FP8_CHANNEL_TOKEN, 64, 256)
    assert kernel.fp8_input_scale(channel) is None  # per-token scales are computed from the row itself


def _gated_case(device, m, n, k, weights, rowwise, fp8_out, bias, out_dtype, tiles=None):
    """``silu_gated_gemv`` and the GEMV followed by ``triton_glue.silu_mul`` on the same inputs. Through the
    interpreter ``n`` must be a multiple of the tile's rows: its dot is numpy's matmul, whose sum for an
    output depends on that output's place in the tile (the fused kernel puts up rows elsewhere); a GPU's
    MMA sums each output the same way wherever it sits, so the GPU test takes any ``n``."""
    from mopt.kernels import triton_glue
    g = torch.Generator().manual_seed(m * 7 + n)
    w = torch.randn(2 * n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g)
    b = (torch.randn(2 * n, generator=g) * 0.1).to(device, out_dtype) if bias else None
    scale = torch.tensor([0.02], device=device) if fp8_out else None
    if weights == "fp8":
        if rowwise:
            wq, ws = fp8.quantize_per_channel(w)
        else:
            wq, ws = fp8.quantize_per_tensor(w)
        xq, xs = fp8.quantize_per_tensor(x)
        args = [t.to(device) for t in (xq, wq, xs.reshape(1), ws.reshape(-1))]
        plain = triton_gemv.fp8_gemv(*args, b, out_dtype, tiles)
    else:
        args = [x.to(device, out_dtype), w.to(device, out_dtype), None, None]
        plain = triton_gemv.gemv(args[0], args[1], b, tiles)
    fused = triton_gemv.silu_gated_gemv(*args, b, out_dtype, scale, tiles)
    return fused, triton_glue.silu_mul(plain, scale)


@pytest.mark.parametrize("m,variant", [(1, "fma"), (1, "fma_steps"), (1, "dot"), (5, "dot")])
@pytest.mark.parametrize("weights,rowwise", [("fp8", False), ("fp8", True), ("16bit", False)])
@pytest.mark.parametrize("fp8_out,bias", [(False, True), (True, False)])
def test_silu_gated_gemv_interpreted(m, variant, weights, rowwise, fp8_out, bias):
    """One kernel for gate/up and the SiLU-gated product: the bits of the GEMV then the SiLU kernel."""
    fused, unfused = _gated_case(triton_device(False), m, 48, 96, weights, rowwise, fp8_out, bias, torch.float16,
                                 TILES[variant])
    assert fused.shape == (m, 48) and fused.dtype == unfused.dtype
    assert torch.equal(fused.view(torch.uint8) if fp8_out else fused, unfused.view(torch.uint8) if fp8_out else unfused)


def test_silu_gated_gemv_needs_halves():
    with pytest.raises(ValueError, match="gate and up"):
        triton_gemv.silu_gated_gemv(torch.zeros(1, 16), torch.zeros(7, 16), None, None, None, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(14336, 4096), (7168, 4096), (500, 576)])
@pytest.mark.parametrize("weights,m", [("fp8", 1), ("fp8", 16), ("fp8", 32), ("fp8", 64), ("16bit", 1),
                                       ("16bit", 16), ("16bit", 32), ("16bit", 64)])
@pytest.mark.parametrize("rowwise,fp8_out", [(False, False), (True, True)])
def test_silu_gated_gemv_gpu(n, k, weights, m, rowwise, fp8_out):
    tiles = triton_gemv.gemv_tiles(m, n, k, 1 if weights == "fp8" else 2, gated=True)  # the gated launch's, for both
    fused, unfused = _gated_case(triton_device(True), m, n, k, weights, rowwise and weights == "fp8", fp8_out,
                                 False, torch.bfloat16, tiles)
    assert torch.equal(fused.view(torch.uint8) if fp8_out else fused, unfused.view(torch.uint8) if fp8_out else unfused)


@pytest.mark.parametrize("per_row,m,fused", [(True, 1, True), (True, 16, True), (True, 17, False),
                                             (False, 16, True), (False, 17, False)])
@pytest.mark.parametrize("codes_in,fp8_out", [(False, False), (True, True)])
def test_fp8_kernels_fuse_the_silu_within_the_gemv_rows(per_row, m, fused, codes_in, fp8_out):
    """hopper-fp8's ``apply_silu_gated`` (gate/up + SiLU in one kernel) gives the bits of ``apply`` followed
    by the SiLU kernel, for activations or E4M3 codes in, activations or E4M3 codes out; beyond
    ``FP8_SILU_GATED_MAX_M`` tokens it declines (None) and the model runs the two."""
    from mopt.kernels import triton_glue

    device = triton_device(False)
    layer = canonical_layer(S.FP8_TENSOR, 128, 256)  # [gate | up] of 64 each (see _gated_case on why 64)
    layer.params_dtype = torch.float32
    if not per_row:
        layer.weight_scale = layer.weight_scale.max().reshape(())
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)) * 0.05  # outputs of a few units: SiLU's bend
    x = fp8.quantize(x, layer.input_scale) if codes_in else x
    scale = torch.tensor([0.05]) if fp8_out else None
    kernel = triton_linear.HopperFp8Kernel()
    got = kernel.apply_silu_gated(layer, x.to(device), None, scale)
    if not fused:
        assert got is None
        return
    want = triton_glue.silu_mul(kernel.apply(layer, x.to(device), None), scale)
    assert got.shape == (m, 64) and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("m,fused", [(1, True), (32, True), (33, False)])  # BF16_GEMV_MAX_M = 32
def test_16bit_gemv_kernel_fuses_the_silu(m, fused):
    from mopt.kernels import triton_glue

    layer = torch.nn.Module()
    g = torch.Generator().manual_seed(m)
    layer.weight = (torch.randn(256, 128, generator=g) * 0.1).half()  # halves of 128: see _gated_case
    x = torch.randn(m, 128, generator=g).half().to(triton_device(False))
    kernel = triton_linear.TritonGemvKernel()
    got = kernel.apply_silu_gated(layer, x, None, None)
    if not fused:
        assert got is None
        return
    assert torch.equal(got, triton_glue.silu_mul(kernel.apply(layer, x, None)))


@pytest.mark.parametrize("per_row,m,engine", [(True, 33, "gemv"), (True, 64, "gemv"), (True, 65, "cublas"),
                                              (False, 16, "gemv"), (False, 17, "cublas")])
def test_hopper_fp8_rows_by_weight_scale(monkeypatch, per_row, m, engine):
    """hopper-fp8 keeps FP8 layers on the GEMV up to 16 tokens, or 64 where the weight scale is per row
    (cuBLASLt's rowwise GEMM being the slower one); cuBLASLt above. The GEMV's result is the reference's."""
    device = triton_device(False)
    layer = canonical_layer(S.FP8_TENSOR, 64, 256)
    if not per_row:
        layer.weight_scale = layer.weight_scale.max().reshape(())
    calls = []
    monkeypatch.setattr(triton_linear, "_scaled_mm", lambda *args: calls.append(args) or torch.zeros(m, 64))
    kernel = triton_linear.HopperFp8Kernel()
    kernel.process_weights(layer)
    assert hasattr(layer, "input_scale_rows") == per_row
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
    got = kernel.apply(layer, x.to(device), None)
    assert (engine == "cublas") == bool(calls)
    if engine == "gemv":
        assert _rel(got, ReferenceLinearKernel().apply(layer, x, None)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (128256, 4096), (4096, 14336), (576, 576)])
@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_gemv_bf16_gpu(n, k, m):
    device = triton_device(True)
    g = torch.Generator().manual_seed(m)
    a = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    b = (torch.randn(n, k, generator=g) * 0.05).to(device, torch.bfloat16)
    got = triton_gemv.gemv(a, b)
    assert _rel(got, a.float() @ b.float().t()) <= 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (576, 576)])
@pytest.mark.parametrize("m", [1, 2, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("rowwise", [False, True])
def test_fp8_gemv_gpu(n, k, m, rowwise):
    device = triton_device(True)
    _check_gemv(device, n, k, m, None, torch.float32, rowwise)
    _check_gemv(device, n, k, m, None, torch.bfloat16, rowwise)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 14336), (4096, 7168), (4096, 2048)])
@pytest.mark.parametrize("m,split", [(17, 2), (64, 4)])
def test_split_k_gemv_gpu(n, k, m, split):
    """K split over programs on 64-row E4M3 tiles: as accurate as the unsplit tiles, the same bits every call."""
    device = triton_device(True)
    tiles = triton_gemv.GemvTiles(32, 256, 4, 5, dot=True, block_m=64, split_k=split)
    _check_gemv(device, n, k, m, tiles, torch.float32, True)
    g = torch.Generator().manual_seed(n + m)
    wq, ws = fp8.quantize_per_channel(torch.randn(n, k, generator=g))
    xq, xs = fp8.quantize_per_tensor(torch.randn(m, k, generator=g))
    args = [t.to(device) for t in (xq, wq, xs.reshape(1), ws.reshape(-1))]
    first = triton_gemv.fp8_gemv(*args, None, torch.bfloat16, tiles)
    assert all(torch.equal(triton_gemv.fp8_gemv(*args, None, torch.bfloat16, tiles), first) for _ in range(10))
