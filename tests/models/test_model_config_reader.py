"""``mopt.models.config`` reads config.json as transformers' ``AutoConfig`` does, for every family mopt
implements (the fields the model classes read, defaults and derived ones included), and declines
(``None``: transformers parses it) what it does not cover."""

from __future__ import annotations

import json

import pytest
import torch

from mopt.layers.basic import rope_inv_freq
from mopt.models.config import read_model_config
from mopt.models.registry import MODEL_REGISTRY

# Every attribute mopt's models, validation, loader and engine read from a config.
READ_FIELDS = ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
               "partial_rotary_factor", "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
               "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "qkv_bias",
               "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
               "decoder_sparse_step", "norm_topk_prob", "mlp_only_layers", "shared_expert_intermediate_size",
               "eos_token_id", "torch_dtype", "dtype")
ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
         "mixtral": "MixtralForCausalLM"}
SMOLLM2 = dict(attention_bias=False, bos_token_id=1, dtype="bfloat16", eos_token_id=2, head_dim=64, hidden_act="silu",
               hidden_size=576, intermediate_size=1536, max_position_embeddings=8192, mlp_bias=False,
               num_attention_heads=9, num_hidden_layers=30, num_key_value_heads=3, pad_token_id=2,
               rms_norm_eps=9.999999747378752e-06, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
               tie_word_embeddings=True, vocab_size=49152,
               quantization_config={"quant_algo": "FP8", "quant_method": "modelopt"})
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)

CASES = [(family, {}) for family in ARCHS] + [
    ("llama", SMOLLM2),
    ("llama", dict(SMALL, num_key_value_heads=None, rope_theta=500000.0, torch_dtype="float16")),
    ("llama", dict(SMALL, attention_bias=True, mlp_bias=True, hidden_act="gelu_pytorch_tanh", eos_token_id=[1, 2])),
    ("mistral", dict(SMALL, sliding_window=None, head_dim=32)),
    ("mistral", dict(SMALL, num_key_value_heads=2, sliding_window=16, rope_theta=1e6)),
    ("qwen2", dict(SMALL, use_sliding_window=True, sliding_window=32, max_window_layers=2)),
    ("qwen2", dict(SMALL, use_sliding_window=False, sliding_window=32, num_key_value_heads=None)),
    ("qwen2", dict(SMALL, layer_types=["full_attention", "sliding_attention"] * 2, use_sliding_window=True)),
    ("qwen3", dict(SMALL, head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    ("qwen3", dict(SMALL, head_dim=32, num_key_value_heads=None, rope_parameters={"rope_theta": 1e6})),
    ("qwen2_moe", dict(SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, use_sliding_window=True, max_window_layers=3,
                       mlp_only_layers=[1], decoder_sparse_step=2, qkv_bias=False)),
    ("qwen3_moe", dict(SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                       use_sliding_window=True, sliding_window=16, mlp_only_layers=None)),
    ("qwen3_moe", dict(SMALL, num_local_experts=6)),
    ("mixtral", dict(SMALL, num_local_experts=4, num_experts_per_tok=2, sliding_window=64, rope_theta=1e4)),
    ("mixtral", dict(SMALL, num_experts=3, head_dim=None, sliding_window=None)),
]
_MISSING = "<missing>"


def _write(tmp_path, family: str, fields: dict) -> dict:
    raw = dict(fields, architectures=[ARCHS[family]], model_type=family)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return raw


@pytest.mark.parametrize("family,fields", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_same_fields_as_transformers(family, fields, tmp_path):
    from transformers import AutoConfig

    raw = _write(tmp_path, family, fields)
    ours, theirs = read_model_config(raw), AutoConfig.from_pretrained(tmp_path)
    assert ours is not None
    for name in READ_FIELDS:
        assert getattr(ours, name, _MISSING) == getattr(theirs, name, _MISSING), name
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    (ours_inv, ours_scale), (their_inv, their_scale) = rope_inv_freq(ours, head_dim), rope_inv_freq(theirs, head_dim)
    assert ours_scale == their_scale and torch.equal(ours_inv, their_inv)
    cls = MODEL_REGISTRY[ARCHS[family]]
    assert [cls.layer_sliding_window(ours, i) for i in range(ours.num_hidden_layers)] == \
        [cls.layer_sliding_window(theirs, i) for i in range(theirs.num_hidden_layers)]


@pytest.mark.parametrize("raw", [
    dict(SMALL, model_type="gemma"),
    dict(SMALL),  # no model_type: transformers guesses from the folder name
    dict(SMALL, model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    dict(SMALL, model_type="llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
    dict(SMALL, model_type="qwen2", layer_types=["full_attention", "sliding", "full_attention", "full_attention"]),
    dict(SMALL, model_type="mistral", layer_types=["full_attention"] * 4),
    dict(SMALL, model_type="qwen3", head_dim=None),  # null where transformers' strict checks refuse it
    dict(SMALL, model_type="mixtral", num_key_value_heads=None),
])
def test_declines_what_transformers_must_parse(raw):
    assert read_model_config(raw) is None


def test_registry_families_all_covered():
    """A family added to the registry needs its defaults here (or every load of it imports transformers)."""
    assert sorted(ARCHS.values()) == sorted(MODEL_REGISTRY)
