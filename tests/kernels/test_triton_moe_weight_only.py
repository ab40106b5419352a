"""The weight-decoding fused MoE (``triton-weight-decode-moe``) against the reference expert loop, for every scheme
it runs, on experts made as ModelOpt exports them (``test_linear_loading.checkpoint_tensors``).

Interpreter (CI) at small shapes, float32 activations; GPU (``-m gpu``) at larger ones, BF16. Tolerance: the
decoded weight values and the MX activation values are exact, so only float32 summation order differs
(interpreter: 1e-5 relative L2). On the GPU the products are exact in the BF16 MMAs and accumulate in
float32 in another order than the CPU's matmul; the reference then rounds each expert's output to BF16 before
weighting it (the kernel weights the float32 sums), and MX activations re-quantized from a BF16 value that
differs in its last bit may take the neighbouring code: 2e-2, the bound the BF16 fused-MoE test shares.
"""

from __future__ import annotations

import pytest
import torch
from sibling import load_test_module
from triton_device import triton_device

from mopt.kernels.moe import MoEScheme, TritonWeightDecodeMoEKernel, select_moe_kernel
from mopt.layers.fused_moe import FusedMoE

pytest.importorskip("mopt.kernels.triton_moe_weight_only")
linear_loading = load_test_module("layers", "test_linear_loading")

# mopt's format name (test_linear_loading) -> the scheme its experts take. "-wo": MXFP4 weight-only
# (MOPT_MXFP4_ACTIVATIONS=none); "-dynamic": without the optional static input scale (FP8 per token).
FORMATS = {"int8-wo": MoEScheme.INT8_WO, "w4a16-nvfp4": MoEScheme.NVFP4_WO, "fp8-pb-wo": MoEScheme.FP8_BLOCK_WO,
           "mxfp8": MoEScheme.MXFP8, "mxfp4": MoEScheme.MXFP4, "mxfp4-wo": MoEScheme.MXFP4_WO,
           "int8-sq": MoEScheme.INT8_SQ, "w4a8-nvfp4-fp8": MoEScheme.W4A8_NVFP4,
           "w4a8-mxfp4-fp8": MoEScheme.W4A8_MXFP4, "w4a8-mxfp4-fp8-dynamic": MoEScheme.W4A8_MXFP4}


def _layer(fmt: str, e: int, h: int, i: int, dtype: torch.dtype, monkeypatch) -> FusedMoE:
    if fmt == "mxfp4-wo":
        monkeypatch.setenv("MOPT_MXFP4_ACTIVATIONS", "none")
    name = fmt.removesuffix("-wo") if fmt == "mxfp4-wo" else fmt.removesuffix("-dynamic")
    layer = FusedMoE(e, 2, h, i, dtype, quant_config=linear_loading.qc(name), prefix="model.layers.0.mlp.experts")
    for x in range(e):
        for proj, rows, cols in (("w1", i, h), ("w3", i, h), ("w2", h, i)):
            tensors = linear_loading.checkpoint_tensors(name, rows, cols, 10 * x + len(proj) + rows % 7)
            if fmt.endswith("-dynamic"):
                tensors.pop("input_scale")
            if "input_scale" in tensors:  # a static scale per expert, as calibration gives
                tensors["input_scale"] = tensors["input_scale"] * (1 + 0.25 * x)
            for tensor, t in tensors.items():
                layer.weight_loader(getattr(layer, f"{'w2' if proj == 'w2' else 'w13'}_{tensor}"), t, (proj, x))
    layer.process_weights_after_loading()
    assert layer.quant_method.scheme is FORMATS[fmt]
    return layer


