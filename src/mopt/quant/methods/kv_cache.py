"""KV-cache scale method: per-layer FP8 ``k_scale`` / ``v_scale``.

ModelOpt stores them as ``self_attn.k_proj.k_scale`` and ``self_attn.v_proj.v_scale`` (fp32
scalars, ``amax / 448``); the loader maps them onto the attention layer. A cache entry holds
``e4m3(k / k_scale)``. Older exports clamped these scales to at least 1.0; they load as they are.
"""

from __future__ import annotations

import logging

import torch

from mopt.layers.parameter import PerTensorScaleParameter, WeightLoadError
from mopt.quant.methods.base import QuantizeMethodBase

logger = logging.getLogger(__name__)

_UNSET = -1.0


class BaseKVCacheMethod(QuantizeMethodBase):
    def __init__(self, quant_config) -> None:
        self.quant_config = quant_config

    def create_weights(self, layer: torch.nn.Module) -> None:
        for name in ("k_scale", "v_scale"):
            param = PerTensorScaleParameter(torch.tensor([_UNSET]), weight_loader=None)
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Fix ``layer.k_scale_float`` / ``v_scale_float``; 1.0 where the checkpoint has none."""
        quantized = getattr(self.quant_config, "kv_cache_quantized", False)
        for name in ("k_scale", "v_scale"):
            value = float(getattr(layer, name).data.reshape(-1)[0])
            if value == _UNSET:
                if quantized and getattr(layer, "kv_cache_dtype", "auto") != "auto":
                    logger.warning(
                        "%s: the checkpoint has no %s; using 1.0", getattr(layer, "prefix", "attention"), name
                    )
                value = 1.0
            elif value <= 0:
                raise WeightLoadError(f"{getattr(layer, name).mopt_name}: KV-cache scale must be positive, got {value}")
            setattr(layer, f"{name}_float", value)
            delattr(layer, name)
            layer.register_buffer(name, torch.tensor(value, dtype=torch.float32))


class ModelOptFp8KVCacheMethod(BaseKVCacheMethod):
    """Loads ModelOpt's per-layer FP8 KV-cache scales."""
