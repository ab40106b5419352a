"""What a CUDA graph cannot hold, checked on a CPU: the Python around the GPU kernels of every format's decode
step creates no tensor from host data (on a GPU a synchronizing host-to-device copy, which fails inside a
capture) and reads no device value on the host (``.item()``, ``.tolist()``, ``bool()``, ``unique``,
``nonzero``). Layers are built from checkpoint-layout tensors (``mopt.bench.kernel_formats``) and run
through the kernel the CUDA selector picks for their scheme, its Triton parts through the interpreter; the
emulated KV caches' rounding runs on an attention layer. A kernel that must read the routing on the host
(the reference MoE expert loop) says so, and the engine then decodes without graphs."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mopt.bench import kernel_formats
from mopt.kernels.linear import candidate_kernels

pytest.importorskip("triton")
HOST_SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "unique", "nonzero"}


class HostTraffic(TorchFunctionMode):
    """Records tensors made from Python data and device values read on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in ("tensor", "as_tensor") and args and not isinstance(args[0], torch.Tensor):
            self.calls.append(f"torch.{name}({args[0]!r})")
        elif name in HOST_SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _gpu_kernel(shape):
    """The kernel the CUDA selector picks for ``shape`` on a Hopper GPU (device support not asked)."""
    return next(k for k in candidate_kernels("cuda") if k.can_implement(shape)[0])


@pytest.mark.parametrize("name", list(kernel_formats.FORMATS))
@pytest.mark.parametrize("m", [1, 5])
def test_linear_decode_glue_is_graph_safe(name, m, monkeypatch):
    monkeypatch.setenv("MOPT_BACKEND", "reference")  # canonical weights, then the GPU kernel swapped in
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = kernel_formats.build_layer(name, w, torch.float32)
    kernel = _gpu_kernel(layer.linear_shape)()
    kernel.process_weights(layer)
    layer.quant_method.kernel = kernel
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), HostTraffic() as traffic:
        layer(x)
    assert traffic.calls == [], f"{name} through {kernel.name}: {traffic.calls}"


@pytest.mark.parametrize("algo", ["NVFP4", "NVFP4_AFFINE", "INT8"])
def test_emulated_kv_cache_rounding_is_graph_safe(algo):
    from types import SimpleNamespace

    from mopt.layers.attention import Attention
    from mopt.layers.basic import RotaryEmbedding
    from mopt.quant.config import ModelOptFp8Config

    rotary = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0, max_position_embeddings=64), 64)
    attn = Attention(4, 64, 2, 0.125, rotary, ModelOptFp8Config("FP8", True, algo), "model.layers.0.self_attn.attn")
    for name in ("k_scale", "v_scale"):
        getattr(attn, name).weight_loader(getattr(attn, name), torch.tensor(0.02))
    attn.process_weights_after_loading()
    k, v = torch.randn(1, 6, 2, 64), torch.randn(1, 6, 2, 64)
    with HostTraffic() as traffic:
        attn.kv_emulation.round_kv(attn, k, v)
    assert traffic.calls == [], traffic.calls


def test_reference_expert_loop_keeps_decode_out_of_graphs():
    from mopt.engine.cuda_graphs import graph_blockers
    from mopt.layers.fused_moe import FusedMoE

    moe = FusedMoE(3, 2, 32, 16, prefix="model.layers.0.mlp.experts")
    for e in range(3):
        for shard, param, shape in (("w1", "w13_weight", (16, 32)), ("w3", "w13_weight", (16, 32)),
                                    ("w2", "w2_weight", (32, 16))):
            moe.weight_loader(getattr(moe, param), torch.randn(shape), (shard, e))
    moe.process_weights_after_loading()
    assert moe.quant_method.kernel.name == "reference"  # on CUDA too for INT8_SQ and W4A8 experts
    model = torch.nn.ModuleDict({"experts": moe, "linear": kernel_formats.build_layer("fp8", torch.randn(16, 32))})
    assert graph_blockers(model) == ["experts: reference kernel reads the routing on the host (one GEMM per "
                                     "expert that has tokens)"]
    assert graph_blockers(torch.nn.ModuleDict({"linear": model["linear"]})) == []


@pytest.mark.parametrize("fmt", __import__("mopt.bench.moe", fromlist=["ALL_FORMATS"]).ALL_FORMATS)
@pytest.mark.parametrize("tokens", [1, 5])
def test_fused_moe_decode_glue_is_graph_safe(fmt, tokens, monkeypatch):
    """The fused MoE kernels (every expert format has one on CUDA) route, quantize and combine on the device:
    the layer runs through the kernel the CUDA selector picks, its Triton parts through the interpreter."""
    from triton_device import triton_device

    from mopt.bench import moe
    from mopt.kernels import moe as moe_kernels

    triton_device(False)
    layer = moe._layer(fmt, 4, 2, 128, 128, "cpu")  # the reference loop on the CPU, then the CUDA kernel
    monkeypatch.setattr(moe_kernels, "cuda_capability", lambda device, capability, what: (True, ""))
    layer.quant_method.kernel = moe_kernels.select_moe_kernel(layer.quant_method.scheme, torch.device("cpu"), "auto")
    assert layer.quant_method.kernel.name.startswith("triton")
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    logits = torch.randn(tokens, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), HostTraffic() as traffic:
        layer(x, logits)
    assert traffic.calls == [], f"{fmt} through {layer.quant_method.kernel.name}: {traffic.calls}"
