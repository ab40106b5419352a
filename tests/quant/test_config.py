"""ModelOpt config detection, both config forms, normalisation, validation and exclusions."""

import json

import pytest
import torch

from mopt.names import NameMapper
from mopt.quant.config import (
    KV_CACHE_QUANT_ALGOS,
    QUANT_ALGOS,
    ModelOptFp8Config,
    ModelOptNvFp4Config,
    ModelOptQuantConfigBase,
    QuantConfigError,
    load_quant_config,
)
from mopt.quant.methods import (
    ModelOptFp8KVCacheMethod,
    ModelOptFp8LinearMethod,
    ModelOptFp8PbWoLinearMethod,
    ModelOptFp8PcPtLinearMethod,
    ModelOptNvFp4LinearMethod,
    UnquantizedLinearMethod,
)


def test_public_constants():
    assert QUANT_ALGOS[:4] == ["FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4"]
    assert set(QUANT_ALGOS[4:]) == {  # registered by mopt.quant.config_algos / config_mixed
        "W4A16_AWQ", "W4A8_AWQ", "W8A16", "W8A8_SQ_PER_CHANNEL", "MXFP8", "MXFP4", "W4A8_MXFP4_FP8",
        "W4A16_NVFP4", "W4A8_NVFP4_FP8", "NVFP4_AWQ", "NVFP4_SVD", "FP8_PB_REAL", "MIXED_PRECISION"}
    assert KV_CACHE_QUANT_ALGOS == ["FP8", "NVFP4", "NVFP4_AFFINE", "INT8"]


DETECTION = [
    # (config dict, Fp8Config result, NvFp4Config result)
    ({"quant_method": "modelopt", "quantization": {"quant_algo": "FP8"}}, "modelopt", None),
    ({"quant_method": "modelopt", "quantization": {"quant_algo": "fp8_pb_wo"}}, "modelopt", None),
    ({"quant_method": "modelopt", "quantization": {"quant_algo": "NVFP4"}}, None, "modelopt_fp4"),
    ({"quant_method": "MODELOPT", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}, "modelopt", None),
    ({"quant_method": "modelopt", "quant_algo": "nvfp4"}, None, "modelopt_fp4"),
    ({"quant_method": "modelopt", "quant_algo": "FP4"}, None, "modelopt_fp4"),
    ({"quant_method": "gptq", "quant_algo": "FP8"}, None, None),
    ({"quant_algo": "FP8"}, None, None),
    ({"quant_method": "modelopt", "quantization": "FP8"}, None, None),
    (None, None, None),
]


@pytest.mark.parametrize("cfg,fp8,fp4", DETECTION)
def test_override_quantization_method(cfg, fp8, fp4):
    assert ModelOptFp8Config.override_quantization_method(cfg, None) == fp8
    assert ModelOptNvFp4Config.override_quantization_method(cfg, None) == fp4


PARSE = [
    # hf_quant_config.json form
    ({"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "fp8",
                       "exclude_modules": ["lm_head"]}},
     ModelOptFp8Config, "FP8", "FP8", ["lm_head"], ModelOptFp8LinearMethod),
    ({"quantization": {"quant_algo": "fp8_pb_wo", "exclude_modules": []}},
     ModelOptFp8Config, "FP8_PB_WO", None, [], ModelOptFp8PbWoLinearMethod),
    ({"quantization": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}},
     ModelOptFp8Config, "FP8_PER_CHANNEL_PER_TOKEN", None, [], ModelOptFp8PcPtLinearMethod),
    ({"quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": "16",
                       "exclude_modules": ["lm_head"]}},
     ModelOptNvFp4Config, "NVFP4", None, ["lm_head"], ModelOptNvFp4LinearMethod),
    # config.json quantization_config form
    ({"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head", "model.embed_tokens"],
      "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}},
     ModelOptFp8Config, "FP8", "FP8", ["lm_head", "model.embed_tokens"], ModelOptFp8LinearMethod),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4", "kv_cache_scheme": "NVFP4", "ignore": None},
     ModelOptNvFp4Config, "NVFP4", "NVFP4", [], ModelOptNvFp4LinearMethod),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4", "kv_cache_quant_algo": "fp8"},
     ModelOptNvFp4Config, "NVFP4", "FP8", [], ModelOptNvFp4LinearMethod),
]


@pytest.mark.parametrize("cfg,cls,algo,kv,excl,method", PARSE)
def test_from_config_both_forms(cfg, cls, algo, kv, excl, method):
    qc = cls.from_config(cfg)
    assert isinstance(qc, cls) and qc.quant_method == algo
    assert qc.kv_cache_quant_algo == kv and qc.exclude_modules == excl
    assert qc.LinearMethodCls is method


