"""Model config.json fields: refused by name when mopt cannot honour them, computed when it can.

The refused ones are the fuzzing run's classes (issue 15): sizes that are zero or negative,
non-finite norms and RoPE, settings that change the math. The supported ones (GELU activations,
MLP and attention biases, sliding windows) must give transformers' own logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from mopt import LLM, SamplingParams
from mopt.engine.checkpoint import CheckpointError
from mopt.engine.loader import load_model
from mopt.errors import ModelConfigError, MoptError
from mopt.models.registry import UnsupportedArchitectureError

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def hf_model(kind: str, **overrides):
    """A tiny transformers model of family ``kind`` (float32, eval)."""
    import transformers as tf

    torch.manual_seed(0)
    families = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                      {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "num_experts": 4,
                       "num_experts_per_tok": 2}),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    }
    config_cls, model_cls, extra = families[kind]
    model = model_cls(config_cls(**{**SMALL, **extra, **overrides}))
    with torch.no_grad():  # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf_model("llama").save_pretrained(path)
    return path


def _edit_config(src, dst, edit) -> None:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))


def _set(**fields):
    return lambda config: config.update(fields)


def _rope(**fields):
    return lambda config: config["rope_parameters"].update(fields)


def _raw_rope_theta(value):
    def edit(config):
        config.pop("rope_parameters")
        config["rope_theta"] = value
    return edit


BAD = [
    # (name, edit of config.json, message)
    ("unsupported activation", _set(hidden_act="relu"), r"hidden_act 'relu' is not supported for LlamaForCausalLM"),
    ("no layers", _set(num_hidden_layers=0), r"num_hidden_layers must be a positive integer, got 0"),
    ("NaN norm epsilon", _set(rms_norm_eps=float("nan")), r"rms_norm_eps must be a finite positive number, got nan"),
    ("infinite norm epsilon", _set(rms_norm_eps=float("inf")), r"rms_norm_eps must be a finite positive number"),
    ("zero norm epsilon", _set(rms_norm_eps=0), r"rms_norm_eps must be a finite positive number, got 0"),
    ("infinite rope_theta", _raw_rope_theta(float("inf")), r"rope_theta must be a finite positive number, got inf"),
    ("null rope_theta", _raw_rope_theta(None), r"rope_theta must be a finite positive number, got None"),
    ("infinite rope_theta in rope_parameters", _rope(rope_theta=float("inf")), r"rope_theta must be a finite positive number"),
    ("dynamic RoPE", _rope(rope_type="dynamic", factor=2.0), r"rope_type 'dynamic' is not supported"),
    ("partial rotary", _rope(partial_rotary_factor=0.5), r"partial_rotary_factor 0.5 is not supported"),
    ("negative head_dim", _set(head_dim=-32), r"head_dim must be a positive integer or null, got -32"),
    ("odd head_dim", _set(head_dim=15), r"head_dim \(15\) must be even"),
    ("negative vocab", _set(vocab_size=-512), r"vocab_size must be a positive integer, got -512"),
    ("zero heads", _set(num_attention_heads=0), r"num_attention_heads must be a positive integer, got 0"),
    ("string size", _set(hidden_size="64"), r"hidden_size must be a positive integer, got '64'"),
    ("float size", _set(intermediate_size=96.5), r"intermediate_size must be a positive integer, got 96.5"),
    ("bool size", _set(num_hidden_layers=True), r"num_hidden_layers must be a positive integer, got True"),
    ("heads not a multiple of kv heads", _set(num_key_value_heads=3),
     r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ("hidden not a multiple of heads", lambda c: (c.pop("head_dim"), c.update(hidden_size=66)),
     r"hidden_size \(66\) must be a multiple of num_attention_heads \(4\), or head_dim must be given"),
    ("mlp_bias not a bool", _set(mlp_bias="yes"), r"mlp_bias must be true or false, got 'yes'"),
    ("architectures a string", _set(architectures="LlamaForCausalLM"), r"architectures must be a list of class names"),
]


@pytest.mark.parametrize("edit,message", [pytest.param(*row[1:], id=row[0]) for row in BAD])
def test_bad_model_configs_are_refused_by_field(llama_dir, tmp_path, edit, message):
    _edit_config(llama_dir, tmp_path / "ckpt", edit)
    with pytest.raises(MoptError, match=message) as info:
        load_model(tmp_path / "ckpt")
    assert isinstance(info.value, (ModelConfigError, UnsupportedArchitectureError))
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("data,message", [
    (json.dumps({"architectures": ["LlamaForCausalLM"]}).encode("utf-16"), r"config.json: not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, r"config.json: JSON nested too deeply"),
    (b'{"vocab_size": ' + b"9" * 5000 + b"}", r"config.json: not valid JSON \(Exceeds the limit"),
    (b"[1]", r"config.json: expected a JSON object, got list"),
], ids=["UTF-16", "deeply nested", "5000-digit integer", "not an object"])
def test_unreadable_config_json(llama_dir, tmp_path, data, message):
    _edit_config(llama_dir, tmp_path / "ckpt", lambda config: None)
    (tmp_path / "ckpt" / "config.json").write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "ckpt")


FAMILY_BAD = [
    # (name, family, edit, message)
    ("negative expert count", "mixtral", _set(num_local_experts=-8), r"num_local_experts must be a positive integer, got -8"),
    ("top-k above expert count", "mixtral", _set(num_experts_per_tok=5),
     r"num_experts_per_tok \(5\) must be at most num_local_experts \(4\)"),
    ("GELU experts", "mixtral", _set(hidden_act="gelu"), r"hidden_act 'gelu' is not supported for MixtralForCausalLM"),
    ("zero sliding window", "mistral", _set(sliding_window=0), r"sliding_window must be a positive integer, got 0"),
    ("unknown layer type", "qwen2", _set(layer_types=["full_attention", "chunked_attention"]),
     r"layer_types must list one of \['full_attention', 'sliding_attention'\]"),
    ("qkv_bias not a bool", "qwen2_moe", _set(qkv_bias=1), r"qkv_bias must be true or false, got 1"),
]


@pytest.mark.parametrize("kind,edit,message", [pytest.param(*row[1:], id=row[0]) for row in FAMILY_BAD])
def test_bad_family_fields_are_refused(tmp_path, kind, edit, message):
    hf_model(kind).save_pretrained(tmp_path / "src")
    _edit_config(tmp_path / "src", tmp_path / "ckpt", edit)
    with pytest.raises(ModelConfigError, match=message):
        load_model(tmp_path / "ckpt")


# -- settings that change the math: computed as transformers computes them ----------------------

SUPPORTED = [
    # (name, family, config overrides)
    ("gelu (erf)", "llama", dict(hidden_act="gelu")),
    ("gelu_new (tanh)", "llama", dict(hidden_act="gelu_new")),
    ("gelu_pytorch_tanh", "llama", dict(hidden_act="gelu_pytorch_tanh")),
    ("mlp and attention biases", "llama", dict(mlp_bias=True, attention_bias=True)),
    ("Qwen2 q/k/v bias", "qwen2", {}),
    ("Qwen2-MoE without q/k/v bias", "qwen2_moe", dict(qkv_bias=False)),
    ("Mistral sliding window", "mistral", dict(sliding_window=5)),
    ("Mixtral sliding window", "mixtral", dict(sliding_window=3)),
    ("Qwen2 sliding window above max_window_layers", "qwen2", dict(use_sliding_window=True, sliding_window=4,
                                                                   max_window_layers=1)),
    ("Qwen3 sliding window off by default", "qwen3", dict(sliding_window=4)),
]


@pytest.mark.parametrize("kind,overrides", [pytest.param(*row[1:], id=row[0]) for row in SUPPORTED])
def test_supported_settings_equal_transformers(tmp_path, kind, overrides):
    model = hf_model(kind, **overrides)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        got = load_model(tmp_path)(ids)
    # The same float32 operations up to summation order (SDPA with a mask vs causal): 1e-5.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if overrides.get("sliding_window") and kind != "qwen3":  # the window must matter here
        full = hf_model(kind, **{k: v for k, v in overrides.items() if k != "sliding_window"}, sliding_window=None)
        with torch.no_grad():
            assert (full(ids).logits - want).abs().max() > 1e-3


@pytest.mark.parametrize("kind,window", [("mistral", 3), ("qwen2", 4)])
def test_paged_sliding_window_decoding_equals_transformers(tmp_path, kind, window):
    """The paged path (prefill over several blocks, then decode) masks as transformers does."""
    extra = dict(use_sliding_window=True, max_window_layers=0) if kind == "qwen2" else {}
    model = hf_model(kind, sliding_window=window, **extra)
    model.save_pretrained(tmp_path)
    prompt = [5, 17, 33, 2, 9, 61, 40, 8, 8, 71]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):  # transformers' greedy decoding without a cache
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    llm = LLM(tmp_path, device="cpu", block_size=4, kv_cache_memory=1 << 20)
    out = llm.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == ids[len(prompt):]
