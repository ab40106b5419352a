"""The base of every ModelOpt quant config (:class:`ModelOptQuantConfigBase`: parsing either form, validation,
the per-layer policy) and the registry of config classes by ``quant_algo``. ``mopt.quant.config`` is the
entry point; the config classes live in ``config_fp8_nvfp4``, ``config_algos`` and ``config_mixed``.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatch
from typing import Any, Callable, Mapping

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the methods import torch when a model is built; parsing a config needs none
    import torch

from mopt.names import NameMapper
from mopt.quant import validate
from mopt.quant.validate import QuantConfigError

logger = logging.getLogger(__name__)

QUANT_ALGOS = [
    "FP8",  # per-tensor weights, static per-tensor activations
    "FP8_PER_CHANNEL_PER_TOKEN",  # per-channel weights, dynamic per-token activations
    "FP8_PB_WO",  # 128x128 weight blocks (ModelOpt writes it lower-case)
    "NVFP4",  # FP4 E2M1 with E4M3 block scales and FP32 global scales
]
KV_CACHE_QUANT_ALGOS = ["FP8", "NVFP4", "NVFP4_AFFINE", "INT8"]  # formats in mopt.quant.formats.kv_cache

DEFAULT_PACKED_MODULES_MAPPING: dict[str, list[str]] = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}


def is_layer_skipped(
    prefix: str, ignored_layers: list[str], fused_mapping: Mapping[str, list[str]]
) -> bool:
    """Exact-name exclusion with fused layers: ``...qkv_proj`` is excluded when its shards are.

    Raises when only some shards of a fused layer are excluded: they must share one precision.
    """
    proj_name = prefix.rsplit(".", 1)[-1]
    if proj_name not in fused_mapping:
        if "experts" in prefix and prefix not in ignored_layers:
            # vLLM's rule: a listed single expert (``...mlp.experts.0.w1``) excludes its whole MoE layer.
            return any(prefix in name for name in ignored_layers if "experts" in name)
        return prefix in ignored_layers
    base = prefix[: len(prefix) - len(proj_name)]
    shards = [base + shard for shard in fused_mapping[proj_name]]
    skipped = [shard in ignored_layers for shard in shards]
    if any(skipped) and not all(skipped):
        excluded = [s for s, k in zip(shards, skipped) if k]
        raise QuantConfigError(
            f"exclusion list excludes {excluded} but not all shards of the fused layer "
            f"{prefix} ({shards}); all shards of a fused layer must have the same precision"
        )
    return all(skipped)


class _MethodClass:
    """A config's method class, set as the class or as ``(module, class name)`` and imported on first use,
    so that parsing a config and naming its methods (``mopt inspect``) import no torch."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__.get(self.attr)
        if isinstance(value, tuple):
            import importlib

            value = getattr(importlib.import_module(value[0]), value[1])
            obj.__dict__[self.attr] = value
        return value

    def __set__(self, obj: Any, value: type | tuple[str, str] | None) -> None:
        obj.__dict__[self.attr] = value

    def name(self, obj: Any) -> str | None:
        """The class's name without importing it (None: no class)."""
        value = obj.__dict__.get(self.attr)
        return value[1] if isinstance(value, tuple) else getattr(value, "__name__", None)


