"""Dummy weights: a real architecture's shapes with random weights in a format's checkpoint layout.

For benchmarks and tests without downloads (vLLM's ``load_format="dummy"``). The model is built
from a config (a preset under ``mopt/data/presets/``, a checkpoint folder's config.json, or a config
object) with the quant config a ModelOpt export of that format would carry. Every linear layer
then gets, per fused shard, a random float weight ``N(0, 1/K)`` quantized by the format's reference
numerics into exactly the tensors ModelOpt writes (``weight``, ``weight_scale``, ``input_scale``,
``weight_scale_2``, ``k_scale``/``v_scale``), pushed through the same weight loaders a checkpoint
goes through, and then the same ``process_weights_after_loading``: a dummy model shares every line
with a real one after loading. Static activation scales assume activations of magnitude up to
``ACTIVATION_AMAX``; the formats of ``presets.SYNTHETIC_FORMATS`` take their tensors from
``mopt.quant.synthetic`` instead (its own amax and smoothing). Weights are drawn from a seeded generator on
the model's device, so the same preset, format and seed give the same model. Every tensor is drawn at its full checkpoint shape, in
the same order, whatever the tensor-parallel split: each rank's loaders keep their own slices, so a
sharded dummy model is the unsharded one, split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from mopt.engine.loader import build_model, finish_loading, resolve_kv_cache_dtype
from mopt.engine.presets import DUMMY_FORMATS, PRESETS_DIR, SYNTHETIC_FORMATS, preset_names
from mopt.layers.attention import Attention
from mopt.layers.basic import RMSNorm, VocabEmbedding
from mopt.layers.fused_moe import FusedMoE
from mopt.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear
from mopt.quant.config import config_from_dict
from mopt.quant import synthetic
from mopt.quant.formats import fp8, nvfp4

ACTIVATION_AMAX = 8.0


def load_config(source) -> object:
    """A transformers config from a preset name, a checkpoint folder or a config.json path (a
    config object passes through)."""
    if not isinstance(source, (str, Path)):
        return source
    from transformers import AutoConfig

    path = Path(source)
    if str(source) in preset_names():
        path = PRESETS_DIR / f"{source}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{source}: not a preset ({', '.join(preset_names())}), a checkpoint folder or a "
                         "config.json file")
    try:
        raw = json.loads(path.read_text())
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a usable model config ({e})") from None


def dummy_quant_config(fmt: str):
    if fmt not in DUMMY_FORMATS:
        raise ValueError(f"unknown dummy format {fmt!r}; choose one of {sorted(DUMMY_FORMATS)}")
    section = DUMMY_FORMATS[fmt]
    if section is None:
        return None
    return config_from_dict({"producer": {"name": "modelopt"},
                             "quantization": dict(section, exclude_modules=["lm_head"])}, f"dummy {fmt}")


def _fp8_tensor(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = fp8.scale_from_amax(w.abs().amax())
    return {"weight": fp8.quantize(w, scale), "weight_scale": scale.reshape(()),
            "input_scale": torch.tensor(ACTIVATION_AMAX / fp8.FP8_MAX, device=w.device)}


def _fp8_channel(w: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scale = fp8.quantize_per_channel(w)
    return {"weight": q, "weight_scale": scale.reshape(-1)}


def _fp8_block(w: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scale = fp8.quantize_blocks(w)
    return {"weight": q, "weight_scale": scale}


def _nvfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    g = nvfp4.global_scale_from_amax(w.abs().amax())
    packed, block_scale = nvfp4.quantize(w, g)
    return {"weight": packed, "weight_scale": block_scale, "weight_scale_2": g.reshape(()),
            "input_scale": nvfp4.global_scale_from_amax(torch.tensor(ACTIVATION_AMAX, device=w.device))}


# Linear and MoE schemes share their value names; each maps a float weight [N, K] to its tensors.
_EXPORTERS: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
    "fp8_tensor": _fp8_tensor,
    "fp8_channel_token": _fp8_channel,
    "fp8_block": _fp8_block,
    "fp8_block_weight_only": _fp8_block,  # FP8_PB_WO: the same stored tensors, activations left unquantized
    "nvfp4": _nvfp4,
}


def _export(scheme, w: torch.Tensor, dtype: torch.dtype, fmt: str) -> dict[str, torch.Tensor]:
    if scheme.value == "unquantized":  # bf16, and layers the export leaves out (lm_head)
        return {"weight": w.to(dtype)}
    exporter = synthetic.TENSORS[fmt] if fmt in SYNTHETIC_FORMATS else _EXPORTERS.get(scheme.value)
    return exporter(w) if exporter is not None else {"weight": w.to(dtype)}


def _shards(layer: LinearBase) -> list[tuple[object, int]]:
    """(shard id, rows) of each checkpoint tensor that feeds ``layer`` (the whole tensor, not a rank's part)."""
    if isinstance(layer, QKVParallelLinear):
        kv = layer.total_num_kv_heads * layer.head_size
        return [("q", layer.total_num_heads * layer.head_size), ("k", kv), ("v", kv)]
    if isinstance(layer, MergedColumnParallelLinear):
        return [(i, size) for i, size in enumerate(layer.output_sizes)]
    return [(None, getattr(layer, "vocab_size", layer.output_size))]


class _Filler:
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, seed: int, fmt: str) -> None:
        self.device = next(model.parameters()).device
        self.dtype, self.fmt = dtype, fmt
        self.gen = torch.Generator(self.device).manual_seed(seed)

    def randn(self, *shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device) * std

    def linear(self, layer: LinearBase) -> None:
        k = layer.input_size
        for shard, rows in _shards(layer):
            w = self.randn(rows, k, std=k**-0.5)
            for suffix, t in _export(layer.quant_method.scheme, w, self.dtype, self.fmt).items():
                layer.weight_loader(getattr(layer, suffix), t, shard)
            if layer.bias is not None:
                layer.weight_loader(layer.bias, self.randn(rows, std=0.02).to(self.dtype), shard)

    def experts(self, layer: FusedMoE) -> None:
        h, inter = layer.hidden_size, getattr(layer, "total_intermediate_size", layer.intermediate_size)
        for e in range(getattr(layer, "total_num_experts", layer.num_experts)):
            for proj, (rows, k) in (("w1", (inter, h)), ("w3", (inter, h)), ("w2", (h, inter))):
                stacked = "w2" if proj == "w2" else "w13"
                w = self.randn(rows, k, std=k**-0.5)
                for suffix, t in _export(layer.quant_method.scheme, w, self.dtype, self.fmt).items():
                    layer.weight_loader(getattr(layer, f"{stacked}_{suffix}"), t, (proj, e))

    def attention(self, layer: Attention) -> None:
        if layer.quant_method is not None:
            algo = getattr(layer.quant_method, "kv_algo", None)
            # ModelOpt's k_scale / v_scale: amax / 448, except INT8's amax / 127.
            amax_div = 127.0 if algo == "INT8" else fp8.FP8_MAX
            for name in ("k_scale", "v_scale"):
                getattr(layer, name).weight_loader(getattr(layer, name),
                                                   torch.tensor(ACTIVATION_AMAX / amax_div, device=self.device))
            if algo == "NVFP4_AFFINE":  # the per-channel means its bias calibrator measures
                for name in ("k_bias", "v_bias"):
                    param = getattr(layer, name)
                    param.weight_loader(param, self.randn(layer.num_kv_heads, layer.head_dim, std=0.1))

    def fill(self, model: torch.nn.Module) -> None:
        tied = model.lm_head if getattr(model, "tie_word_embeddings", False) else None
        for module in model.modules():
            if module is tied:
                continue  # finish_loading copies the embedding into it
            if isinstance(module, LinearBase):
                self.linear(module)
            elif isinstance(module, FusedMoE):
                self.experts(module)
            elif isinstance(module, Attention):
                self.attention(module)
            elif isinstance(module, RMSNorm):
                module.weight.weight_loader(module.weight, torch.ones_like(module.weight, device=self.device))
            elif isinstance(module, VocabEmbedding):
                full = self.randn(module.num_embeddings, module.embedding_dim)
                module.weight.weight_loader(module.weight, full.to(self.dtype))


def build_dummy_model(config, fmt: str = "bf16", device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, kv_cache_dtype: str = "auto",
                      seed: int = 0) -> torch.nn.Module:
    """A model of ``config``'s architecture with random weights in format ``fmt`` (see module doc)."""
    config = load_config(config)
    quant = dummy_quant_config(fmt)
    model = build_model(config, quant, torch.device(device), dtype, resolve_kv_cache_dtype(kv_cache_dtype, quant),
                        f"dummy {getattr(config, 'architectures', None)}")
    with torch.no_grad():
        _Filler(model, dtype, seed, fmt).fill(model)
    return finish_loading(model, f"dummy {fmt} model")


def tiny_preset_config():
    """A small Llama config (2 layers, hidden 256, 4 heads / 2 KV heads of 64, vocab 320) for tests."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       architectures=["LlamaForCausalLM"], eos_token_id=None, bos_token_id=None)


def tiny_moe_preset_config():
    """A small Qwen3-MoE config (2 layers, hidden 256, 8 experts of 128, 2 per token, vocab 320) for tests."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                          num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, norm_topk_prob=True, max_position_embeddings=512,
                          architectures=["Qwen3MoeForCausalLM"], eos_token_id=None, bos_token_id=None)
