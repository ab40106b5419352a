"""Quant configs that must be refused with a QuantConfigError naming the field (issue 15).

Each row is one class of bad input from the fuzzing run, in both config forms where both exist.
"""

import json

import pytest

from mopt.errors import MoptError
from mopt.quant.config import (
    ModelOptFp8Config,
    ModelOptNvFp4Config,
    ModelOptQuantConfigBase,
    QuantConfigError,
    load_quant_config,
)

NVFP4_HF = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"], "group_size": 16}


def hf_form(**changes):
    return {"quantization": {**NVFP4_HF, **changes}}


def json_form(**changes):
    return {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ["lm_head"], "group_size": 16, **changes}


BAD = [
    # (name, parser class, config, message)
    ("class does not match quant_algo", ModelOptNvFp4Config, {"quant_algo": "FP8", "ignore": []},
     r"quant_algo 'FP8' is parsed by ModelOptFp8Config, not ModelOptNvFp4Config"),
    ("class does not match quant_algo (fp8)", ModelOptFp8Config, {"quantization": {"quant_algo": "NVFP4"}},
     r"quant_algo 'NVFP4' is parsed by ModelOptNvFp4Config, not ModelOptFp8Config"),
    ("non-string exclusions", ModelOptNvFp4Config, json_form(ignore=[1, 2]),
     r"ignore\[0\] must be a module name \(a string\), got int 1"),
    ("dict as exclusions", ModelOptNvFp4Config, hf_form(exclude_modules={}),
     r"quantization.exclude_modules must be a list of module names, got dict"),
    ("nested list in exclusions", ModelOptFp8Config, {"quant_algo": "FP8", "ignore": ["lm_head", ["x"]]},
     r"ignore\[1\] must be a module name"),
    ("empty exclusion excludes everything", ModelOptFp8Config, {"quant_algo": "FP8", "ignore": [""]},
     r"ignore\[0\] is an empty module name"),
    ("fractional group_size", ModelOptNvFp4Config, json_form(group_size=16.5), r"group_size must be an integer, got float 16.5"),
    ("infinite group_size", ModelOptNvFp4Config, hf_form(group_size=float("-inf")),
     r"quantization.group_size must be an integer, got float -inf"),
    ("NaN group_size", ModelOptNvFp4Config, json_form(group_size=float("nan")), r"group_size must be an integer"),
    ("bool group_size", ModelOptNvFp4Config, json_form(group_size=True), r"group_size must be an integer, got bool"),
    ("huge group_size", ModelOptNvFp4Config, json_form(group_size=10**40), r"NVFP4 group_size must be 16"),
    ("numeric quant_algo", ModelOptFp8Config, {"quant_algo": 8}, r"quant_algo must be a non-empty string, got int 8"),
    ("list quant_algo", ModelOptFp8Config, {"quantization": {"quant_algo": ["FP8"]}},
     r"quantization.quant_algo must be a non-empty string"),
    ("numeric kv algo", ModelOptFp8Config, {"quant_algo": "FP8", "kv_cache_quant_algo": 8},
     r"kv_cache_quant_algo must be a string or null, got int 8"),
    ("kv scheme with bool bits", ModelOptFp8Config, {"quant_algo": "FP8", "kv_cache_scheme": {"type": "float", "num_bits": True}},
     r"unsupported kv_cache_scheme"),
    ("config not an object", ModelOptFp8Config, ["FP8"], r"must be an object, got list"),
]


@pytest.mark.parametrize("cls,cfg,message", [pytest.param(*row[1:], id=row[0]) for row in BAD])
def test_bad_quant_configs_are_refused(cls, cfg, message):
    with pytest.raises(QuantConfigError, match=message):
        cls.from_config(cfg)


def test_base_class_dispatches_on_quant_algo():
    assert type(ModelOptQuantConfigBase.from_config({"quant_algo": "FP8"})) is ModelOptFp8Config
    assert type(ModelOptQuantConfigBase.from_config(json_form())) is ModelOptNvFp4Config


@pytest.mark.parametrize("value,expected", [(16, 16), (16.0, 16), ("16", 16)])
def test_integral_group_sizes_are_accepted(value, expected):
    assert ModelOptNvFp4Config.from_config(json_form(group_size=value)).group_size == expected


def _utf16(text: str) -> bytes:
    return text.encode("utf-16")  # with a BOM


FILES = [
    # (name, file name, bytes, message)
    ("UTF-16 with BOM", "hf_quant_config.json", _utf16(json.dumps(hf_form())), r"hf_quant_config.json: not UTF-8 text"),
    ("deeply nested", "hf_quant_config.json", b"[" * 100_000 + b"]" * 100_000, r"hf_quant_config.json: JSON nested too deeply"),
    ("5000-digit integer", "hf_quant_config.json",
     b'{"quantization": {"quant_algo": "NVFP4", "group_size": ' + b"1" * 5000 + b"}}", r"hf_quant_config.json: not valid JSON"),
    ("duplicate keys", "hf_quant_config.json", b'{"quantization": {"quant_algo": "FP8", "quant_algo": "NVFP4"}}',
     r"duplicate key 'quant_algo'"),
    ("producer not an object", "hf_quant_config.json", json.dumps({"producer": "modelopt", **hf_form()}).encode(),
     r"hf_quant_config.json: producer must be an object"),
    ("quant_method not a string", "config.json", json.dumps({"quantization_config": {"quant_method": ["modelopt"]}}).encode(),
     r"quantization_config.quant_method is \['modelopt'\]"),
    ("config.json quantization_config bad", "config.json",
     json.dumps({"quantization_config": json_form(ignore=[None])}).encode(), r"config.json quantization_config: ignore\[0\]"),
]


@pytest.mark.parametrize("name,data,message", [pytest.param(*row[1:], id=row[0]) for row in FILES])
def test_bad_quant_config_files(tmp_path, name, data, message):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / name).write_bytes(data)
    with pytest.raises(QuantConfigError, match=message) as info:
        load_quant_config(tmp_path)
    assert isinstance(info.value, MoptError)
