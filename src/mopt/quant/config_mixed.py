"""ModelOpt's MIXED_PRECISION: one quant_algo per layer.

ModelOpt 0.47 writes it when a model's quantized layers use more than one format (auto-quantize, or
per-layer quant configs): ``quant_algo: MIXED_PRECISION`` and ``quantized_layers`` mapping every
quantized module to its own settings, ``{"model.layers.0.mlp.down_proj": {"quant_algo": "NVFP4",
"group_size": 16}, ...}``; layers not listed are unquantized (it writes no ``exclude_modules``).
``kv_cache_quant_algo`` stays global. Both config forms carry ``quantized_layers``.

Each distinct layer setting becomes a sub-config of its own algo (the same classes the single-algo
checkpoints use), which picks the layer's method. A fused layer (``qkv_proj``) takes its shards'
setting and a MoE layer (``...mlp.experts``) its experts'; they must agree.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from mopt.names import NameMapper
from mopt.quant.config_base import (_CONFIG_BY_ALGO, ModelOptQuantConfigBase, QuantConfigError, _detect_algo,
                                    register_quant_config)

ALGO = "MIXED_PRECISION"


class ModelOptMixedPrecisionConfig(ModelOptQuantConfigBase):
    def __init__(self, quantized_layers: Mapping[str, Mapping[str, Any]], kv_cache_quant_algo: str | None = None,
                 exclude_modules: list[str] | None = None,
                 packed_modules_mapping: Mapping[str, list[str]] | None = None) -> None:
        super().__init__(exclude_modules or [], kv_cache_quant_algo, packed_modules_mapping)
        self.quant_method = ALGO
        self._sub_configs: dict[str, ModelOptQuantConfigBase] = {}
        self.quantized_layers: dict[str, ModelOptQuantConfigBase] = {}
        for name, settings in quantized_layers.items():
            if not isinstance(settings, Mapping) or not settings.get("quant_algo"):
                raise QuantConfigError(f"quantized_layers[{name!r}] must be an object with a quant_algo, got {settings!r}")
            key = json.dumps(dict(settings), sort_keys=True)
            if key not in self._sub_configs:
                self._sub_configs[key] = _sub_config(name, settings)
            self.quantized_layers[name] = self._sub_configs[key]

    def get_name(self) -> str:
        return "modelopt_mixed"

    @classmethod
    def get_min_capability(cls) -> int:
        return 89

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: Mapping[str, Any] | None, user_quant: str | None) -> str | None:
        algo = _detect_algo(hf_quant_cfg)
        return "modelopt_mixed" if algo is not None and algo.upper() == ALGO else None

    @property
    def algos(self) -> list[str]:
        """The distinct quant_algo values of the layers."""
        return sorted({c.quant_method for c in self._sub_configs.values()})

    # -- which layer runs in which format -----------------------------------------------------------
    def layer_config(self, prefix: str) -> ModelOptQuantConfigBase | None:
        """The sub-config of ``prefix`` (a runtime module), or None when it is not quantized."""
        if prefix in self.quantized_layers:
            return self.quantized_layers[prefix]
        proj = prefix.rsplit(".", 1)[-1]
        if proj in self.packed_modules_mapping:
            base = prefix[: len(prefix) - len(proj)]
            members = [base + shard for shard in self.packed_modules_mapping[proj]]
        else:
            members = [name for name in self.quantized_layers if name.startswith(prefix + ".")]
            if not members or "experts" not in prefix:
                return None
        found = {m: self.quantized_layers.get(m) for m in members}
        configs = {id(c): c for c in found.values()}
        if len(configs) > 1:
            detail = {m: (c.quant_method if c is not None else None) for m, c in found.items()}
            raise QuantConfigError(f"{prefix}: its parts are quantized differently ({detail}); a fused or MoE layer "
                                   "runs in one format")
        return next(iter(configs.values()))

    def is_layer_excluded(self, prefix: str) -> bool:
        return super().is_layer_excluded(prefix) or self.layer_config(prefix) is None

    def linear_method_cls(self, prefix: str) -> type | None:
        config = self.layer_config(prefix)
        return None if config is None else config.LinearMethodCls

    def moe_method_cls(self, prefix: str) -> type | None:
        config = self.layer_config(prefix)
        return None if config is None else config.FusedMoEMethodCls

    def linear_method_name(self, prefix: str) -> str | None:
        config = self.layer_config(prefix)
        return None if config is None else config.linear_method_name(prefix)

    def moe_method_name(self, prefix: str) -> str | None:
        config = self.layer_config(prefix)
        return None if config is None else config.moe_method_name(prefix)

    def get_quant_method(self, layer, prefix: str) -> Any:
        kind = getattr(layer, "quant_kind", None)
        if kind == "attention" or self.is_layer_excluded(prefix):
            return super().get_quant_method(layer, prefix)
        return self.layer_config(prefix).get_quant_method(layer, prefix)

    def apply_name_mapper(self, mapper: NameMapper | Callable[[str], str | None]) -> None:
        super().apply_name_mapper(mapper)
        map_one = mapper.map if isinstance(mapper, NameMapper) else mapper
        renamed = ((map_one(name), config) for name, config in self.quantized_layers.items())
        self.quantized_layers = {name: config for name, config in renamed if name is not None}

    # -- parsing -------------------------------------------------------------------------------------
    @classmethod
    def _from_config(cls, *, kv_cache_quant_method: str | None, exclude_modules: list[str],
                     original_config: Mapping[str, Any], **kwargs: Any) -> "ModelOptMixedPrecisionConfig":
        quant = original_config.get("quantization", original_config)
        layers = quant.get("quantized_layers")
        if not isinstance(layers, Mapping) or not layers:
            raise QuantConfigError("MIXED_PRECISION needs a non-empty 'quantized_layers' object "
                                   f"(layer name -> settings), got {type(layers).__name__}")
        return cls(layers, kv_cache_quant_method, exclude_modules)

    def __repr__(self) -> str:
        return (f"ModelOptMixedPrecisionConfig(algos={self.algos}, layers={len(self.quantized_layers)}, "
                f"kv_cache_quant_algo={self.kv_cache_quant_algo!r})")


def _sub_config(layer: str, settings: Mapping[str, Any]) -> ModelOptQuantConfigBase:
    algo = str(settings["quant_algo"]).upper()
    cls = _CONFIG_BY_ALGO.get(algo)
    if cls is None or cls is ModelOptMixedPrecisionConfig:
        raise QuantConfigError(f"quantized_layers[{layer!r}]: unsupported quant_algo {settings['quant_algo']!r}")
    quant = {"kv_cache_quant_algo": None, "exclude_modules": [], **settings, "quant_algo": algo}
    if algo == "NVFP4":
        quant.setdefault("group_size", 16)  # ModelOptNvFp4Config insists on the field
    try:
        return cls.from_config({"quantization": quant})
    except QuantConfigError as e:
        raise QuantConfigError(f"quantized_layers[{layer!r}]: {e}") from None


register_quant_config(ALGO, ModelOptMixedPrecisionConfig)
