"""Linear, MoE and KV-cache methods per format."""

from mopt.quant.methods.fp8_linear import (
    ModelOptFp8LinearMethod,
    ModelOptFp8PbWoLinearMethod,
    ModelOptFp8PcPtLinearMethod,
)
from mopt.quant.methods.int_linear import (
    ModelOptInt4AwqLinearMethod,
    ModelOptInt8SmoothQuantLinearMethod,
    ModelOptInt8WeightOnlyLinearMethod,
    ModelOptW4A8AwqLinearMethod,
)
from mopt.quant.methods.kv_cache import (
    BaseKVCacheMethod,
    ModelOptFp8KVCacheMethod,
    ModelOptInt8KVCacheMethod,
    ModelOptNvFp4AffineKVCacheMethod,
    ModelOptNvFp4KVCacheMethod,
)
from mopt.quant.methods.linear import UnquantizedLinearMethod
from mopt.quant.methods.mx_linear import (
    ModelOptMxFp4LinearMethod,
    ModelOptMxFp8LinearMethod,
    ModelOptW4A8MxFp4Fp8LinearMethod,
)
from mopt.quant.methods.nvfp4_linear import ModelOptNvFp4LinearMethod
from mopt.quant.methods.nvfp4_variants import (
    ModelOptNvFp4AwqLinearMethod,
    ModelOptNvFp4SvdQuantLinearMethod,
    ModelOptNvFp4W4A8LinearMethod,
    ModelOptNvFp4W4A16LinearMethod,
)

__all__ = [
    "BaseKVCacheMethod",
    "ModelOptFp8KVCacheMethod",
    "ModelOptFp8LinearMethod",
    "ModelOptFp8PbWoLinearMethod",
    "ModelOptFp8PcPtLinearMethod",
    "ModelOptInt4AwqLinearMethod",
    "ModelOptInt8KVCacheMethod",
    "ModelOptInt8SmoothQuantLinearMethod",
    "ModelOptInt8WeightOnlyLinearMethod",
    "ModelOptMxFp4LinearMethod",
    "ModelOptMxFp8LinearMethod",
    "ModelOptNvFp4AffineKVCacheMethod",
    "ModelOptNvFp4AwqLinearMethod",
    "ModelOptNvFp4KVCacheMethod",
    "ModelOptNvFp4LinearMethod",
    "ModelOptNvFp4SvdQuantLinearMethod",
    "ModelOptNvFp4W4A16LinearMethod",
    "ModelOptNvFp4W4A8LinearMethod",
    "ModelOptW4A8AwqLinearMethod",
    "ModelOptW4A8MxFp4Fp8LinearMethod",
    "UnquantizedLinearMethod",
]
