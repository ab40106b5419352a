"""Model ``config.json`` checks, run before a model is built.

Two passes with the same field table: the raw JSON first (so that a zero or a string never reaches
transformers' own config code, which fails on some with ``ZeroDivisionError``), then the parsed
config object, whose defaults and derived fields (``layer_types``, ``rope_parameters``) are what
the model will read. Then the settings that change the math: every field a registered family reads
must be one mopt computes, or the error says it is not supported. Each error names the field.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from mopt.errors import ModelConfigError

# A rule returns None when the value is acceptable, else what was expected.
Rule = Callable[[Any], "str | None"]


def _int(value: Any) -> bool:
    return type(value) is int


def positive_int(value: Any) -> str | None:
    return None if _int(value) and value > 0 else "a positive integer"


def optional_positive_int(value: Any) -> str | None:
    return None if value is None or (_int(value) and value > 0) else "a positive integer or null"


def non_negative_int(value: Any) -> str | None:
    return None if _int(value) and value >= 0 else "a non-negative integer"


def optional_non_negative_int(value: Any) -> str | None:
    return None if value is None or (_int(value) and value >= 0) else "a non-negative integer or null"


def finite_positive(value: Any) -> str | None:
    ok = type(value) in (int, float) and math.isfinite(value) and value > 0
    return None if ok else "a finite positive number"


def boolean(value: Any) -> str | None:
    return None if type(value) is bool else "true or false"


def string(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def index_list(value: Any) -> str | None:
    ok = value is None or (isinstance(value, list) and all(_int(v) and v >= 0 for v in value))
    return None if ok else "a list of layer indices"


def string_list(value: Any) -> str | None:
    ok = value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    return None if ok else "a list of strings"


# Fields every registered family reads (when present); families add theirs as ``config_fields``.
COMMON_FIELDS: dict[str, Rule] = {
    "vocab_size": positive_int,
    "hidden_size": positive_int,
    "intermediate_size": positive_int,
    "num_hidden_layers": positive_int,
    "num_attention_heads": positive_int,
    "num_key_value_heads": optional_positive_int,
    "head_dim": optional_positive_int,
    "max_position_embeddings": optional_positive_int,
    "rms_norm_eps": finite_positive,
    "rope_theta": finite_positive,
    "hidden_act": string,
    "tie_word_embeddings": boolean,
    "attention_bias": boolean,
    "mlp_bias": boolean,
    "sliding_window": optional_non_negative_int,
    "use_sliding_window": boolean,
    "max_window_layers": non_negative_int,
    "layer_types": string_list,
}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps")
LAYER_TYPES = ("full_attention", "sliding_attention")
# RoPE types whose frequencies are fixed at load time; "dynamic" and "longrope" change them with the
# sequence length at run time, which mopt's rotary embedding does not do.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_MISSING = object()


def _check_fields(get: Callable[[str], Any], fields: Mapping[str, Rule], source: str) -> None:
    for name, rule in fields.items():
        value = get(name)
        if value is _MISSING:
            continue
        expected = rule(value)
        if expected is not None:
            text = repr(value)
            text = text if len(text) <= 60 else text[:57] + "..."
            raise ModelConfigError(f"{source}: {name} must be {expected}, got {text}")


def _fields_of(family: type) -> dict[str, Rule]:
    return {**COMMON_FIELDS, **getattr(family, "config_fields", {})}


def _check_heads(hidden: int, heads: int, kv_heads: int | None, head_dim: int | None, source: str) -> None:
    """Grouped-query heads must divide evenly; without ``head_dim``, heads must divide the hidden size
    (transformers would floor it); rotary embeddings rotate halves, so the head size is even."""
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ModelConfigError(f"{source}: num_attention_heads ({heads}) must be a multiple of "
                               f"num_key_value_heads ({kv_heads})")
    if head_dim is None and hidden % heads:
        raise ModelConfigError(f"{source}: hidden_size ({hidden}) must be a multiple of "
                               f"num_attention_heads ({heads}), or head_dim must be given")
    head_dim = head_dim or hidden // heads
    if head_dim % 2:
        raise ModelConfigError(f"{source}: head_dim ({head_dim}) must be even for rotary embeddings")


def validate_raw_config(raw: Mapping[str, Any], family: type, source: str) -> None:
    """Types and ranges of the fields ``config.json`` states, before transformers parses it."""
    _check_fields(lambda name: raw.get(name, _MISSING), _fields_of(family), source)
    if "hidden_size" in raw and "num_attention_heads" in raw:
        _check_heads(raw["hidden_size"], raw["num_attention_heads"], raw.get("num_key_value_heads"),
                     raw.get("head_dim"), source)


def _check_rope(config, head_dim: int, source: str) -> None:
    from mopt.layers.basic import rope_inv_freq

    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, Mapping):
        raise ModelConfigError(f"{source}: rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelConfigError(f"{source}: rope_parameters.rope_type {rope_type!r} is not supported; "
                               f"supported: {list(ROPE_TYPES)}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", _MISSING))
    if theta is _MISSING or finite_positive(theta):
        shown = "missing" if theta is _MISSING else repr(theta)
        raise ModelConfigError(f"{source}: rope_theta must be a finite positive number, got {shown}")
    for name, value in (("rope_parameters.partial_rotary_factor", params.get("partial_rotary_factor")),
                        ("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))):
        if value is not None and value != 1:
            raise ModelConfigError(f"{source}: {name} {value!r} is not supported (mopt rotates the whole head)")
    try:
        inv_freq, scaling = rope_inv_freq(config, head_dim)
    except Exception as e:  # transformers' RoPE initialisers fail in many ways on bad parameters
        raise ModelConfigError(f"{source}: rope_parameters {dict(params)} cannot be used ({e})") from None
    if not (bool(inv_freq.isfinite().all()) and math.isfinite(scaling)):
        raise ModelConfigError(f"{source}: rope_parameters {dict(params)} give non-finite RoPE frequencies")


def validate_model_config(raw: Mapping[str, Any], config, family: type, source: str) -> None:
    """Everything ``family`` (a model class) reads from ``config`` is in range and computable.

    ``raw`` is config.json as written (it tells whether ``head_dim`` was given), ``config`` the
    parsed object the model is built from.
    """
    def get(name: str) -> Any:
        return getattr(config, name, _MISSING)

    for name in REQUIRED:
        if get(name) is _MISSING:
            raise ModelConfigError(f"{source}: missing {name}")
    _check_fields(get, _fields_of(family), source)
    heads = config.num_attention_heads
    # raw tells whether head_dim was given: transformers fills in hidden_size // heads for Llama.
    given_head_dim = raw.get("head_dim")
    _check_heads(config.hidden_size, heads, getattr(config, "num_key_value_heads", None), given_head_dim, source)
    head_dim = given_head_dim or getattr(config, "head_dim", None) or config.hidden_size // heads
    act = getattr(config, "hidden_act", "silu")
    if act not in family.activations:
        raise ModelConfigError(f"{source}: hidden_act {act!r} is not supported for {family.__name__}; "
                               f"supported: {list(family.activations)}")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and family.sliding_window_rule == "layer_types":
        if len(layer_types) != config.num_hidden_layers or any(t not in LAYER_TYPES for t in layer_types):
            raise ModelConfigError(f"{source}: layer_types must list one of {list(LAYER_TYPES)} for each of the "
                                   f"{config.num_hidden_layers} layers, got {layer_types!r}")
    for layer in range(config.num_hidden_layers):
        window = family.layer_sliding_window(config, layer)
        if window is not None and positive_int(window):
            raise ModelConfigError(f"{source}: layer {layer} uses a sliding window, so sliding_window must be a "
                                   f"positive integer, got {window!r}")
    check = getattr(family, "validate_config", None)
    if check is not None:
        check(config, source)
    _check_rope(config, head_dim, source)
