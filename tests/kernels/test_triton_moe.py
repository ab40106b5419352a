"""Triton fused MoE against the reference expert loop (same weights, same routing).

Interpreter (CI) at small shapes; GPU (``-m gpu``) at Qwen3-MoE-like ones. Tolerance: relative L2
1e-5 with float32 activations (identical quantization; only summation order differs). NVFP4 on
the GPU: block values and their products are exact, so only float32 summation order differs
(tensor-core MMAs against the CPU's matmul) until the gate/up output is re-quantized to E2M1,
where an element on a rounding boundary may flip to the neighbouring code (up to a quarter of its
block's scale): 2e-2, far below NVFP4's own quantization error (~10%). FP8 (per tensor, or per
channel x per token) on the GPU at more than 16 tokens: 1e-2. Hopper's FP8 MMAs accumulate with ~14 bits
between promotions (1e-4 relative, see test_triton_gemm); the up/gate output is then re-quantized to E4M3
(static scale, or each pair's own), where such differences flip values on a rounding boundary to the neighbouring code
(2^-3 relative each), so the error grows like the square root of the noise: measured 3.1e-3 at
1024 tokens on an H100.
"""

from __future__ import annotations

import os

import pytest
import torch
from triton_device import triton_device

from mopt.kernels.moe import TritonFusedMoEKernel
from mopt.layers.fused_moe import FusedMoE
from mopt.quant.config import ModelOptFp8Config, ModelOptNvFp4Config
from mopt.quant.formats import fp8, nvfp4

triton_moe = pytest.importorskip("mopt.kernels.triton_moe")
FORMATS = ["bf16", "fp8", "fp8-pcpt", "nvfp4"]


def _device():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    return "cuda"


@pytest.mark.parametrize("tokens,top_k,experts,block_m", [
    (37, 3, 6, 16),     # several blocks per expert
    (1, 8, 128, 16),    # decode: most experts empty, the block count bounded by the pairs
    (5, 2, 60, 16),     # an expert count that is not a power of two
    (700, 2, 4, 32),    # more pairs than the kernel's 1024-wide chunk
])
def test_align_tokens_groups_every_pair_once(tokens, top_k, experts, block_m):
    device = _device()
    ids = torch.randint(0, experts, (tokens, top_k), generator=torch.Generator().manual_seed(tokens))
    pairs, block_expert = (v.cpu() for v in triton_moe.align_tokens(ids.to(device), experts, block_m))
    num_pairs = ids.numel()
    assert pairs.numel() == block_expert.numel() * block_m
    assert block_expert.numel() <= -(-num_pairs // block_m) + min(experts, num_pairs)
    real = pairs[pairs < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs)) and (pairs <= num_pairs).all()
    used = block_expert[block_expert >= 0]
    assert (used.diff() >= 0).all() and (block_expert[len(used):] == -1).all()
    for b, e in enumerate(block_expert.tolist()):
        chunk = pairs[b * block_m:(b + 1) * block_m]
        chunk = chunk[chunk < num_pairs]
        if e < 0:
            assert chunk.numel() == 0
        else:
            assert chunk.numel() > 0 and (ids.reshape(-1)[chunk] == e).all()


def _checkpoint_tensors(fmt: str, w: torch.Tensor, expert: int) -> dict[str, torch.Tensor]:
    """One expert projection as ModelOpt exports it, static input scales varying by expert."""
    if fmt in ("fp8", "fp8-pcpt"):
        q, s = fp8.quantize_per_tensor(w) if fmt == "fp8" else fp8.quantize_per_channel(w)
        return dict(weight=q, weight_scale=s, **({"input_scale": torch.tensor(0.01 + 0.001 * expert)}
                                                 if fmt == "fp8" else {}))
    if fmt == "nvfp4":
        g2 = nvfp4.global_scale_from_amax(w.abs().max())
        q, s = nvfp4.quantize(w, g2)
        return dict(weight=q, weight_scale=s, weight_scale_2=g2,
                    input_scale=torch.tensor(4.0 / 2688 * (1 + 0.1 * expert)))
    return dict(weight=w)


