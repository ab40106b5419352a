"""Configs of ModelOpt's other LLM algorithms, one table row per ``quant_algo``.

``mopt.quant.config_fp8_nvfp4`` handles FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO and NVFP4; importing this
module registers the rest with its ``config_from_dict``:

==========================  =====================  ===========================================
quant_algo (as exported)    config class           linear / MoE method
==========================  =====================  ===========================================
W4A16_AWQ (int4_awq)        ModelOptInt4AwqConfig  ModelOptInt4AwqLinearMethod / -
W4A8_AWQ                    ModelOptInt4AwqConfig  ModelOptW4A8AwqLinearMethod / -
W8A16 (int8_wo)             ModelOptInt8Config     ModelOptInt8WeightOnlyLinearMethod / ...MoEMethod
W8A8_SQ_PER_CHANNEL         ModelOptInt8Config     ModelOptInt8SmoothQuantLinearMethod / ...MoEMethod
MXFP8                       ModelOptMxFp8Config    ModelOptMxFp8LinearMethod / ...MoEMethod
MXFP4 (mxfp4)               ModelOptMxFp4Config    ModelOptMxFp4LinearMethod / ...MoEMethod
W4A8_MXFP4_FP8              ModelOptMxFp4Config    ModelOptW4A8MxFp4Fp8LinearMethod / ...MoEMethod
W4A16_NVFP4                 ModelOptFp4Config      ModelOptNvFp4W4A16LinearMethod / ...MoEMethod
W4A8_NVFP4_FP8              ModelOptFp4Config      ModelOptNvFp4W4A8LinearMethod / ...MoEMethod
NVFP4_AWQ                   ModelOptFp4Config      ModelOptNvFp4AwqLinearMethod / -
NVFP4_SVD (nvfp4_svdquant)  ModelOptFp4Config      ModelOptNvFp4SvdQuantLinearMethod / -
FP8_PB_REAL (fp8_pb_real)   ModelOptFp8Config      ModelOptFp8PbWoLinearMethod / ModelOptFp8PbWoMoEMethod
MIXED_PRECISION             ModelOptMixedPrecisionConfig (``mopt.quant.config_mixed``): one of these per layer
==========================  =====================  ===========================================

"-": ModelOpt 0.47 cannot export such experts (its AWQ/SVDQuant export of fused experts fails), so a
MoE layer in these formats is a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from mopt.quant.config_base import ModelOptQuantConfigBase, QuantConfigError, _detect_algo, register_quant_config
from mopt.quant.config_fp8_nvfp4 import ModelOptFp8Config


@dataclass(frozen=True)
class AlgoSpec:
    """What one ``quant_algo`` needs: its methods (``module:Class`` under ``mopt.quant.methods``, imported
    when first used), its group size (None: no groups) and the sizes it accepts."""

    linear: str
    moe: str | None
    group_size: int | None = None
    group_sizes: tuple[int, ...] = ()


def _method(path: str | None) -> tuple[str, str] | None:
    """``(module, class name)``, imported when first used (see ``config_base._MethodClass``)."""
    if path is None:
        return None
    module, cls = path.split(":")
    return f"mopt.quant.methods.{module}", cls


class ModelOptFormatConfig(ModelOptQuantConfigBase):
    """A config driven by its class's :data:`SPECS` row for ``quant_method``."""

    SPECS: dict[str, AlgoSpec] = {}
    NAME = "modelopt"
    MIN_CAPABILITY = 80

    def __init__(self, quant_method: str, kv_cache_quant_method: str | None = None,
                 exclude_modules: list[str] | None = None, group_size: int | None = None,
                 packed_modules_mapping: Mapping[str, list[str]] | None = None) -> None:
        super().__init__(exclude_modules or [], kv_cache_quant_method, packed_modules_mapping)
        spec = self.SPECS.get(quant_method)
        if spec is None:
            raise QuantConfigError(f"{type(self).__name__} does not handle quant_algo {quant_method!r}; "
                                   f"it handles {sorted(self.SPECS)}")
        if spec.group_size is None:
            group_size = None
        elif group_size is None:
            group_size = spec.group_size
        elif group_size not in spec.group_sizes:
            raise QuantConfigError(f"{quant_method} group_size must be one of {list(spec.group_sizes)}, "
                                   f"got {group_size}")
        self.quant_method = quant_method
        self.group_size = group_size
        self.LinearMethodCls = _method(spec.linear)
        self.FusedMoEMethodCls = _method(spec.moe)

    def get_name(self) -> str:
        return self.NAME

    @classmethod
    def get_min_capability(cls) -> int:
        return cls.MIN_CAPABILITY

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: Mapping[str, Any] | None, user_quant: str | None) -> str | None:
        algo = _detect_algo(hf_quant_cfg)
        return cls.NAME if algo is not None and algo.upper() in cls.SPECS else None

    @classmethod
    def _from_config(cls, *, quant_method: str, kv_cache_quant_method: str | None, exclude_modules: list[str],
                     group_size: int | None, original_config: Mapping[str, Any], **kwargs: Any) -> "ModelOptFormatConfig":
        quant = original_config.get("quantization", original_config)
        if quant.get("has_zero_point"):
            raise QuantConfigError(f"{quant_method} with has_zero_point: true (asymmetric INT4) is not supported; "
                                   "ModelOpt exports symmetric groups")
        return cls(quant_method, kv_cache_quant_method, exclude_modules, group_size)


