"""Small unquantized layers: RMSNorm, rotary embedding, vocabulary embedding."""

from __future__ import annotations

import torch
from torch import nn

from mopt.errors import ModelConfigError
from mopt.layers.parameter import ModelWeightParameter, ShardSpec


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` computed in float32, as Llama/Qwen do."""

    def __init__(self, size: int, eps: float = 1e-6, prefix: str = "") -> None:
        super().__init__()
        self.eps = eps
        self.weight = ModelWeightParameter(torch.ones(size), output_dim=0, input_dim=-1)
        self.weight.mopt_name = f"{prefix}.weight"
        self.weight._weight_loader = lambda param, t, shard_id=None: param.load(t, ShardSpec())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


def rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE type (llama3, yarn, ...)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope_type == "default":
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ModelConfigError(f"unsupported rope_type {rope_type!r}; supported: default, {sorted(ROPE_INIT_FUNCTIONS)}")
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE applied to ``q, k`` of shape ``[B, T, heads, head_dim]``."""

    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        inv, self.attention_scaling = rope_inv_freq(config, head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        freqs = positions.float()[..., None] * self.inv_freq.to(q.device)[None, None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.attention_scaling)[:, :, None, :]
        sin = (emb.sin() * self.attention_scaling)[:, :, None, :]

        def rotate(x):
            x1, x2 = x.float().chunk(2, dim=-1)
            return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

        return rotate(q), rotate(k)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype, prefix: str = "") -> None:
        super().__init__()
        self.weight = ModelWeightParameter(torch.empty(vocab_size, hidden_size, dtype=params_dtype))
        self.weight.mopt_name = f"{prefix}.weight"
        self.weight._weight_loader = lambda param, t, shard_id=None: param.load(t, ShardSpec())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)
