"""Linear, MoE and KV-cache methods per format."""

from mopt.quant.methods.fp8_linear import (
    ModelOptFp8LinearMethod,
    ModelOptFp8PbWoLinearMethod,
    ModelOptFp8PcPtLinearMethod,
)
from mopt.quant.methods.kv_cache import BaseKVCacheMethod, ModelOptFp8KVCacheMethod
from mopt.quant.methods.linear import UnquantizedLinearMethod
from mopt.quant.methods.nvfp4_linear import ModelOptNvFp4LinearMethod

__all__ = [
    "BaseKVCacheMethod",
    "ModelOptFp8KVCacheMethod",
    "ModelOptFp8LinearMethod",
    "ModelOptFp8PbWoLinearMethod",
    "ModelOptFp8PcPtLinearMethod",
    "ModelOptNvFp4LinearMethod",
    "UnquantizedLinearMethod",
]
