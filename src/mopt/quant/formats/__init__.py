"""Exact reference numerics per format: quantize, dequantize, pack, scale layouts (torch only)."""

from mopt.quant.formats import fp8, nvfp4

__all__ = ["fp8", "nvfp4"]
