"""Every linear layer of real ModelOpt exports, run through mopt's layers, for every LLM format.

For each format, a tiny random Llama is quantized and exported by NVIDIA ModelOpt at test time.
Each decoder layer's fused qkv / gate_up and its o_proj / down_proj are loaded from the
safetensors file into mopt's parallel linear layers and fed the very inputs that ModelOpt's
fake-quant model saw for them (captured with hooks on a calibration-like batch). Outputs are
compared with

(a) an independent dequantize-and-simulate computation (tests/simulate.py) from the raw checkpoint
    tensors (no mopt code), which must agree to float32 accumulation error, and
(b) ModelOpt's own fake-quant modules, after the rewrites ModelOpt's export applies first
    (``Export.export_equivalent``: fused shards' scales unified, AWQ smoothing averaged over shards
    and folded into norms), which differ only by what the exported format itself changes (below).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mopt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from mopt.quant.config import load_quant_config
from mopt.quantize import cpu_block_quantization
from simulate import simulate_linear as _simulate

pytestmark = pytest.mark.slow

# Relative L2 error, ||ours - other|| / ||other||, allowed per format: (vs simulation, vs ModelOpt).
# (a) vs the independent simulation: float32 accumulation order only; measured <= 2.6e-7 for every
#     format (2026-11-26, CPU, float32).
# (b) vs ModelOpt's fake-quant modules (measured maxima over the shapes in brackets):
#   the same function up to float32 rounding [<= 3.7e-7]: fp8-kv, nvfp4 and every other NVFP4 variant,
#     mxfp8, int4-awq, mixed;
#   ModelOpt multiplies by maxbound/amax where the checkpoint stores amax/maxbound, so a few weights
#     (or activations) round to the neighbouring code: fp8-pcpt [2.5e-4], fp8-pb-wo / fp8-pb-real
#     [5.1e-4], int8-wo [3.4e-5], int8-sq [1.4e-4], w4a8-awq (its INT4 weights re-quantized to FP8) [7.4e-4],
#     w4a8-nvfp4-fp8 [3.7e-5: on an AVX-512 CPU (2026-11-27) one of 122880 down_proj inputs lay at
#     x / scale = -2.62500024, 2e-7 past an E4M3 tie: mopt divides and rounds to -2.75, ModelOpt's
#     reciprocal product lands on the tie and rounds to even, -2.5; other CPUs' fixtures had no such
#     input, 3.7e-7]. Every format with static activation scales can meet such an input; only those
#     seen to are loosened;
#   mxfp4: ModelOpt's export rounds weights with its MXFP4QTensor (ties toward zero, float log2 for
#     the exponent), its fake quantization as its GPU kernel does (ties to even, exact exponent): an
#     occasional weight differs between the two [4.1e-4; one of 110592 weights of a v_proj];
#   w4a8-mxfp4-fp8: ModelOpt takes one FP8 scale for the whole input tensor (its config calibrates
#     none), mopt one per token: an E4M3 rounding of different scales [3.7e-2]; one token at a time
#     both are the same (test_w4a8_mxfp4_one_token_equals_modelopt).
EXACT = (1e-6, 1e-6)
TOLERANCE = {
    "fp8-kv": EXACT,
    "fp8-pcpt": (1e-6, 1e-3),
    "fp8-pb-wo": (1e-6, 1e-3),
    "fp8-pb-real": (1e-6, 1e-3),
    "nvfp4": EXACT,
    "nvfp4-awq": EXACT,
    "nvfp4-svdquant": EXACT,
    "w4a16-nvfp4": EXACT,
    "w4a8-nvfp4-fp8": (1e-6, 1e-4),
    "int4-awq": EXACT,
    "w4a8-awq": (1e-6, 1e-3),
    "int8-wo": (1e-6, 2e-4),
    "int8-sq": (1e-6, 2e-4),
    "mxfp8": EXACT,
    "mxfp4": (1e-6, 1e-3),
    "w4a8-mxfp4-fp8": (1e-6, 6e-2),
    "mixed-fp8-nvfp4": EXACT,
}
# Hidden 576 (K not a multiple of 128; q/k/v shards of 576/192/192 rows) for the formats whose layout
# meets it: 128-blocks, MX / NVFP4 blocks, INT8 channels, the mixed export. Not for INT4 groups, which
# ModelOpt cannot export there ("Cannot pack weight with input dimension 576 and block size 128:
# partial blocks are not supported."), nor for formats that only add smoothing or a different
# activation step to weights covered at 576 (their AWQ / SVD calibration is the slowest fixture).
ONLY_256 = ("int4-awq", "w4a8-awq", "nvfp4-awq", "nvfp4-svdquant", "int8-wo", "w4a8-mxfp4-fp8")
CASES = [(fmt, hidden) for fmt in TOLERANCE for hidden in (256, 576) if not (hidden == 576 and fmt in ONLY_256)]
_RENAMES = {"_svdquant_lora_a": "svdquant_lora_a", "_svdquant_lora_b": "svdquant_lora_b"}


def _capture(model, ids):
    """Inputs and outputs of every ModelOpt linear module on one forward pass."""
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0].detach(), out.detach())))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def _build_layers(cfg, qc, i):
    H, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = H // heads
    p = f"model.layers.{i}"
    return {
        "qkv": (QKVParallelLinear(H, hd, heads, kv, quant_config=qc, prefix=f"{p}.self_attn.qkv_proj",
                                  params_dtype=torch.float32),
                [(f"{p}.self_attn.{s}_proj", s) for s in "qkv"]),
        "o": (RowParallelLinear(heads * hd, H, quant_config=qc, prefix=f"{p}.self_attn.o_proj",
                                params_dtype=torch.float32), [(f"{p}.self_attn.o_proj", None)]),
        "gate_up": (MergedColumnParallelLinear(H, [cfg.intermediate_size] * 2, quant_config=qc,
                                               prefix=f"{p}.mlp.gate_up_proj", params_dtype=torch.float32),
                    [(f"{p}.mlp.gate_proj", 0), (f"{p}.mlp.up_proj", 1)]),
        "down": (RowParallelLinear(cfg.intermediate_size, H, quant_config=qc, prefix=f"{p}.mlp.down_proj",
                                   params_dtype=torch.float32), [(f"{p}.mlp.down_proj", None)]),
    }


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load_layers(export):
    """Per decoder layer and projection: (name, mopt layer, checkpoint names, raw tensors per shard)."""
    qc = load_quant_config(export.path)
    sd = load_file(export.path / "model.safetensors")
    out = []
    for i in range(export.hf_config.num_hidden_layers):
        for name, (layer, shards) in _build_layers(export.hf_config, qc, i).items():
            tensors = []
            for ckpt, shard_id in shards:
                t = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(ckpt + ".")
                     and not k.endswith(("k_scale", "v_scale", "k_bias", "v_bias"))}  # those belong to attention
                tensors.append(t)
                for pname, value in t.items():
                    layer.weight_loader(getattr(layer, _RENAMES.get(pname, pname)), value, shard_id)
            layer.process_weights_after_loading()
            out.append((f"{i}.{name}", layer, [c for c, _ in shards], tensors))
    return out


def measure(export):
    """Per layer: (name, rel err vs simulation, rel err vs fake quant, max abs err vs fake quant)."""
    reference = export.export_equivalent()
    torch.manual_seed(7)
    with cpu_block_quantization():
        seen = _capture(reference, torch.randint(0, 320, (2, 40)))  # real inputs
    rows = []
    for name, layer, ckpts, tensors in load_layers(export):
        x3 = seen[ckpts[0]][0].float()  # [batch, seq, K], as the model fed it
        x = x3.reshape(-1, layer.input_size)
        with cpu_block_quantization(), torch.no_grad():
            fake = torch.cat([reference.get_submodule(c)(x3).reshape(x.shape[0], -1) for c in ckpts], dim=-1)
            ours = layer(x)
        sim = _simulate(export.fmt, x, tensors)
        rows.append((name, _rel(ours, sim), _rel(ours, fake), (ours - fake).abs().max().item()))
    return rows


@pytest.mark.parametrize("fmt,hidden", CASES)
def test_linear_layers_match_simulation_and_modelopt(export_factory, fmt, hidden):
    export = export_factory(fmt, hidden)
    tol_sim, tol_fake = TOLERANCE[fmt]
    for name, vs_sim, vs_fake, _ in measure(export):
        assert vs_sim <= tol_sim, f"{fmt} h={hidden} layer {name}: rel err vs simulation {vs_sim:.2e}"
        assert vs_fake <= tol_fake, f"{fmt} h={hidden} layer {name}: rel err vs ModelOpt fake quant {vs_fake:.2e}"


def test_w4a8_mxfp4_one_token_equals_modelopt(export_factory):
    """W4A8_MXFP4_FP8 without an input scale: for a single token ModelOpt's whole-tensor FP8 scale is
    mopt's per-token scale, so each row fed alone must match to float32 rounding."""
    export = export_factory("w4a8-mxfp4-fp8", 256)
    reference = export.export_equivalent()
    name, layer, ckpts, _ = load_layers(export)[1]  # 0.o: o_proj
    x = torch.randn(5, layer.input_size, generator=torch.Generator().manual_seed(3))
    with cpu_block_quantization(), torch.no_grad():
        for row in x:
            fake = reference.get_submodule(ckpts[0])(row[None])
            assert _rel(layer(row[None]), fake) <= 1e-6


def test_fp8_pb_wo_w8a8_option_costs_accuracy(export_factory, monkeypatch):
    """FP8_PB_WO runs weight-only by default (ModelOpt's definition); MOPT_FP8_PB_WO_ACTIVATIONS=fp8
    quantizes activations in 1x128 groups as vLLM's block-FP8 kernels do, which moves each layer by
    about one E4M3 rounding (2**-4 relative, RMS ~2.6%; measured 2.3-2.7e-2 over the layers)."""
    export = export_factory("fp8-pb-wo", 576)
    default = {name: vs_fake for name, _, vs_fake, _ in measure(export)}
    monkeypatch.setenv("MOPT_FP8_PB_WO_ACTIVATIONS", "fp8")
    w8a8 = {name: vs_fake for name, _, vs_fake, _ in measure(export)}
    for name in default:
        assert default[name] <= 1e-3 and 1e-2 <= w8a8[name] <= 4e-2, (name, default[name], w8a8[name])
