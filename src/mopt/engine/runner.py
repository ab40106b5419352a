"""Runs the model on a scheduled batch: packs new tokens, builds attention metadata, samples.

It also owns the paged KV cache: one ``k_cache`` / ``v_cache`` pair of
``[num_blocks, block_size, num_kv_heads, head_dim]`` per attention layer, in the model's dtype or
in FP8 E4M3 (with the layer's ``k_scale`` / ``v_scale``) when the model's KV cache is FP8.
"""

from __future__ import annotations

import torch

from mopt.engine.sampler import sample
from mopt.engine.sequence import Sequence
from mopt.layers.attention import Attention, AttentionMetadata
from mopt.quant.formats import fp8


def attention_layers(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def kv_cache_dtype_of(model: torch.nn.Module, model_dtype: torch.dtype) -> torch.dtype:
    layers = attention_layers(model)
    return fp8.FP8_DTYPE if layers and layers[0].kv_cache_dtype == "fp8" else model_dtype


def kv_bytes_per_token(model: torch.nn.Module, model_dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=kv_cache_dtype_of(model, model_dtype)).element_size()
    return sum(2 * a.num_kv_heads * a.head_dim * itemsize for a in attention_layers(model))


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.model, self.block_size = model, block_size
        self.device = next(model.parameters()).device
        cache_dtype = kv_cache_dtype_of(model, dtype)
        for layer in attention_layers(model):
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=cache_dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=cache_dtype, device=self.device)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[t // bs] * bs + t % bs for t in range(start, end)]

    def _prepare(self, seqs: list[Sequence], is_prefill: bool):
        ids, positions, slots, q_starts, seq_lens = [], [], [], [0], []
        for seq in seqs:
            n = len(seq)
            start = 0 if is_prefill else n - 1
            ids += seq.token_ids[start:] if is_prefill else [seq.last_token_id]
            positions += range(start, n)
            slots += self._slots(seq, start, n)
            q_starts.append(q_starts[-1] + n - start)
            seq_lens.append(n)
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(q_starts, dtype=torch.long, device=dev),
            max_query_len=max(b - a for a, b in zip(q_starts, q_starts[1:])),
        )
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        pos = torch.tensor([positions], dtype=torch.long, device=dev)
        return input_ids, pos, meta

    @torch.inference_mode()
    def step_logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Logits ``[len(seqs), vocab]`` at each sequence's last token, after caching its new tokens."""
        input_ids, positions, meta = self._prepare(seqs, is_prefill)
        hidden = self.model.compute_hidden(input_ids, positions, meta)[0]
        return self.model.compute_logits(hidden[meta.query_start_loc[1:] - 1])

    def step(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        logits = self.step_logits(seqs, is_prefill)
        return sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