def _layer(fmt, e, h, i, seed=0):
    g = torch.Generator().manual_seed(seed)
    qc = {"fp8": ModelOptFp8Config("FP8"), "fp8-pcpt": ModelOptFp8Config("FP8_PER_CHANNEL_PER_TOKEN"),
          "nvfp4": ModelOptNvFp4Config()}.get(fmt)
    layer = FusedMoE(e, 2, h, i, quant_config=qc, prefix="model.layers.0.mlp.experts")
    for x in range(e):
        w1, w3, w2 = (torch.randn(i, h, generator=g) * 0.1, torch.randn(i, h, generator=g) * 0.1,
                      torch.randn(h, i, generator=g) * 0.1)
        for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
            for suffix, v in _checkpoint_tensors(fmt, w, x).items():
                layer.weight_loader(getattr(layer, f"{'w2' if name == 'w2' else 'w13'}_{suffix}"), v, (name, x))
    layer.process_weights_after_loading()
    return layer


def _compare(fmt, t, e, h, i, device, tol, layer=None):
    """The fused kernel's output (returned) against the reference loop's, within ``tol`` relative L2."""
    layer = layer if layer is not None else _layer(fmt, e, h, i)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t))
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t + 1))
    weights, ids = layer.select_experts(logits)
    expected = layer.quant_method.apply(layer, x, weights, ids)  # CPU: the reference loop
    layer.to(device)
    for name in ("w13_scale", "w2_scale", "a13_scale", "a2_scale", "w13_global", "w2_global", "a13_global",
                 "a2_global"):
        if hasattr(layer, name):
            setattr(layer, name, getattr(layer, name).to(device))
    kernel = TritonFusedMoEKernel()
    got = kernel.apply(layer, layer.quant_method.scheme, x.to(device), weights.to(device), ids.to(device))
    rel = ((got.double().cpu() - expected.double()).norm() / expected.double().norm()).item()
    assert rel <= tol, f"{fmt} T={t}: {rel:.2e}"
    return got.cpu()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("t", [1, 9, 40])
def test_fused_moe_interpreted(fmt, t):
    if _device() != "cpu":
        pytest.skip("interpreter run")
    _compare(fmt, t, 4, 64, 32, "cpu", 1e-5)


def test_per_token_fp8_down_input_takes_the_layers_row_amax():
    """Under tensor parallelism the down GEMM's input is this rank's slice of each row, quantized under the
    whole row's amax: the kernel asks the layer (``reduce_token_amax``, here a stand-in for peers whose slices
    are 3x larger) as the reference loop does, and the answer changes the output."""
    triton_device(False)
    layer = _layer("fp8-pcpt", 4, 64, 32)
    alone = _compare("fp8-pcpt", 9, 4, 64, 32, "cpu", 1e-5, layer)
    layer.reduce_token_amax = lambda amax: amax * 3
    sliced = _compare("fp8-pcpt", 9, 4, 64, 32, "cpu", 1e-5, layer)
    assert ((sliced - alone).norm() / alone.norm()).item() > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("t", [1, 16, 256, 1024])
def test_fused_moe_gpu(fmt, t):
    if _device() != "cuda":
        pytest.skip("GPU run")
    tol = {"fp8": 1e-2 if t > 16 else 1e-5, "fp8-pcpt": 1e-2 if t > 16 else 1e-5, "nvfp4": 2e-2}.get(fmt, 1e-5)
    _compare(fmt, t, 16, 512, 256, "cuda", tol)



@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("split", [1, 3])
def test_small_tiles_and_split_k_interpreted(monkeypatch, fmt, split):
    """K and N spanning several tiles (the default tiles cover the small test shapes in one), and
    the down GEMM's K split across programs with a last split shorter than the others."""
    if _device() != "cpu":
        pytest.skip("interpreter run")
    monkeypatch.setattr(triton_moe, "gemm_config", lambda nvfp4, fp8, gated, block_m: dict(
        BLOCK_N=16 if gated and not nvfp4 else 32, BLOCK_K=32, num_warps=4, num_stages=2))
    monkeypatch.setattr(triton_moe, "_split_k", lambda programs, k, block_k, device: split)
    _compare(fmt, 9, 4, 64, 80, "cpu", 1e-5)
