"""Configs of the four ``quant_algo`` values vLLM's ModelOpt integration runs: FP8 (per-tensor),
FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO (128x128 weight blocks) and NVFP4. ``mopt.quant.config`` imports this module,
which registers them; ``mopt.quant.config_algos`` registers the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from mopt.quant.config_base import ModelOptQuantConfigBase, QuantConfigError, _detect_algo, register_quant_config

if TYPE_CHECKING:
    import torch


class ModelOptFp8Config(ModelOptQuantConfigBase):
    """ModelOpt FP8: per-tensor, per-channel/per-token, or 128x128 block weights."""

    def __init__(
        self,
        quant_method: str = "FP8",
        is_checkpoint_fp8_serialized: bool = True,
        kv_cache_quant_method: str | None = None,
        exclude_modules: list[str] | None = None,
        packed_modules_mapping: Mapping[str, list[str]] | None = None,
    ) -> None:
        super().__init__(exclude_modules or [], kv_cache_quant_method, packed_modules_mapping)
        linear = "mopt.quant.methods.fp8_linear"
        methods = {
            "FP8": (linear, "ModelOptFp8LinearMethod"),
            "FP8_PER_CHANNEL_PER_TOKEN": (linear, "ModelOptFp8PcPtLinearMethod"),
            "FP8_PB_WO": (linear, "ModelOptFp8PbWoLinearMethod"),
            "FP8_PB_REAL": (linear, "ModelOptFp8PbWoLinearMethod"),
        }
        if quant_method not in methods:
            raise QuantConfigError(
                f"unsupported ModelOpt FP8 quant_algo {quant_method!r}; supported: {list(methods)}"
            )
        self.quant_method = quant_method
        self.is_checkpoint_fp8_serialized = is_checkpoint_fp8_serialized
        self.LinearMethodCls = methods[quant_method]
        moe, moe_formats = "mopt.quant.methods.moe", "mopt.quant.methods.moe_formats"
        self.FusedMoEMethodCls = {
            "FP8": (moe, "ModelOptFp8MoEMethod"),
            "FP8_PER_CHANNEL_PER_TOKEN": (moe_formats, "ModelOptFp8PcPtMoEMethod"),
            "FP8_PB_WO": (moe_formats, "ModelOptFp8PbWoMoEMethod"),
            "FP8_PB_REAL": (moe_formats, "ModelOptFp8PbWoMoEMethod"),
        }[quant_method]

    def get_name(self) -> str:
        return "modelopt"

    @classmethod
    def get_min_capability(cls) -> int:
        return 89

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: Mapping[str, Any] | None, user_quant: str | None
    ) -> str | None:
        algo = _detect_algo(hf_quant_cfg)
        return "modelopt" if algo is not None and "FP8" in algo.upper() else None

    @classmethod
    def _from_config(
        cls, *, quant_method: str, kv_cache_quant_method: str | None,
        exclude_modules: list[str], **kwargs: Any,
    ) -> "ModelOptFp8Config":
        return cls(quant_method, "FP8" in quant_method, kv_cache_quant_method, exclude_modules)


class ModelOptNvFp4Config(ModelOptQuantConfigBase):
    """ModelOpt NVFP4 (W4A4 with FP8 block scales)."""

    def __init__(
        self,
        is_checkpoint_nvfp4_serialized: bool = True,
        kv_cache_quant_algo: str | None = None,
        exclude_modules: list[str] | None = None,
        group_size: int = 16,
        packed_modules_mapping: Mapping[str, list[str]] | None = None,
    ) -> None:
        super().__init__(exclude_modules or [], kv_cache_quant_algo, packed_modules_mapping)
        if group_size != 16:
            raise QuantConfigError(f"NVFP4 group_size must be 16, got {group_size}")
        self.quant_method = "NVFP4"
        self.is_checkpoint_nvfp4_serialized = is_checkpoint_nvfp4_serialized
        self.group_size = group_size
        self.LinearMethodCls = ("mopt.quant.methods.nvfp4_linear", "ModelOptNvFp4LinearMethod")
        self.FusedMoEMethodCls = ("mopt.quant.methods.moe", "ModelOptNvFp4FusedMoE")

    def get_name(self) -> str:
        return "modelopt_fp4"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        import torch

        return [torch.bfloat16, torch.half, torch.float32, torch.float8_e4m3fn]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: Mapping[str, Any] | None, user_quant: str | None
    ) -> str | None:
        algo = _detect_algo(hf_quant_cfg)
        if algo is None:
            return None
        if "quantization" in hf_quant_cfg:  # type: ignore[operator]
            return "modelopt_fp4" if "NVFP4" in algo else None
        return "modelopt_fp4" if "FP4" in algo.upper() else None

    @classmethod
    def _from_config(
        cls, *, quant_method: str, kv_cache_quant_method: str | None,
        exclude_modules: list[str], original_config: Mapping[str, Any],
        group_size: int | None, **kwargs: Any,
    ) -> "ModelOptNvFp4Config":
        if "quantization" in original_config:
            quant = original_config["quantization"]
            required = ["group_size", "kv_cache_quant_algo", "exclude_modules"]
            missing = [f for f in required if f not in quant]
            if missing:
                raise QuantConfigError(
                    f"NVFP4 quantization requires these fields in hf_quant_config.json: {missing}"
                )
        return cls(
            "NVFP4" in quant_method, kv_cache_quant_method, exclude_modules,
            16 if group_size is None else group_size,
        )


for _algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO"):
    register_quant_config(_algo, ModelOptFp8Config)
register_quant_config("NVFP4", ModelOptNvFp4Config)
