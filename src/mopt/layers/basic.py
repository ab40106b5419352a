"""Small unquantized layers: RMSNorm, rotary embedding, vocabulary embedding."""

from __future__ import annotations

import torch
from torch import nn

from mopt.errors import ModelConfigError
from mopt.kernels.glue import rms_norm
from mopt.kernels.paged_attention import apply_rope
from mopt.layers.parameter import ModelWeightParameter, ShardSpec

DEFAULT_MAX_POSITIONS = 8192


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` computed in float32, as Llama/Qwen do.

    ``forward(x, residual)`` first adds the residual stream (rounded to the activation dtype, as an
    unfused ``x + residual`` is) and returns ``(normed, new residual)``: one kernel on GPUs. With
    ``fp8_scale`` (the next layer's ``fp8_input_scale``) ``normed`` is E4M3 codes under it.
    """

    def __init__(self, size: int, eps: float = 1e-6, prefix: str = "") -> None:
        super().__init__()
        self.eps = eps
        self.weight = ModelWeightParameter(torch.ones(size), output_dim=0, input_dim=-1)
        self.weight.mopt_name = f"{prefix}.weight"
        self.weight._weight_loader = lambda param, t, shard_id=None: param.load(t, ShardSpec())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8_scale: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual, fp8_scale)


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
    """Rotate-half RoPE from a table ``cos_sin_cache [max_positions, head_dim]`` (float32 cosines,
    then sines, of ``position * inv_freq``, times the RoPE type's attention scaling), built once
    and shared by every layer of a model. ``forward`` rotates ``q, k [B, T, heads, head_dim]``;
    generation steps hand the table to the attention backend, which fuses RoPE with the cache write.
    """

    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        inv, scaling = rope_inv_freq(config, head_dim)
        self.max_positions = int(getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_POSITIONS)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv.to(positions.device)[None, :]
        table = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)
        self.register_buffer("cos_sin_cache", table, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos_sin = self.cos_sin_cache[positions]
        return apply_rope(q, cos_sin), apply_rope(k, cos_sin)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype, prefix: str = "") -> None:
        super().__init__()
        self.weight = ModelWeightParameter(torch.empty(vocab_size, hidden_size, dtype=params_dtype))
        self.weight.mopt_name = f"{prefix}.weight"
        self.weight._weight_loader = lambda param, t, shard_id=None: param.load(t, ShardSpec())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)