ERRORS = [
    (ModelOptFp8Config, {"quantization": {"kv_cache_quant_algo": "FP8"}}, "missing 'quant_algo'"),
    (ModelOptFp8Config, {"quant_method": "modelopt"}, "missing 'quant_algo'"),
    (ModelOptFp8Config, {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": 8}},
     "kv_cache_quant_algo must be a string"),
    (ModelOptFp8Config, {"quantization": {"quant_algo": "FP8", "exclude_modules": "lm_head"}},
     "exclude_modules must be a list"),
    (ModelOptNvFp4Config, {"quantization": {"quant_algo": "NVFP4", "group_size": "sixteen",
                                            "kv_cache_quant_algo": None, "exclude_modules": []}},
     "group_size must be an integer"),
    (ModelOptFp8Config, {"quantization": {"quant_algo": "INT4_AWQ"}},
     r"unsupported ModelOpt quant_algo 'INT4_AWQ'; mopt supports \['FP8'"),
    (ModelOptNvFp4Config, {"quantization": {"quant_algo": "NVFP4"}},
     r"requires these fields in hf_quant_config.json: \['group_size', 'kv_cache_quant_algo', 'exclude_modules'\]"),
    (ModelOptFp8Config, {"quantization": ["FP8"]}, "'quantization' must be a dictionary"),
    (ModelOptNvFp4Config, {"quant_algo": "NVFP4", "group_size": 32}, "group_size must be 16"),
    (ModelOptFp8Config, {"quant_algo": "FP8", "kv_cache_scheme": {"num_bits": 4, "type": "int"}},
     "unsupported kv_cache_scheme"),
]


@pytest.mark.parametrize("cls,cfg,message", ERRORS)
def test_validation_errors(cls, cfg, message):
    with pytest.raises(QuantConfigError, match=message):
        cls.from_config(cfg)


def test_quant_config_error_is_a_value_error():
    assert issubclass(QuantConfigError, ValueError)


def test_identity():
    fp8 = ModelOptFp8Config("FP8")
    fp4 = ModelOptNvFp4Config()
    assert (fp8.get_name(), fp4.get_name()) == ("modelopt", "modelopt_fp4")
    assert (fp8.get_min_capability(), fp4.get_min_capability()) == (89, 75)
    assert ModelOptQuantConfigBase.get_config_filenames() == ["hf_quant_config.json"]
    assert torch.bfloat16 in fp8.get_supported_act_dtypes()
    assert torch.float8_e4m3fn in fp4.get_supported_act_dtypes()


EXCLUSION = [
    # (exclude_modules, prefix, excluded?)
    (["lm_head"], "lm_head", True),
    (["lm_head"], "model.layers.0.mlp.down_proj", False),
    (["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
      "model.layers.0.self_attn.v_proj"], "model.layers.0.self_attn.qkv_proj", True),
    (["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], "model.layers.0.mlp.gate_up_proj", True),
    (["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"], "model.layers.0.mlp.gate_up_proj", False),
    (["*mlp*"], "model.layers.3.mlp.down_proj", True),
    (["model.layers.1*"], "model.layers.1.self_attn.o_proj", True),
    (["model.layers.1.*"], "model.layers.10.self_attn.o_proj", False),
    (["model.layers.1*"], "model.layers.10.self_attn.o_proj", True),  # ModelOpt's own semantics
    # Legacy substring rule, also behind a language_model. prefix.
    (["self_attn.o_proj"], "model.layers.2.self_attn.o_proj", True),
    (["model.layers.2.mlp"], "language_model.model.layers.2.mlp.down_proj", True),
    ([], "anything", False),
]


@pytest.mark.parametrize("excl,prefix,expected", EXCLUSION)
def test_is_layer_excluded(excl, prefix, expected):
    assert ModelOptFp8Config("FP8", exclude_modules=excl).is_layer_excluded(prefix) is expected


def test_partially_excluded_fused_layer_is_an_error():
    qc = ModelOptFp8Config("FP8", exclude_modules=["model.layers.0.self_attn.q_proj"])
    with pytest.raises(QuantConfigError, match="not all shards of the fused layer model.layers.0.self_attn.qkv_proj"):
        qc.is_layer_excluded("model.layers.0.self_attn.qkv_proj")


def test_custom_packed_modules_mapping():
    qc = ModelOptFp8Config("FP8", exclude_modules=["m.w1", "m.w3"],
                           packed_modules_mapping={"w13": ["w1", "w3"]})
    assert qc.is_layer_excluded("m.w13")
    partial = ModelOptFp8Config("FP8", exclude_modules=["m.w1"], packed_modules_mapping={"w13": ["w1", "w3"]})
    with pytest.raises(QuantConfigError, match="not all shards"):
        partial.is_layer_excluded("m.w13")


def test_wildcards_survive_name_mapping():
    """`model.vision_tower*` must still exclude the vision tower after renaming its prefix."""
    qc = ModelOptFp8Config("FP8", exclude_modules=["model.vision_tower*", "lm_head", "model.layers.*.mlp*"])
    qc.apply_name_mapper(NameMapper(prefix={"model.vision_tower.": "vision_tower.",
                                            "model.vision_tower": "vision_tower"}))
    assert qc.exclude_modules == ["vision_tower", "vision_tower.*", "lm_head",
                                  "model.layers.*.mlp", "model.layers.*.mlp.*"]
    assert qc.is_layer_excluded("vision_tower.encoder.layers.0.fc1")
    assert qc.is_layer_excluded("model.layers.4.mlp.down_proj")
    assert not qc.is_layer_excluded("model.layers.4.self_attn.o_proj")


class _Layer(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.quant_kind = kind


DISPATCH = [
    ("linear", "model.layers.0.self_attn.qkv_proj", ModelOptFp8LinearMethod),
    ("linear", "lm_head", UnquantizedLinearMethod),
    ("linear", "vision_model.blocks.0.fc1", UnquantizedLinearMethod),
    ("linear", "model.vision_tower.fc", UnquantizedLinearMethod),
    ("attention", "model.layers.0.self_attn.attn", ModelOptFp8KVCacheMethod),
    ("attention", "lm_head", ModelOptFp8KVCacheMethod),
    ("norm", "model.norm", type(None)),
    ("norm", "lm_head", type(None)),
]


@pytest.mark.parametrize("kind,prefix,method", DISPATCH)
def test_get_quant_method(kind, prefix, method):
    qc = ModelOptFp8Config("FP8", "FP8", exclude_modules=["lm_head"])
    assert type(qc.get_quant_method(_Layer(kind), prefix)) is method


def test_moe_methods():
    from mopt.quant.methods.moe import ModelOptFp8MoEMethod, ModelOptNvFp4FusedMoE

    prefix = "model.layers.0.mlp.experts"
    assert type(ModelOptFp8Config("FP8").get_quant_method(_Layer("moe"), prefix)) is ModelOptFp8MoEMethod
    nvfp4 = ModelOptNvFp4Config(True, None, ["lm_head"], 16)
    assert type(nvfp4.get_quant_method(_Layer("moe"), prefix)) is ModelOptNvFp4FusedMoE
    assert ModelOptFp8Config("FP8", exclude_modules=[prefix]).get_quant_method(_Layer("moe"), prefix) is None
    from mopt.quant.config_algos import ModelOptInt4AwqConfig

    with pytest.raises(QuantConfigError, match="mixture-of-experts layers are not supported"):
        ModelOptInt4AwqConfig("W4A16_AWQ").get_quant_method(_Layer("moe"), prefix)  # ModelOpt cannot export them


def _write(tmp_path, name, data):
    (tmp_path / name).write_text(data if isinstance(data, str) else json.dumps(data))


LOAD = [
    # files -> expected class, algo, kv (or None for unquantized)
    ({"hf_quant_config.json": {"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}},
      "config.json": {}}, ModelOptFp8Config, "FP8", "FP8"),
    ({"config.json": {"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4",
                                              "kv_cache_scheme": "NVFP4", "ignore": []}}},
     ModelOptNvFp4Config, "NVFP4", "NVFP4"),
    ({"config.json": {"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8",
                                              "kv_cache_scheme": {"num_bits": 8, "type": "float"}}}},
     ModelOptFp8Config, "FP8", "FP8"),
    ({"config.json": {"architectures": ["LlamaForCausalLM"]}}, None, None, None),
]


@pytest.mark.parametrize("files,cls,algo,kv", LOAD)
def test_load_quant_config(tmp_path, files, cls, algo, kv):
    for name, data in files.items():
        _write(tmp_path, name, data)
    qc = load_quant_config(tmp_path)
    if cls is None:
        assert qc is None
    else:
        assert type(qc) is cls and qc.quant_method == algo and qc.kv_cache_quant_algo == kv


LOAD_ERRORS = [
    ({"config.json": {"quantization_config": {"quant_method": "gptq", "bits": 4}}},
     r"config.json: quantization_config.quant_method is 'gptq'; mopt runs checkpoints quantized by NVIDIA ModelOpt"),
    ({"hf_quant_config.json": "{not json"}, r"hf_quant_config.json: not valid JSON"),
    ({"hf_quant_config.json": {"producer": {"name": "other-tool"}, "quantization": {}}}, "produced by 'other-tool'"),
    ({"hf_quant_config.json": {"producer": {"name": "modelopt"}}}, "missing the 'quantization' section"),
    ({"hf_quant_config.json": {"quantization": {"quant_algo": "INT4_GPTQ"}}},
     r"hf_quant_config.json: unsupported ModelOpt quant_algo 'INT4_GPTQ'"),
    ({}, "no config.json"),
    ({"config.json": "[1, 2]"}, "expected a JSON object"),
]


@pytest.mark.parametrize("files,message", LOAD_ERRORS)
def test_load_quant_config_errors(tmp_path, files, message):
    for name, data in files.items():
        _write(tmp_path, name, data)
    with pytest.raises(QuantConfigError, match=message):
        load_quant_config(tmp_path)