def _compare(fmt: str, t: int, e: int, h: int, i: int, device: str, dtype: torch.dtype, tol: float, monkeypatch,
             foreign: bool = False, layer: FusedMoE | None = None) -> torch.Tensor:
    """The kernel's output (returned) against the reference loop's, within ``tol`` relative L2."""
    layer = layer if layer is not None else _layer(fmt, e, h, i, dtype, monkeypatch)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, h, generator=g).to(dtype)
    weights, ids = layer.select_experts(torch.randn(t, e, generator=g))
    if foreign:  # expert parallelism: pairs routed to another rank's experts carry id E
        ids = torch.where(torch.rand(ids.shape, generator=g) < 0.3, torch.full_like(ids, e), ids)
        layer.expert_parallel = True
    expected = layer.quant_method.apply(layer, x, weights, ids)  # on the CPU: the reference loop
    layer.to(device)
    for name, buffer in layer.named_buffers(recurse=False):
        if buffer is not None:
            setattr(layer, name, buffer.to(device))
    got = TritonWeightDecodeMoEKernel().apply(layer, FORMATS[fmt], x.to(device), weights.to(device), ids.to(device))
    rel = ((got.double().cpu() - expected.double()).norm() / expected.double().norm()).item()
    assert rel <= tol, f"{fmt} T={t}: {rel:.2e}"
    return got.cpu()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("t", [1, 9])
def test_weight_decode_moe_interpreted(fmt, t, monkeypatch):
    _compare(fmt, t, 4, 128, 128, triton_device(False), torch.float32, 1e-5, monkeypatch)


@pytest.mark.parametrize("fmt", ["int8-wo", "w4a16-nvfp4", "mxfp4", "int8-sq", "w4a8-nvfp4-fp8",
                                 "w4a8-mxfp4-fp8-dynamic"])
@pytest.mark.parametrize("split", [1, 3])
def test_uneven_k_n_and_split_k_interpreted(fmt, split, monkeypatch):
    """N and K spanning several tiles with a short last one (K = 160 against 128-wide tiles), the down GEMM's
    K split across programs, and expert parallelism's foreign pairs, which no GEMM may touch."""
    device = triton_device(False)
    from mopt.kernels import triton_moe_weight_only

    monkeypatch.setattr(triton_moe_weight_only, "_split_k", lambda programs, k, block_k, device: split)
    _compare(fmt, 9, 4, 96, 160, device, torch.float32, 1e-5, monkeypatch, foreign=True)


def test_per_token_fp8_down_input_takes_the_layers_row_amax(monkeypatch):
    """W4A8 without a static scale: under tensor parallelism the down GEMM's input is this rank's slice of each
    row, quantized under the whole row's amax, which the layer gives (``reduce_token_amax``; here a stand-in
    for peers whose slices are 3x larger), as the reference loop asks it; the gate/up input is whole on every
    rank and never asks."""
    triton_device(False)
    layer = _layer("w4a8-mxfp4-fp8-dynamic", 4, 128, 128, torch.float32, monkeypatch)
    alone = _compare("w4a8-mxfp4-fp8-dynamic", 9, 4, 128, 128, "cpu", torch.float32, 1e-5, monkeypatch, layer=layer)
    layer.reduce_token_amax = lambda amax: amax * 3
    sliced = _compare("w4a8-mxfp4-fp8-dynamic", 9, 4, 128, 128, "cpu", torch.float32, 1e-5, monkeypatch, layer=layer)
    assert ((sliced - alone).norm() / alone.norm()).item() > 1e-3


def test_selected_on_cuda_only_for_its_schemes():
    cuda = torch.device("cuda")
    for scheme in MoEScheme:
        ok, why = TritonWeightDecodeMoEKernel.supports(scheme, torch.device("cpu"))
        assert not ok and why
        if scheme in FORMATS.values() or not torch.cuda.is_available():
            continue
        assert select_moe_kernel(scheme, cuda).name != "triton-weight-decode-moe"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("t", [1, 16, 256])
def test_weight_decode_moe_gpu(fmt, t, monkeypatch):
    _compare(fmt, t, 16, 512, 256, triton_device(True), torch.bfloat16, 2e-2, monkeypatch)
