"""Attention: grouped-query, causal, with the layer's KV-cache quantization method.

This is the cache-free full-sequence path (scoring, evaluation). Keys and values pass through
the KV cache's storage format when the cache is FP8 (``e4m3(k / k_scale) * k_scale``), so logits
equal what a cached decode computes.
"""

from __future__ import annotations

import torch
from torch import nn

from mopt.quant.formats import fp8


class Attention(nn.Module):
    quant_kind = "attention"

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 quant_config=None, prefix: str = "", kv_cache_dtype: str = "auto") -> None:
        super().__init__()
        self.prefix = prefix
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.kv_cache_dtype = kv_cache_dtype
        self.quant_method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        if self.quant_method is not None:
            self.quant_method.create_weights(self)
            for name in ("k_scale", "v_scale"):
                p = getattr(self, name)
                p.mopt_name = f"{prefix}.{name}"
                p._weight_loader = lambda param, t, shard_id=None: param.load(t)
        self.k_scale_float = self.v_scale_float = 1.0

    def process_weights_after_loading(self) -> None:
        if self.quant_method is not None:
            self.quant_method.process_weights_after_loading(self)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]`` -> ``[B, T, H*D]``."""
        if self.kv_cache_dtype == "fp8":
            k = fp8.dequantize(fp8.quantize(k, self.k_scale_float), self.k_scale_float, k.dtype)
            v = fp8.dequantize(fp8.quantize(v, self.v_scale_float), self.v_scale_float, v.dtype)
        b, t = q.shape[:2]
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
