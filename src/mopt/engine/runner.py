"""Runs the model on a scheduled batch: packs new tokens, builds attention metadata, samples.

It also owns the paged KV cache: one ``k_cache`` / ``v_cache`` pair of
``[num_blocks, block_size, num_kv_heads, head_dim]`` per attention layer, in the model's dtype or
in FP8 E4M3 (with the layer's ``k_scale`` / ``v_scale``) when the model's KV cache is FP8.

Step inputs are built with numpy into one int32 array (token ids, positions, slots, query starts,
sequence lengths, block tables) and cross to the device in one copy. Decode steps run through
:class:`~mopt.engine.cuda_graphs.DecodeGraphs` (captured CUDA graphs on GPUs, the same padded
static buffers run eagerly elsewhere); prefill steps run eagerly. Sampling happens on the device;
the sampled ids come back in one copy per step.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from mopt.engine.block_manager import blocks_needed
from mopt.engine.cuda_graphs import DecodeGraphs, graph_blockers
from mopt.engine.sampler import SamplingTensors, greedy_tokens, sample
from mopt.engine.sequence import Sequence
from mopt.engine.staging import Staging
from mopt.layers.attention import Attention, AttentionMetadata
from mopt.quant.formats import fp8

logger = logging.getLogger(__name__)


def attention_layers(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def kv_cache_dtype_of(model: torch.nn.Module, model_dtype: torch.dtype) -> torch.dtype:
    layers = attention_layers(model)
    return fp8.FP8_DTYPE if layers and layers[0].kv_cache_dtype == "fp8" else model_dtype


def kv_bytes_per_token(model: torch.nn.Module, model_dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=kv_cache_dtype_of(model, model_dtype)).element_size()
    return sum(2 * a.num_kv_heads * a.head_dim * itemsize for a in attention_layers(model))


def decode_arrays(seqs: list[Sequence], block_size: int) -> dict[str, np.ndarray]:
    """Per-sequence decode inputs: the last token, its position and slot, the sequence length."""
    lens = np.fromiter((len(s) for s in seqs), np.int32, len(seqs))
    pos = lens - 1
    last_block = np.fromiter((s.block_table[(len(s) - 1) // block_size] for s in seqs), np.int32, len(seqs))
    return dict(ids=np.fromiter((s.last_token_id for s in seqs), np.int32, len(seqs)), positions=pos,
                slots=last_block * block_size + pos % block_size, seq_lens=lens)


def block_table_array(seqs: list[Sequence], width: int | None = None) -> np.ndarray:
    width = width or max(len(s.block_table) for s in seqs)
    tables = np.zeros((len(seqs), width), np.int32)
    for row, s in zip(tables, seqs):
        row[: len(s.block_table)] = s.block_table
    return tables


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 max_num_seqs: int = 64, max_model_len: int | None = None, enforce_eager: bool = False,
                 progress: bool = False) -> None:
        self.model, self.block_size = model, block_size
        self.device = next(model.parameters()).device
        cache_dtype = kv_cache_dtype_of(model, dtype)
        for layer in attention_layers(model):
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            layer.attach_kv_cache(torch.zeros(shape, dtype=cache_dtype, device=self.device),
                                  torch.zeros(shape, dtype=cache_dtype, device=self.device))
        max_model_len = max_model_len or num_blocks * block_size
        self.staging = Staging(self.device)
        capture = self.device.type == "cuda" and not enforce_eager
        blockers = graph_blockers(model) if capture else []
        if blockers:
            logger.warning("decode steps run without CUDA graphs: %s%s", blockers[0],
                           f" (and {len(blockers) - 1} more layers)" if len(blockers) > 1 else "")
        self.graphs = DecodeGraphs(self._decode_forward, self.device, max_num_seqs, blocks_needed(max_model_len, block_size),
                                   capture=capture and not blockers, pad=self.device.type == "cuda", progress=progress)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 last_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits at ``last_rows`` of the packed tokens (every row when None)."""
        hidden = self.model.compute_hidden(ids[None], positions[None], meta)[0]
        return self.model.compute_logits(hidden if last_rows is None else hidden[last_rows])

    def _decode_forward(self, ids: torch.Tensor, positions: torch.Tensor,
                        meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and their argmax (inside the CUDA graph, so a greedy step launches nothing more)."""
        logits = self._forward(ids, positions, meta)
        return logits, greedy_tokens(logits)

    def _prefill_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        bs = self.block_size
        lens = [len(s) for s in seqs]
        ids = np.fromiter((t for s in seqs for t in s.token_ids), np.int32, sum(lens))
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
        tables = block_table_array(seqs)
        rows = np.repeat(np.arange(len(seqs)), lens)
        slots = tables[rows, positions // bs] * bs + positions % bs
        q_starts = np.zeros(len(seqs) + 1, np.int32)
        np.cumsum(lens, out=q_starts[1:])
        n, b = len(ids), len(seqs)
        packed = self.staging.to_device(np.concatenate([ids, positions, slots, q_starts, np.asarray(lens, np.int32),
                                                 tables.reshape(-1)]))
        meta = AttentionMetadata(slot_mapping=packed[2 * n:3 * n], block_tables=packed[3 * n + 2 * b + 1:].view(b, -1),
                                 seq_lens=packed[3 * n + b + 1:3 * n + 2 * b + 1],
                                 query_start_loc=packed[3 * n:3 * n + b + 1], max_query_len=max(lens))
        return self._forward(packed[:n], packed[n:2 * n], meta, meta.query_start_loc[1:].long() - 1)

    def _logits(self, seqs: list[Sequence], is_prefill: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_prefill:
            return self._prefill_logits(seqs), None
        return self.graphs.run(decode_arrays(seqs, self.block_size), block_table_array(seqs))

    @torch.inference_mode()
    def step_logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Logits ``[len(seqs), vocab]`` at each sequence's last token, after caching its new tokens."""
        return self._logits(seqs, is_prefill)[0]

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        logits, greedy = self._logits(seqs, is_prefill)
        return sample(logits, SamplingTensors.from_sequences(seqs, self.device), greedy).tolist()
