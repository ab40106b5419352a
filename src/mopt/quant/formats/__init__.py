"""Exact reference numerics per format: quantize, dequantize, pack, scale layouts (torch only)."""

from mopt.quant.formats import fp8, int4, int8, kv_cache, mx, nvfp4

__all__ = ["fp8", "int4", "int8", "kv_cache", "mx", "nvfp4"]