class ModelOptInt4AwqConfig(ModelOptFormatConfig):
    """INT4 groups along K (``mopt.quant.formats.int4``)."""

    MIN_CAPABILITY = 75
    SPECS = {
        "W4A16_AWQ": AlgoSpec("int_linear:ModelOptInt4AwqLinearMethod", None, 128, (32, 64, 128)),
        "W4A8_AWQ": AlgoSpec("int_linear:ModelOptW4A8AwqLinearMethod", None, 128, (32, 64, 128)),
    }


class ModelOptInt8Config(ModelOptFormatConfig):
    """INT8 per-channel weights (``mopt.quant.formats.int8``)."""

    MIN_CAPABILITY = 75
    SPECS = {
        "W8A16": AlgoSpec("int_linear:ModelOptInt8WeightOnlyLinearMethod",
                          "moe_formats:ModelOptInt8WeightOnlyMoEMethod"),
        "W8A8_SQ_PER_CHANNEL": AlgoSpec("int_linear:ModelOptInt8SmoothQuantLinearMethod",
                                        "moe_formats:ModelOptInt8SmoothQuantMoEMethod"),
    }


class ModelOptMxFp8Config(ModelOptFormatConfig):
    """MXFP8 (``mopt.quant.formats.mx``)."""

    NAME = "modelopt_mxfp8"
    SPECS = {"MXFP8": AlgoSpec("mx_linear:ModelOptMxFp8LinearMethod", "moe_formats:ModelOptMxFp8MoEMethod", 32, (32,))}


class ModelOptMxFp4Config(ModelOptFormatConfig):
    """MXFP4 weights, MXFP4 or FP8 activations (``mopt.quant.formats.mx``)."""

    NAME = "modelopt_mxfp4"
    SPECS = {
        "MXFP4": AlgoSpec("mx_linear:ModelOptMxFp4LinearMethod", "moe_formats:ModelOptMxFp4MoEMethod", 32, (32,)),
        "W4A8_MXFP4_FP8": AlgoSpec("mx_linear:ModelOptW4A8MxFp4Fp8LinearMethod",
                                   "moe_formats:ModelOptW4A8MxFp4Fp8MoEMethod", 32, (32,)),
    }


class ModelOptFp4Config(ModelOptFormatConfig):
    """The NVFP4 weight encoding's other algorithms (``mopt.quant.formats.nvfp4``)."""

    NAME = "modelopt_fp4"
    MIN_CAPABILITY = 75
    SPECS = {
        "W4A16_NVFP4": AlgoSpec("nvfp4_variants:ModelOptNvFp4W4A16LinearMethod",
                                "moe_formats:ModelOptNvFp4W4A16MoEMethod", 16, (16,)),
        "W4A8_NVFP4_FP8": AlgoSpec("nvfp4_variants:ModelOptNvFp4W4A8LinearMethod",
                                   "moe_formats:ModelOptNvFp4W4A8MoEMethod", 32, (32,)),
        "NVFP4_AWQ": AlgoSpec("nvfp4_variants:ModelOptNvFp4AwqLinearMethod", None, 16, (16,)),
        "NVFP4_SVD": AlgoSpec("nvfp4_variants:ModelOptNvFp4SvdQuantLinearMethod", None, 16, (16,)),
    }

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        import torch

        return [torch.bfloat16, torch.half, torch.float32]


for _cls in (ModelOptInt4AwqConfig, ModelOptInt8Config, ModelOptMxFp8Config, ModelOptMxFp4Config, ModelOptFp4Config):
    for _algo in _cls.SPECS:
        register_quant_config(_algo, _cls)
register_quant_config("FP8_PB_REAL", ModelOptFp8Config)

from mopt.quant import config_mixed  # noqa: E402,F401  (registers MIXED_PRECISION)
