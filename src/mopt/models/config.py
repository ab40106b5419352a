"""``config.json`` read without transformers, for the model families mopt implements.

Importing transformers' config classes costs seconds (``AutoConfig`` pulls in much of the library),
most of a small model's start-up. For the families in ``mopt.models.registry`` the fields mopt's
models read, their defaults and the values transformers derives from them (``head_dim``,
``layer_types``, ``sliding_window``, ``rope_parameters``) are few: :func:`read_model_config` builds
the same values from the JSON (``tests/models/test_model_config.py`` compares them with
transformers'). A config it does not cover (another ``model_type``, RoPE scaling, which transformers
normalises in many ways) gives ``None``, and the caller parses it with transformers as before.
"""

from __future__ import annotations

from typing import Any, Mapping

# Defaults of the fields mopt's models read, as transformers' config classes declare them.
_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
              rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, head_dim=None,
              eos_token_id=2)
_MISTRAL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=4096,
                eos_token_id=2)
_QWEN2 = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
              rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
              max_window_layers=28, layer_types=None, eos_token_id=None)
_MOE = dict(decoder_sparse_step=1, norm_topk_prob=False, mlp_only_layers=None)
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": _MISTRAL,
    "qwen2": _QWEN2,
    "qwen3": {**_QWEN2, "head_dim": 128, "attention_bias": False},
    "qwen2_moe": {**_QWEN2, **_MOE, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                  "num_attention_heads": 16, "num_key_value_heads": 16, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
                  "qkv_bias": True},
    # Qwen3-MoE's config class has no max_window_layers or layer_types.
    "qwen3_moe": {**{k: v for k, v in _QWEN2.items() if k not in ("max_window_layers", "layer_types")}, **_MOE,
                  "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 32,
                  "num_key_value_heads": 4, "attention_bias": False, "moe_intermediate_size": 768,
                  "num_experts_per_tok": 8, "num_experts": 128},
    "mixtral": {**_MISTRAL, "rms_norm_eps": 1e-5, "sliding_window": None, "num_experts_per_tok": 2,
                "num_local_experts": 8},
}
# Fields the config classes declare nullable; null in any other declared field is an error transformers
# reports (its strict dataclass checks), so such a config is left to it.
_NULLABLE_QWEN = {"num_key_value_heads", "sliding_window", "layer_types", "eos_token_id"}
NULLABLE: dict[str, set[str]] = {
    "llama": {"num_key_value_heads", "head_dim", "eos_token_id"},
    "mistral": {"head_dim", "sliding_window", "eos_token_id"},
    "qwen2": _NULLABLE_QWEN,
    "qwen3": _NULLABLE_QWEN,
    "qwen2_moe": _NULLABLE_QWEN | {"mlp_only_layers"},
    "qwen3_moe": {"sliding_window", "mlp_only_layers", "eos_token_id"},
    "mixtral": {"head_dim", "sliding_window", "eos_token_id"},
}
_LAYER_TYPES = ("full_attention", "sliding_attention")
DEFAULT_ROPE_THETA = {"mixtral": 1000000.0}  # else 10000.0
# Fields another name stands for (transformers' ``attribute_map``): both names read the same value.
EXPERT_ALIASES = {"qwen3_moe": ("num_experts", "num_local_experts"), "mixtral": ("num_experts", "num_local_experts")}


class ModelConfig:
    """The parsed config: every ``config.json`` field as an attribute, with the family's defaults and
    derived fields (what a transformers config object offers the model classes)."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"ModelConfig({self.__dict__!r})"


def _rope_parameters(raw: Mapping[str, Any], model_type: str) -> dict | None:
    """``{"rope_theta", "rope_type": "default"}`` as transformers 5 normalises plain RoPE; ``None`` for
    anything else (scaled RoPE types, extra keys), which transformers parses."""
    if raw.get("rope_scaling") is not None:
        return None
    params = raw.get("rope_parameters")
    theta = raw.get("rope_theta", DEFAULT_ROPE_THETA.get(model_type, 10000.0))
    if params is not None:
        if not isinstance(params, Mapping) or set(params) - {"rope_type", "rope_theta"} \
                or params.get("rope_type", "default") != "default":
            return None
        theta = params.get("rope_theta", theta)
    return {"rope_theta": theta, "rope_type": "default"}


def _derive(config: dict[str, Any], model_type: str) -> None:
    """The fields transformers' config classes compute in ``__post_init__``."""
    if model_type in ("llama", "mistral") and config["head_dim"] is None:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if config.get("num_key_value_heads") is None and model_type != "qwen2_moe":
        config["num_key_value_heads"] = config["num_attention_heads"]
    if "mlp_only_layers" in config and config["mlp_only_layers"] is None:
        config["mlp_only_layers"] = []
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        config["sliding_window"] = config["sliding_window"] if config["use_sliding_window"] else None
    if model_type in ("qwen2", "qwen3") and config["layer_types"] is None:
        config["layer_types"] = ["sliding_attention" if config["sliding_window"] is not None
                                 and i >= config["max_window_layers"] else "full_attention"
                                 for i in range(config["num_hidden_layers"])]
    if model_type == "qwen2_moe":
        config["sliding_window"] = config["sliding_window"] if config["use_sliding_window"] else 0
        if config["layer_types"] is None:
            config["layer_types"] = ["sliding_attention" if (i + 1) % 2 and i < config["max_window_layers"]
                                     and config["use_sliding_window"] else "full_attention"
                                     for i in range(config["num_hidden_layers"])]


def read_model_config(raw: Mapping[str, Any]) -> ModelConfig | None:
    """``config.json`` (already checked by ``mopt.models.validate.validate_raw_config``) as the model
    classes read it, or ``None`` when transformers must parse it (see the module doc)."""
    model_type = raw.get("model_type")
    if model_type not in FAMILY_DEFAULTS:
        return None
    defaults = FAMILY_DEFAULTS[model_type]
    if any(raw.get(name, 0) is None and name not in NULLABLE[model_type] for name in defaults):
        return None
    rope = _rope_parameters(raw, model_type)
    layer_types = raw.get("layer_types")
    if rope is None or layer_types is not None and (model_type in ("llama", "mistral", "mixtral")
                                                    or any(t not in _LAYER_TYPES for t in layer_types)):
        return None  # transformers' handling of these differs by class (warnings, legacy names remapped)
    config = {**defaults, **raw}
    config.pop("rope_theta", None)
    alias = EXPERT_ALIASES.get(model_type)
    if alias is not None:
        value = raw.get(alias[0], raw.get(alias[1], config.get(alias[1], config.get(alias[0]))))
        config[alias[0]] = config[alias[1]] = value
    _derive(config, model_type)
    config["rope_parameters"] = config["rope_scaling"] = rope
    dtype = raw.get("dtype") if raw.get("dtype") is not None else raw.get("torch_dtype")
    if isinstance(dtype, str):
        import torch

        dtype = getattr(torch, dtype, dtype)
    config["dtype"] = config["torch_dtype"] = dtype
    return ModelConfig(config)