class ModelOptQuantConfigBase:
    """What every ModelOpt config shares: exclusions, the per-layer policy and parsing."""

    LinearMethodCls = _MethodClass()
    FusedMoEMethodCls = _MethodClass()
    KVCacheMethodCls: type | None = None

    def __init__(
        self,
        exclude_modules: list[str],
        kv_cache_quant_algo: str | None = None,
        packed_modules_mapping: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.exclude_modules: list[str] = list(exclude_modules)
        self.kv_cache_quant_algo = kv_cache_quant_algo
        self.packed_modules_mapping: dict[str, list[str]] = dict(
            DEFAULT_PACKED_MODULES_MAPPING if packed_modules_mapping is None
            else packed_modules_mapping
        )
        if kv_cache_quant_algo is not None and kv_cache_quant_algo not in KV_CACHE_QUANT_ALGOS:
            logger.warning(
                "kv_cache_quant_algo %r is not supported (supported: %s); the KV cache "
                "stays in the model dtype", kv_cache_quant_algo, KV_CACHE_QUANT_ALGOS,
            )

    # -- identity -----------------------------------------------------------------------------
    def get_name(self) -> str:
        raise NotImplementedError  # abstract: each format names itself

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        import torch

        return [torch.bfloat16, torch.half, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        raise NotImplementedError  # abstract

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["hf_quant_config.json"]

    @property
    def kv_cache_quantized(self) -> bool:
        """True for an FP8 KV cache, the engine's native quantized cache (``--kv-cache-dtype fp8``);
        the other formats are applied by their KV-cache method (``mopt.quant.methods.kv_cache``)."""
        return self.kv_cache_quant_algo == "FP8"

    @property
    def kv_cache_quant_method(self) -> str | None:
        """vLLM's name for ``kv_cache_quant_algo``."""
        return self.kv_cache_quant_algo

    def linear_method_cls(self, prefix: str) -> type | None:
        """The linear method class of a (not excluded) layer; per layer for MIXED_PRECISION."""
        return self.LinearMethodCls

    def moe_method_cls(self, prefix: str) -> type | None:
        """The MoE method class of a (not excluded) MoE layer, or None when unsupported."""
        return self.FusedMoEMethodCls

    def linear_method_name(self, prefix: str) -> str | None:
        """``linear_method_cls(prefix).__name__`` without importing the method (and torch)."""
        return type(self).LinearMethodCls.name(self)

    def moe_method_name(self, prefix: str) -> str | None:
        """``moe_method_cls(prefix).__name__`` without importing the method, or None when unsupported."""
        return type(self).FusedMoEMethodCls.name(self)

    # -- exclusions ---------------------------------------------------------------------------
    def is_layer_excluded(self, prefix: str) -> bool:
        """True when ``prefix`` (a runtime module name) stays unquantized.

        Three rules, in order: exact names (fused layers through ``packed_modules_mapping``);
        the legacy substring rule of older exports (also with a ``language_model.`` prefix
        stripped); and ``fnmatch`` wildcards, which is what ModelOpt writes.
        """
        if not self.exclude_modules:
            return False
        if is_layer_skipped(prefix, self.exclude_modules, self.packed_modules_mapping):
            return True
        bare = prefix.removeprefix("language_model.")
        for exclude in self.exclude_modules:
            if exclude != prefix and (
                exclude in prefix or (prefix.startswith("language_model.") and exclude in bare)
            ):
                return True
        return any(fnmatch(prefix, pattern) for pattern in self.exclude_modules)

    def apply_name_mapper(self, mapper: NameMapper | Callable[[str], str | None]) -> None:
        """Rename exclusion patterns when checkpoint names are mapped to runtime names.

        ModelOpt writes ``module_path*`` for a subtree left unquantized. A prefix rename such as
        ``model.vision_tower.`` -> ``vision_tower.`` cannot see that pattern, so it is first
        split into the equivalent pair ``module_path`` and ``module_path.*``.
        """
        map_one = mapper.map if isinstance(mapper, NameMapper) else mapper
        split: list[str] = []
        for exclude in self.exclude_modules:
            if len(exclude) >= 2 and exclude[-1] == "*" and exclude[-2] != ".":
                split += [exclude[:-1], exclude[:-1] + ".*"]
            else:
                split.append(exclude)
        mapped = (map_one(e) for e in split)
        self.exclude_modules = [e for e in mapped if e is not None]

    # -- per-layer policy ---------------------------------------------------------------------
    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Any:
        """The method that runs ``layer`` (named ``prefix``), or ``None`` for non-quant layers."""
        from mopt.quant.methods.linear import UnquantizedLinearMethod

        from mopt.quant.methods.kv_cache import kv_cache_method_cls

        kind = getattr(layer, "quant_kind", None)
        if kind == "attention":
            return (self.KVCacheMethodCls or kv_cache_method_cls(self.kv_cache_quant_algo))(self)
        if self.is_layer_excluded(prefix) or "vision_tower" in prefix or "vision_model" in prefix:
            return UnquantizedLinearMethod() if kind == "linear" else None
        if kind == "linear":
            return self.LinearMethodCls(self)
        if kind == "moe":
            if self.FusedMoEMethodCls is None:
                raise QuantConfigError(
                    f"{prefix}: {self.get_name()} mixture-of-experts layers are not supported yet"
                )
            return self.FusedMoEMethodCls(self, layer)
        return None

    # -- parsing ------------------------------------------------------------------------------
    @staticmethod
    def get_from_keys(config: Mapping[str, Any], keys: list[str]) -> Any:
        for key in keys:
            if key in config:
                return config[key]
        raise QuantConfigError(f"cannot find any of {keys} in the quantization config")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelOptQuantConfigBase":
        """Parse either config form (see the module docstring) and validate its types.

        On the base class, the format class is picked by ``quant_algo``; on a format class, a
        ``quant_algo`` of another format is an error (it would not be read as this one).
        """
        if not isinstance(config, Mapping):
            raise QuantConfigError(f"the quantization config must be an object, got {type(config).__name__}")
        if "quantization" in config:  # hf_quant_config.json; field names in errors say where
            quant = config["quantization"]
            if not isinstance(quant, dict):
                raise QuantConfigError(
                    f"'quantization' must be a dictionary, got {type(quant).__name__}"
                )
            where, exclude_key, kv_raw = "quantization.", "exclude_modules", quant.get("kv_cache_quant_algo")
        else:  # config.json's quantization_config
            quant, where, exclude_key = config, "", "ignore"
            kv_raw = config.get("kv_cache_quant_algo", _kv_algo_from_scheme(config))

        if quant.get("quant_algo") is None:
            raise QuantConfigError("missing 'quant_algo' in the quantization config")
        algo = validate.algo_name(quant["quant_algo"], where + "quant_algo")
        kv_algo = validate.optional_str(kv_raw, where + "kv_cache_quant_algo")
        kv_algo = kv_algo.upper() if kv_algo is not None else None
        exclude_modules = validate.module_patterns(quant.get(exclude_key), where + exclude_key)
        group_size = validate.optional_int(quant.get("group_size"), where + "group_size")
        if algo not in QUANT_ALGOS:
            raise QuantConfigError(
                f"unsupported ModelOpt quant_algo {algo!r}; mopt supports {QUANT_ALGOS}"
            )
        fmt_cls = _CONFIG_BY_ALGO[algo]
        if cls is ModelOptQuantConfigBase:
            cls = fmt_cls
        elif not issubclass(fmt_cls, cls):
            raise QuantConfigError(
                f"quant_algo {algo!r} is parsed by {fmt_cls.__name__}, not {cls.__name__}"
            )
        return cls._from_config(
            quant_method=algo,
            kv_cache_quant_method=kv_algo,
            exclude_modules=exclude_modules,
            group_size=group_size,
            original_config=config,
        )

    @classmethod
    def _from_config(cls, **kwargs: Any) -> "ModelOptQuantConfigBase":
        raise NotImplementedError  # abstract: each format builds itself

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(quant_algo={getattr(self, 'quant_method', None)!r}, "
            f"kv_cache_quant_algo={self.kv_cache_quant_algo!r}, "
            f"exclude_modules={self.exclude_modules!r})"
        )


def _kv_algo_from_scheme(config: Mapping[str, Any]) -> Any:
    """``kv_cache_scheme`` of the config.json form: a dict (8-bit float means FP8) or a string."""
    scheme = config.get("kv_cache_scheme")
    if scheme is None or isinstance(scheme, str):
        return scheme
    if isinstance(scheme, dict):
        kind, bits = scheme.get("type"), scheme.get("num_bits")
        if kind == "float" and type(bits) is int and bits == 8:
            return "FP8"
        raise QuantConfigError(f"unsupported kv_cache_scheme {scheme}; supported: 8-bit float")
    raise QuantConfigError(
        f"kv_cache_scheme must be a dict or a string, got {type(scheme).__name__}"
    )


def _detect_algo(hf_quant_cfg: Mapping[str, Any] | None) -> str | None:
    """The quant_algo of a config that declares ``quant_method: modelopt``, else None."""
    if hf_quant_cfg is None:
        return None
    if str(hf_quant_cfg.get("quant_method", "")).lower() != "modelopt":
        return None
    if "quantization" in hf_quant_cfg:
        quant = hf_quant_cfg["quantization"]
        return str(quant.get("quant_algo", "")) if isinstance(quant, dict) else None
    algo = hf_quant_cfg.get("quant_algo", "")
    return algo if isinstance(algo, str) else None


# quant_algo -> config class; the config modules fill it when mopt.quant.config imports them
_CONFIG_BY_ALGO: dict[str, type[ModelOptQuantConfigBase]] = {}


def register_quant_config(algo: str, cls: type[ModelOptQuantConfigBase]) -> None:
    """Make ``quant_algo: algo`` parse with ``cls`` (``mopt.quant.config_algos`` registers the rest)."""
    _CONFIG_BY_ALGO[algo] = cls
    if algo not in QUANT_ALGOS:
        QUANT_ALGOS.append(algo)
