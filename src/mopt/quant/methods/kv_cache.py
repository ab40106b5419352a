"""KV-cache methods: per-layer ``k_scale`` / ``v_scale`` (FP8), and NVFP4 / NVFP4_AFFINE / INT8 caches.

ModelOpt stores them as ``self_attn.k_proj.k_scale`` and ``self_attn.v_proj.v_scale`` (fp32
scalars, ``amax / 448``); the loader maps them onto the attention layer. A cache entry holds
``e4m3(k / k_scale)``. Older exports clamped these scales to at least 1.0; they load as they are.
"""

from __future__ import annotations

import logging

import torch

from mopt.layers.parameter import PerTensorScaleParameter, WeightLoadError
from mopt.quant.formats import kv_cache as kv_format
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
            device = getattr(layer, name).device
            delattr(layer, name)
            # On the layer's device: emulated caches compute with it inside CUDA graphs (no host copy).
            layer.register_buffer(name, torch.tensor(value, dtype=torch.float32, device=device))


class ModelOptFp8KVCacheMethod(BaseKVCacheMethod):
    """Loads ModelOpt's per-layer FP8 KV-cache scales."""


class _EmulatedKVCacheMethod(BaseKVCacheMethod):
    """An NVFP4, NVFP4_AFFINE or INT8 KV cache.

    ``kv_algo`` tells attention (before loading) which format its paged cache stores natively
    (``Attention.kv_storage``); the paged kernels quantize on write and dequantize on read. After
    loading, the layer carries ``kv_cache_algo`` and ``kv_cache_storage`` (what a cache of this format
    holds per token and head, ``mopt.quant.formats.kv_cache.KVCacheStorage``), and the method offers
    :meth:`quantize_kv` / :meth:`dequantize_kv` (the reference write and read) and :meth:`round_kv`,
    which the cache-free path calls on keys (after RoPE) and values: they become exactly what a cache
    of the format returns. The paged path calls it too only when ``kv_cache_dtype="fp8"`` makes its
    cache FP8 (both roundings then, as the warning says).
    """

    algo = "abstract"
    has_bias = False

    @property
    def kv_algo(self) -> str:
        return self.algo

    def create_weights(self, layer: torch.nn.Module) -> None:
        super().create_weights(layer)
        if self.has_bias:
            for name in ("k_bias", "v_bias"):
                param = _KVBiasParameter(torch.zeros(layer.num_kv_heads, layer.head_dim), weight_loader=None)
                param._weight_loader = lambda p, t, shard_id=None: p.load(t)
                param.mopt_name = f"{getattr(layer, 'prefix', 'attention')}.{name}"
                layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        if self.has_bias:
            for name in ("k_bias", "v_bias"):
                value = getattr(layer, name).data.clone()
                del layer._parameters[name]
                layer.register_buffer(name, value)
        layer.kv_cache_algo = self.algo
        layer.kv_cache_storage = kv_format.kv_storage(self.algo, layer.head_dim)
        if getattr(layer, "kv_cache_dtype", "auto") != "auto":
            logger.warning("%s: an %s KV cache under --kv-cache-dtype %s: values are rounded to %s, then stored "
                           "as FP8 (quantized twice)",
                           getattr(layer, "prefix", "attention"), self.algo, layer.kv_cache_dtype, self.algo)
        layer.kv_emulation = self

    def quantize_kv(self, layer: torch.nn.Module, x: torch.Tensor, which: str) -> kv_format.KVCodes:
        """Cache codes of keys (``which="k"``) or values (``"v"``) ``x [..., Hkv, D]``."""
        return kv_format.quantize_kv(x, self.algo, getattr(layer, f"{which}_scale"),
                                     getattr(layer, f"{which}_bias", None))

    def dequantize_kv(self, layer: torch.nn.Module, stored: kv_format.KVCodes, which: str,
                      dtype: torch.dtype) -> torch.Tensor:
        return kv_format.dequantize_kv(stored, self.algo, getattr(layer, f"{which}_scale"),
                                       getattr(layer, f"{which}_bias", None), dtype)

    def round_kv(self, layer: torch.nn.Module, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (after RoPE) and values as a cache of this format returns them."""
        k = self.dequantize_kv(layer, self.quantize_kv(layer, k, "k"), "k", k.dtype)
        v = self.dequantize_kv(layer, self.quantize_kv(layer, v, "v"), "v", v.dtype)
        return k, v


class _KVBiasParameter(PerTensorScaleParameter):
    """NVFP4_AFFINE's ``k_bias`` / ``v_bias``: ``[Hkv, D]``; ModelOpt exports ``[1, Hkv, 1, D]``."""

    def load(self, loaded: torch.Tensor, spec=None) -> None:
        if loaded.dim() == 4 and loaded.shape[0] == 1 and loaded.shape[2] == 1:
            loaded = loaded[0, :, 0, :]
        self.check_and_copy(self.data, loaded)


class ModelOptNvFp4KVCacheMethod(_EmulatedKVCacheMethod):
    """NVFP4 KV cache: 16-element blocks along the head dim, global scale ``k_scale / 6``."""

    algo = "NVFP4"


class ModelOptNvFp4AffineKVCacheMethod(_EmulatedKVCacheMethod):
    """NVFP4 KV cache of ``k - k_bias`` (per kv-head and channel bias)."""

    algo = "NVFP4_AFFINE"
    has_bias = True


class ModelOptInt8KVCacheMethod(_EmulatedKVCacheMethod):
    """INT8 KV cache with per-layer scales (``amax / 127``)."""

    algo = "INT8"


_KV_CACHE_METHODS: dict[str | None, type[BaseKVCacheMethod]] = {
    None: ModelOptFp8KVCacheMethod,
    "FP8": ModelOptFp8KVCacheMethod,
    "NVFP4": ModelOptNvFp4KVCacheMethod,
    "NVFP4_AFFINE": ModelOptNvFp4AffineKVCacheMethod,
    "INT8": ModelOptInt8KVCacheMethod,
}


def kv_cache_method_cls(algo: str | None) -> type[BaseKVCacheMethod]:
    """The KV-cache method of a ``kv_cache_quant_algo`` (the FP8 one loads scales when there are none;
    an unknown algo was already warned about by the config and leaves the cache in the model dtype)."""
    return _KV_CACHE_METHODS.get(algo, ModelOptFp8KVCacheMethod)
