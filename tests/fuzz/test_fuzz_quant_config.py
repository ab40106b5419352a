"""Fuzz both quant config forms of real ModelOpt exports: a QuantConfigError, or a usable config."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mopt.errors import MoptError
from mopt.quant.config import QUANT_ALGOS, ModelOptQuantConfigBase, load_quant_config
from fuzzlib import dumps, fuzz_settings, mutated, outcome

KEYS = ["quant_algo", "kv_cache_quant_algo", "exclude_modules", "group_size", "ignore", "kv_cache_scheme",
        "quant_method", "producer", "quantization", "name"]
PREFIXES = ["model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.gate_up_proj", "lm_head",
            "model.layers.0.mlp.experts"]


@pytest.fixture(scope="module")
def real_configs(export_factory):
    """hf_quant_config.json of an FP8+KV export and config.json's quantization_config of an NVFP4 one."""
    fp8 = json.loads((export_factory("fp8-kv", 256).path / "hf_quant_config.json").read_text())
    nvfp4 = json.loads((export_factory("nvfp4", 256).path / "config.json").read_text())["quantization_config"]
    return {"hf_quant_config.json": fp8, "config.json": nvfp4}


def configs(base: dict) -> st.SearchStrategy:
    """Mutations of ``base``; for the hf_quant_config.json form mostly of its 'quantization' section."""
    if "quantization" not in base:
        return mutated(base, KEYS)
    inner = mutated(base["quantization"], KEYS).map(lambda q: {**base, "quantization": q})
    return st.one_of(inner, inner, mutated(base, KEYS))


def check_usable(qc) -> None:
    """What the loader does with a parsed config must work or raise a mopt error."""
    if isinstance(qc, MoptError):
        return
    assert isinstance(qc, ModelOptQuantConfigBase) and qc.quant_method in QUANT_ALGOS
    assert all(isinstance(e, str) and e for e in qc.exclude_modules)
    for prefix in PREFIXES:
        outcome(lambda: qc.is_layer_excluded(prefix))


def _layer(kind: str):
    import torch

    layer = torch.nn.Module()
    layer.quant_kind = kind
    return layer


@pytest.mark.parametrize("form", ["hf_quant_config.json", "config.json"])
def test_fuzz_quant_config_dicts(real_configs, form):
    @fuzz_settings(max_examples=250)
    @given(config=configs(real_configs[form]))
    def run(config):
        qc = outcome(lambda: ModelOptQuantConfigBase.from_config(config))
        check_usable(qc)
        if not isinstance(qc, MoptError):
            for kind, prefix in (("linear", PREFIXES[0]), ("attention", "model.layers.0.self_attn.attn"),
                                 ("moe", PREFIXES[3])):
                outcome(lambda: qc.get_quant_method(_layer(kind), prefix))

    run()


@pytest.mark.parametrize("form", ["hf_quant_config.json", "config.json"])
def test_fuzz_quant_config_files(real_configs, form):
    """The same mutations written to disk and read by load_quant_config (also the config.json wrapper)."""
    @fuzz_settings(max_examples=60)
    @given(config=configs(real_configs[form]))
    def run(config):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            if form == "config.json":
                (root / "config.json").write_text(dumps({"quantization_config": config}))
            else:
                (root / "config.json").write_text("{}")
                (root / form).write_text(dumps(config))
            check_usable(outcome(lambda: load_quant_config(root)))

    run()
