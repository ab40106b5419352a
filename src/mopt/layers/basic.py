"""Small unquantized layers: RMSNorm, rotary embedding, (vocabulary-parallel) vocabulary embedding."""

from __future__ import annotations

import torch
from torch import nn

from mopt.engine.distributed import all_reduce, current_parallel_state, group_for
from mopt.errors import ModelConfigError
from mopt.kernels.glue import rms_norm, vocab_rows
from mopt.kernels.paged_attention import apply_rope
from mopt.layers.parameter import ModelWeightParameter, ShardSpec, WeightLoadError

DEFAULT_MAX_POSITIONS = 8192


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` computed in float32, as Llama/Qwen do.

    ``forward(x, residual)`` first adds the residual stream (rounded to the activation dtype, as an
    unfused ``x + residual`` is) and returns ``(normed, new residual)``: one kernel on GPUs. With
    ``fp8_scale`` (the next layer's ``fp8_input_scale``) ``normed`` is E4M3 codes under it, with
    ``nvfp4_scale`` (its ``nvfp4_input_scale``) NVFP4 block values (``kernels.quantized_input``). With
    ``reduce_group``, ``x`` is this rank's partial sums of a row-parallel layer (or of the
    vocabulary-parallel embedding): they are all-reduced first, in the norm's own kernel where the group
    has one for them (one node's GPUs), and without a residual the result is ``(normed, the sum)``.
    """

    def __init__(self, size: int, eps: float = 1e-6, prefix: str = "") -> None:
        super().__init__()
        self.eps = eps
        self.weight = ModelWeightParameter(torch.ones(size), output_dim=0, input_dim=-1)
        self.weight.mopt_name = f"{prefix}.weight"
        self.weight._weight_loader = lambda param, t, shard_id=None: param.load(t, ShardSpec())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8_scale: torch.Tensor | None = None,
                reduce_group=None, nvfp4_scale: torch.Tensor | None = None):
        if reduce_group is not None:
            fused = reduce_group.fused_rms_norm(x)
            if fused is not None:
                return fused(x, residual, self.weight, self.eps, fp8_scale, nvfp4_scale)
            x = all_reduce(x, reduce_group)
            if residual is None:
                return rms_norm(x, self.weight, self.eps, None, fp8_scale, nvfp4_scale), x
        return rms_norm(x, self.weight, self.eps, residual, fp8_scale, nvfp4_scale)


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
    with torch.device("cpu"):  # transformers computes on the CPU (also while a model is built on the meta device)
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
        self.max_positions = int(getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_POSITIONS)
        if torch.empty(0).device.type == "meta":  # built for its shapes only (mopt.engine.tp_plan): no values
            self.register_buffer("cos_sin_cache", torch.empty(self.max_positions, head_dim), persistent=False)
            return
        inv, scaling = rope_inv_freq(config, head_dim)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv.to(positions.device)[None, :]
        table = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)
        self.register_buffer("cos_sin_cache", table, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos_sin = self.cos_sin_cache[positions]
        return apply_rope(q, cos_sin), apply_rope(k, cos_sin)

    def identity_cos_sin(self) -> torch.Tensor:
        """A table of the same shape that rotates nothing (cos 1, sin 0: exact), built once for every layer
        sharing this module: attention writes keys it already rotated through it."""
        table = getattr(self, "_identity", None)
        if table is None or table.device != self.cos_sin_cache.device:
            half = self.cos_sin_cache.shape[-1] // 2
            table = torch.cat([torch.ones_like(self.cos_sin_cache[:, :half]),
                               torch.zeros_like(self.cos_sin_cache[:, half:])], dim=-1)
            self._identity = table
        return table


def vocab_rows_per_rank(vocab_size: int, tp_size: int) -> int:
    """Rows of the vocabulary each rank holds: ``ceil(vocab / tp)``, the last rank's tail padded."""
    return -(-vocab_size // tp_size)


def load_vocab_rows(param: ModelWeightParameter, loaded: torch.Tensor, vocab_size: int, tp_rank: int) -> None:
    """Load rank ``tp_rank``'s rows of a ``[vocab, ...]`` checkpoint tensor (only those are read) and zero
    the padding rows after the vocabulary's end."""
    rows = param.data.shape[0]
    if loaded.dim() < 1 or loaded.shape[0] != vocab_size:
        raise WeightLoadError(f"{param.mopt_name}: checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                              f"{vocab_size} rows (the vocabulary)")
    start = min(tp_rank * rows, vocab_size)
    count = min(rows, vocab_size - start)
    if count:
        param.load(loaded.narrow(0, start, count), ShardSpec(size=count))
    if count < rows:
        param.data[count:].zero_()
        param.loaded_spans.append((count, rows))


class VocabEmbedding(nn.Module):
    """Token embeddings, vocabulary-parallel under tensor parallelism: each rank holds the rows
    ``[rank * R, (rank + 1) * R)`` with ``R = ceil(vocab / tp)`` (past the vocabulary: zeros), looks up
    the ids in its range, writes zeros for the others, and the ranks' lookups are summed (an
    all-reduce: exact, since exactly one rank contributes each row). ``forward(ids, reduce=False)``
    leaves the sum to the caller: the first layer's norm takes it (``RMSNorm(..., reduce_group=...)``)."""

    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype, prefix: str = "") -> None:
        super().__init__()
        state = current_parallel_state()
        self.num_embeddings, self.embedding_dim = vocab_size, hidden_size
        self.tp_rank, self.tp_size, self.tp_group = state.tp_rank, state.tp_size, group_for(state.tp_size)
        rows = vocab_rows_per_rank(vocab_size, self.tp_size)
        self.vocab_start = min(self.tp_rank * rows, vocab_size)
        self.vocab_end = min(self.vocab_start + rows, vocab_size)
        self.weight = ModelWeightParameter(torch.empty(rows, hidden_size, dtype=params_dtype))
        self.weight.mopt_name = f"{prefix}.weight"
        if self.tp_size == 1:
            self.weight._weight_loader = lambda param, t, shard_id=None: param.load(t, ShardSpec())
        else:
            self.weight._weight_loader = lambda param, t, shard_id=None: load_vocab_rows(param, t, vocab_size,
                                                                                         self.tp_rank)

    def forward(self, ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        if self.tp_size == 1:
            return nn.functional.embedding(ids, self.weight)
        out = vocab_rows(ids, self.weight, self.vocab_start, self.vocab_end - self.vocab_start)
        return all_reduce(out, self.tp_group) if reduce and self.tp_group is not None else out
