"""Configs of every other ModelOpt algorithm, MIXED_PRECISION, the KV-cache methods, and the two vLLM
policy details (``kv_cache_quant_method``; a listed single expert excludes its MoE layer)."""

from __future__ import annotations

import pytest
import torch

from mopt.quant import config_algos as algos
from mopt.quant.config import ModelOptFp8Config, QuantConfigError, config_from_dict
from mopt.quant.config_mixed import ModelOptMixedPrecisionConfig
from mopt.quant.methods import int_linear, kv_cache, moe, moe_formats, mx_linear, nvfp4_linear, nvfp4_variants
from mopt.quant.methods.fp8_linear import ModelOptFp8LinearMethod, ModelOptFp8PbWoLinearMethod
from mopt.quant.methods.linear import UnquantizedLinearMethod


class _Layer(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.quant_kind = kind


# quant_algo as ModelOpt 0.47 writes it (with group_size where it writes one) -> class, linear, MoE method
PARSE = [
    ({"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False, "pre_quant_scale": True},
     algos.ModelOptInt4AwqConfig, int_linear.ModelOptInt4AwqLinearMethod, None),
    ({"quant_algo": "W4A8_AWQ", "group_size": 128}, algos.ModelOptInt4AwqConfig,
     int_linear.ModelOptW4A8AwqLinearMethod, None),
    ({"quant_algo": "W8A16"}, algos.ModelOptInt8Config, int_linear.ModelOptInt8WeightOnlyLinearMethod,
     moe_formats.ModelOptInt8WeightOnlyMoEMethod),
    ({"quant_algo": "W8A8_SQ_PER_CHANNEL"}, algos.ModelOptInt8Config, int_linear.ModelOptInt8SmoothQuantLinearMethod,
     moe_formats.ModelOptInt8SmoothQuantMoEMethod),
    ({"quant_algo": "MXFP8", "group_size": 32}, algos.ModelOptMxFp8Config, mx_linear.ModelOptMxFp8LinearMethod,
     moe_formats.ModelOptMxFp8MoEMethod),
    ({"quant_algo": "mxfp4"}, algos.ModelOptMxFp4Config, mx_linear.ModelOptMxFp4LinearMethod,
     moe_formats.ModelOptMxFp4MoEMethod),
    ({"quant_algo": "W4A8_MXFP4_FP8", "group_size": 32}, algos.ModelOptMxFp4Config,
     mx_linear.ModelOptW4A8MxFp4Fp8LinearMethod, moe_formats.ModelOptW4A8MxFp4Fp8MoEMethod),
    ({"quant_algo": "W4A16_NVFP4", "group_size": 16}, algos.ModelOptFp4Config,
     nvfp4_variants.ModelOptNvFp4W4A16LinearMethod, moe_formats.ModelOptNvFp4W4A16MoEMethod),
    ({"quant_algo": "W4A8_NVFP4_FP8", "group_size": 32}, algos.ModelOptFp4Config,
     nvfp4_variants.ModelOptNvFp4W4A8LinearMethod, moe_formats.ModelOptNvFp4W4A8MoEMethod),
    ({"quant_algo": "NVFP4_AWQ", "group_size": 16}, algos.ModelOptFp4Config,
     nvfp4_variants.ModelOptNvFp4AwqLinearMethod, None),
    ({"quant_algo": "NVFP4_SVD", "group_size": 16}, algos.ModelOptFp4Config,
     nvfp4_variants.ModelOptNvFp4SvdQuantLinearMethod, None),
    ({"quant_algo": "fp8_pb_real"}, ModelOptFp8Config, ModelOptFp8PbWoLinearMethod,
     moe_formats.ModelOptFp8PbWoMoEMethod),
    ({"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}, ModelOptFp8Config, None, moe_formats.ModelOptFp8PcPtMoEMethod),
    ({"quant_algo": "fp8_pb_wo"}, ModelOptFp8Config, ModelOptFp8PbWoLinearMethod, moe_formats.ModelOptFp8PbWoMoEMethod),
]


@pytest.mark.parametrize("form", ["hf_quant_config", "config.json"])
@pytest.mark.parametrize("quant,cls,linear,moe_method", PARSE)
def test_every_algo_parses_and_picks_its_methods(quant, cls, linear, moe_method, form):
    config = ({"quantization": {**quant, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}
              if form == "hf_quant_config" else {"quant_method": "modelopt", **quant, "ignore": ["lm_head"]})
    qc = config_from_dict(config)
    assert type(qc) is cls and qc.quant_method == quant["quant_algo"].upper()
    if linear is not None:
        assert type(qc.get_quant_method(_Layer("linear"), "model.layers.0.mlp.down_proj")) is linear
    assert type(qc.get_quant_method(_Layer("linear"), "lm_head")) is UnquantizedLinearMethod
    if moe_method is None:
        with pytest.raises(QuantConfigError, match="mixture-of-experts layers are not supported"):
            qc.get_quant_method(_Layer("moe"), "model.layers.0.mlp.experts")
    else:
        assert type(qc.get_quant_method(_Layer("moe"), "model.layers.0.mlp.experts")) is moe_method


@pytest.mark.parametrize("quant,message", [
    ({"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": True}, "has_zero_point: true"),
    ({"quant_algo": "W4A16_AWQ", "group_size": 100}, r"group_size must be one of \[32, 64, 128\], got 100"),
    ({"quant_algo": "MXFP8", "group_size": 16}, r"MXFP8 group_size must be one of \[32\]"),
    ({"quant_algo": "W4A8_NVFP4_FP8", "group_size": 16}, r"group_size must be one of \[32\]"),
    ({"quant_algo": "MIXED_PRECISION"}, "needs a non-empty 'quantized_layers'"),
    ({"quant_algo": "MIXED_PRECISION", "quantized_layers": {"a.b": {"quant_algo": "INT3"}}},
     r"quantized_layers\['a.b'\]: unsupported quant_algo 'INT3'"),
    ({"quant_algo": "MIXED_PRECISION", "quantized_layers": {"a.b": {"quant_algo": "MXFP8", "group_size": 8}}},
     r"quantized_layers\['a.b'\]: MXFP8 group_size must be one of"),
])
def test_validation_errors_name_the_field(quant, message):
    with pytest.raises(QuantConfigError, match=message):
        config_from_dict({"quantization": quant}, "hf_quant_config.json")


def test_kv_cache_quant_method_is_vllms_name_for_the_algo():
    for qc in (ModelOptFp8Config("FP8", True, "FP8"), algos.ModelOptMxFp8Config("MXFP8", "NVFP4"),
               ModelOptMixedPrecisionConfig({"m.x": {"quant_algo": "FP8"}}, "NVFP4_AFFINE")):
        assert qc.kv_cache_quant_method == qc.kv_cache_quant_algo
    assert ModelOptFp8Config("FP8").kv_cache_quant_method is None


@pytest.mark.parametrize("algo,method,fp8_cache", [
    (None, kv_cache.ModelOptFp8KVCacheMethod, False), ("FP8", kv_cache.ModelOptFp8KVCacheMethod, True),
    ("NVFP4", kv_cache.ModelOptNvFp4KVCacheMethod, False),
    ("NVFP4_AFFINE", kv_cache.ModelOptNvFp4AffineKVCacheMethod, False),
    ("INT8", kv_cache.ModelOptInt8KVCacheMethod, False)])
def test_kv_cache_method_per_algo(algo, method, fp8_cache):
    qc = ModelOptFp8Config("FP8", True, algo)
    assert type(qc.get_quant_method(_Layer("attention"), "model.layers.0.self_attn.attn")) is method
    assert qc.kv_cache_quantized is fp8_cache  # only FP8 is stored natively (--kv-cache-dtype fp8)


EXPERT_EXCLUSION = [
    # (exclude_modules, prefix, excluded?) -- vLLM: a listed expert excludes its MoE layer
    (["model.layers.0.mlp.experts.0.w1"], "model.layers.0.mlp.experts", True),
    (["model.layers.0.mlp.experts.3.down_proj"], "model.layers.0.mlp.experts", True),
    (["model.layers.0.mlp.experts.0.w1"], "model.layers.1.mlp.experts", False),
    (["model.layers.1.mlp.experts.0.w1"], "model.layers.10.mlp.experts", False),
    (["model.layers.0.mlp.experts"], "model.layers.0.mlp.experts", True),
    (["model.layers.0.mlp.gate"], "model.layers.0.mlp.experts", False),
]


@pytest.mark.parametrize("exclude,prefix,expected", EXPERT_EXCLUSION)
def test_listed_expert_excludes_its_moe_layer(exclude, prefix, expected):
    qc = ModelOptFp8Config("FP8", exclude_modules=exclude)
    assert qc.is_layer_excluded(prefix) is expected
    method = qc.get_quant_method(_Layer("moe"), prefix)
    assert (method is None) is expected and (expected or type(method) is moe.ModelOptFp8MoEMethod)


# -- MIXED_PRECISION -----------------------------------------------------------------------------

MIXED = {
    "model.layers.0.self_attn.q_proj": {"quant_algo": "FP8"},
    "model.layers.0.self_attn.k_proj": {"quant_algo": "FP8"},
    "model.layers.0.self_attn.v_proj": {"quant_algo": "FP8"},
    "model.layers.0.mlp.down_proj": {"quant_algo": "NVFP4", "group_size": 16},
    "model.layers.0.mlp.experts.0.gate_proj": {"quant_algo": "W4A16_NVFP4", "group_size": 16},
    "model.layers.0.mlp.experts.1.gate_proj": {"quant_algo": "W4A16_NVFP4", "group_size": 16},
    "model.layers.1.mlp.gate_proj": {"quant_algo": "FP8"},
    "model.layers.1.mlp.up_proj": {"quant_algo": "MXFP8", "group_size": 32},
}


@pytest.fixture
def mixed():
    return config_from_dict({"quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8",
                                              "quantized_layers": MIXED}}, "hf_quant_config.json")


@pytest.mark.parametrize("kind,prefix,method", [
    ("linear", "model.layers.0.self_attn.qkv_proj", ModelOptFp8LinearMethod),
    ("linear", "model.layers.0.mlp.down_proj", nvfp4_linear.ModelOptNvFp4LinearMethod),
    ("linear", "model.layers.0.self_attn.o_proj", UnquantizedLinearMethod),  # not listed: unquantized
    ("linear", "lm_head", UnquantizedLinearMethod),
    ("moe", "model.layers.0.mlp.experts", moe_formats.ModelOptNvFp4W4A16MoEMethod),
    ("moe", "model.layers.2.mlp.experts", type(None)),
    ("attention", "model.layers.0.self_attn.attn", kv_cache.ModelOptFp8KVCacheMethod),
])
def test_mixed_precision_picks_a_method_per_layer(mixed, kind, prefix, method):
    assert type(mixed) is ModelOptMixedPrecisionConfig and mixed.quant_method == "MIXED_PRECISION"
    assert mixed.algos == ["FP8", "MXFP8", "NVFP4", "W4A16_NVFP4"]
    assert type(mixed.get_quant_method(_Layer(kind), prefix)) is method


def test_mixed_precision_fused_layer_parts_must_agree(mixed):
    with pytest.raises(QuantConfigError, match=r"model.layers.1.mlp.gate_up_proj: its parts are quantized differently"):
        mixed.get_quant_method(_Layer("linear"), "model.layers.1.mlp.gate_up_proj")
    half = ModelOptMixedPrecisionConfig({"m.layers.0.self_attn.q_proj": {"quant_algo": "FP8"}})
    with pytest.raises(QuantConfigError, match="'m.layers.0.self_attn.k_proj': None"):
        half.is_layer_excluded("m.layers.0.self_attn.qkv_proj")


def test_mixed_precision_names_follow_the_name_mapper(mixed):
    mixed.apply_name_mapper(lambda name: name.replace("model.", "language_model.model.", 1))
    method = mixed.get_quant_method(_Layer("linear"), "language_model.model.layers.0.mlp.down_proj")
    assert type(method) is nvfp4_linear.ModelOptNvFp4LinearMethod
    assert mixed.linear_method_cls("language_model.model.layers.0.self_attn.qkv_proj") is ModelOptFp8LinearMethod


@pytest.mark.slow
def test_mixed_precision_export_loads_and_inspects(export_factory, capsys):
    """A real MIXED_PRECISION export (ModelOpt 0.47 on CPU, per-layer quant configs: attention FP8, MLPs
    NVFP4): each layer gets its format's method, `mopt inspect` shows them, and the model runs."""
    from mopt import cli
    from mopt.engine.inspect import inspect_checkpoint
    from mopt.engine.loader import load_model

    export = export_factory("mixed-fp8-nvfp4", 256)
    info = inspect_checkpoint(export.path)
    layers = {module: (method, dtype) for module, method, dtype in info.layers}
    assert layers["model.layers.0.self_attn.q_proj"] == ("ModelOptFp8LinearMethod", "F8_E4M3")
    assert layers["model.layers.1.mlp.down_proj"] == ("ModelOptNvFp4LinearMethod", "U8")
    assert layers["lm_head"][0] == "UnquantizedLinearMethod (excluded)" and not info.warnings
    assert cli.main(["inspect", str(export.path)]) == 0
    out = capsys.readouterr().out
    assert "quant_algo=MIXED_PRECISION" in out and "FP8, NVFP4" in out
    model = load_model(export.path)
    assert type(model.model.layers[1].mlp.gate_up_proj.quant_method) is nvfp4_linear.ModelOptNvFp4LinearMethod
    assert type(model.model.layers[1].self_attn.qkv_proj.quant_method) is ModelOptFp8LinearMethod


@pytest.mark.parametrize("algo", ["INT8", "NVFP4", "NVFP4_AFFINE"])
def test_emulated_kv_cache_rounds_keys_and_values(algo):
    """The KV-cache method of a format attention does not store natively rounds keys (after RoPE, as a
    cache holds them) and values to what such a cache returns (``fake_quantize_kv``), on the
    cache-free path."""
    from types import SimpleNamespace

    from mopt.layers.attention import Attention
    from mopt.layers.basic import RotaryEmbedding
    from mopt.quant.formats import kv_cache as kv_format

    class NoRope(torch.nn.Module):
        def forward(self, positions, q, k):
            return q, k

    rotary = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0, max_position_embeddings=64), 64)
    qc = ModelOptFp8Config("FP8", True, algo)
    attn = Attention(4, 64, 2, 0.125, rotary, qc, "model.layers.0.self_attn.attn")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, h, 64, generator=g) for h in (4, 2, 2))
    positions = torch.arange(6)[None]
    qr, kr = rotary(positions, q, k)
    k_scale, v_scale = kr.abs().max() / (127 if algo == "INT8" else 448), v.abs().max() / (127 if algo == "INT8" else 448)
    attn.k_scale.weight_loader(attn.k_scale, k_scale)
    attn.v_scale.weight_loader(attn.v_scale, v_scale)
    bias = {}
    if algo == "NVFP4_AFFINE":
        for name in ("k_bias", "v_bias"):
            bias[name] = torch.randn(1, 2, 1, 64, generator=g) * 0.1
            getattr(attn, name).weight_loader(getattr(attn, name), bias[name])
    attn.process_weights_after_loading()
    assert attn.kv_cache_algo == algo and attn.kv_cache_storage == kv_format.kv_storage(algo, 64)
    got = attn(positions, q, k, v)
    kb = bias["k_bias"][0, :, 0] if bias else None
    vb = bias["v_bias"][0, :, 0] if bias else None
    plain = Attention(4, 64, 2, 0.125, NoRope(), None, "plain")
    want = plain(positions, qr, kv_format.fake_quantize_kv(kr, algo, k_scale, kb),
                 kv_format.fake_quantize_kv(v, algo, v_scale, vb))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, plain(positions, qr, kr, v))
