"""Runs the model on a scheduled batch: packs new tokens, builds attention metadata, samples.

It also owns the paged KV cache: per attention layer one ``k_cache`` / ``v_cache`` pair of
``[num_blocks, block_size, num_kv_heads, width]`` in the layer's storage (``Attention.kv_storage``):
the model's dtype, FP8 E4M3 or INT8 codes (``width = head_dim``), or NVFP4 packed codes
(``head_dim / 2`` bytes) plus E4M3 block scales ``[..., head_dim / 16]``.

Step inputs are built with numpy into one int32 array (token ids, positions, slots, query starts,
sequence lengths, block tables) and cross to the device in one copy. Decode steps run through
:class:`~mopt.engine.cuda_graphs.DecodeGraphs` (captured CUDA graphs on GPUs, the same padded
static buffers run eagerly elsewhere); so do prefills (up to 2048 tokens of up to 16 prompts a graph,
wider or longer ones in runs of prompts that each fit one, :class:`~mopt.engine.prefill_graphs.PrefillGraphs`),
and what no graph takes runs eagerly. Sampling happens on the device;
the sampled ids (with their logprobs, when asked for) come back in one copy per step.
:meth:`ModelRunner.launch` queues a step and returns at once (a :class:`PendingStep`); a decode step
may take the input ids of its sequences straight from the device-side output of the step before it,
so the host can queue step ``k + 1`` before reading the tokens of step ``k`` and the GPU never waits
for Python between steps.

Under tensor parallelism rank 0's runner hands each step's packed int32 array to ``step_scope``
(set by the engine), which broadcasts it so that every worker runs the same step on its shard
(``prefill_from_array`` / ``run_decode``) while rank 0 runs it here; rank 0 alone samples,
and ``share_tokens`` broadcasts the sampled ids on the model's process group (device to device), where
the workers' next step finds the ids it carries.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np
import torch

from mopt.engine.block_manager import blocks_needed
from mopt.engine.cuda_graphs import CaptureSync, DecodeGraphs, StagedDecode, graph_blockers
from mopt.engine.prefill_graphs import PrefillGraphs
from mopt.engine.sampler import SamplerOutput, SamplingTensors, argmax_keys, greedy_tokens, key_tokens, sample
from mopt.engine.sequence import Sequence
from mopt.engine.staging import Staging
from mopt.layers.attention import Attention, AttentionMetadata

logger = logging.getLogger(__name__)


def attention_layers(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def kv_bytes_per_token(model: torch.nn.Module, model_dtype: torch.dtype) -> int:
    """Cache bytes one token takes over all layers, keys and values, codes and block scales."""
    return sum(2 * a.num_kv_heads * a.kv_storage(model_dtype).bytes_per_head() for a in attention_layers(model))


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


def prefill_array(seqs: list[Sequence], block_size: int) -> tuple[np.ndarray, int, int, int]:
    """``(array, n, b, max_query_len)``: a prefill's ``n`` tokens of ``b`` sequences packed as token ids,
    positions, slots, query starts, sequence lengths and block tables (``prefill_from_array`` reads it)."""
    lens = [len(s) for s in seqs]
    ids = np.fromiter((t for s in seqs for t in s.token_ids), np.int32, sum(lens))
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
    tables = block_table_array(seqs)
    rows = np.repeat(np.arange(len(seqs)), lens)
    slots = tables[rows, positions // block_size] * block_size + positions % block_size
    q_starts = np.zeros(len(seqs) + 1, np.int32)
    np.cumsum(lens, out=q_starts[1:])
    array = np.concatenate([ids, positions, slots, q_starts, np.asarray(lens, np.int32), tables.reshape(-1)])
    return array, len(ids), len(seqs), max(lens)


@dataclass(eq=False)
class PendingStep:
    """A queued model step: the sequences it ran and what it sampled, on its way to the host."""

    seqs: list[Sequence]
    sampled: SamplerOutput  # on the device
    host: torch.Tensor | None = None  # pinned destination of the one copy (None on the CPU)
    event: torch.cuda.Event | None = None
    wait: Callable[[torch.cuda.Event], None] | None = None  # how to wait for ``event`` (default: synchronize)

    @property
    def tokens(self) -> torch.Tensor:
        """The sampled ids, int64 ``[B]`` on the device (a carried step's input ids)."""
        return self.sampled.tokens

    def results(self) -> tuple[list[int], list[tuple[float, list[int], list[float]]] | None]:
        """The sampled ids, and per row ``(logprob, top ids, top logprobs)`` when some sequence asked
        for logprobs (else ``None``), waiting for this step (and only it) to finish."""
        if self.event is None:
            return self.sampled.to_host()
        self.event.synchronize() if self.wait is None else self.wait(self.event)
        return self.sampled.unpack(self.host[: len(self.seqs)].tolist())


# How tensor-parallel workers learn a step's sampled ids (which a carried decode step reads): not at all
# (a step of ``step_logits``), from rank 0's broadcast after sampling, or, when every row is greedy
# (without penalties or logprobs), as the greedy ids every rank computes alike, so that the step needs
# no collective and no host work beyond rank 0's. A decode step gathers the whole vocabulary's logits
# (a collective every rank joins) unless it is ``SHARE_GREEDY``.
SHARE_NONE, SHARE_BROADCAST, SHARE_GREEDY = 0, 1, 2


class ModelRunner:
    # Tensor parallelism (rank 0): ``step_scope(kind, ints, array)`` announces a step to the workers and
    # guards it ("prefill": ints (n, b, max_query_len, share); "decode": ``StagedDecode.header`` + share);
    # ``share_tokens(tokens)`` gives the workers a step's sampled ids.
    step_scope: Callable[[str, tuple, np.ndarray], ContextManager] | None = None
    share_tokens: Callable[[torch.Tensor], None] | None = None
    wait_step: Callable[[torch.cuda.Event], None] | None = None  # rank 0 polls, to notice a dead rank

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 max_num_seqs: int = 64, max_model_len: int | None = None, enforce_eager: bool = False,
                 progress: bool = False, sync: CaptureSync | None = None) -> None:
        """``sync``: how this rank of a tensor-parallel world captures its graphs in step with the others."""
        self.model, self.block_size = model, block_size
        self.device = next(model.parameters()).device
        for layer in attention_layers(model):
            layer.allocate_kv_cache(num_blocks, block_size, dtype, self.device)
        max_model_len = max_model_len or num_blocks * block_size
        self.staging = Staging(self.device)
        self._token_buffers: list[torch.Tensor] = []  # two pinned buffers, used in turn (see Staging)
        self._token_turn = 0
        capture = self.device.type == "cuda" and not enforce_eager
        blockers = graph_blockers(model) if capture else []
        if blockers:
            logger.warning("decode steps run without CUDA graphs: %s%s", blockers[0],
                           f" (and {len(blockers) - 1} more layers)" if len(blockers) > 1 else "")
        head = getattr(model, "lm_head", None)
        # Vocabulary-parallel lm_head: decode steps keep each rank's logits columns (see _decode_forward).
        self.split_head = head if getattr(head, "tp_group", None) is not None else None
        self.graphs = DecodeGraphs(self._decode_forward, self.device, max_num_seqs, blocks_needed(max_model_len, block_size),
                                   capture=capture and not blockers, pad=self.device.type == "cuda", progress=progress,
                                   wait=sync.wait if sync is not None else None)
        self.prefill_graphs = None
        if capture and not blockers:  # a bucket that fails to capture runs eagerly (see PrefillGraphs)
            self.prefill_graphs = PrefillGraphs(self._forward, self.device, max_num_seqs, max_model_len,
                                                blocks_needed(max_model_len, block_size), progress=progress,
                                                sync=sync)
            self.prefill_graphs.warm_eager(max_num_seqs, sync)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 last_rows: torch.Tensor | None = None, gather: bool = True) -> torch.Tensor:
        """Float32 logits at ``last_rows`` of the packed tokens (every row when None); ``gather=False``: a
        vocabulary-parallel model's logits stay this rank's columns."""
        hidden = self.model.compute_hidden(ids[None], positions[None], meta)[0]
        hidden = hidden if last_rows is None else hidden[last_rows]
        return self.model.compute_logits(hidden) if gather else self.model.compute_logits(hidden, gather=False)

    def _decode_forward(self, ids: torch.Tensor, positions: torch.Tensor,
                        meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and their argmax (inside the CUDA graph, so a greedy step launches nothing more).

        Under tensor parallelism the logits are this rank's vocabulary columns alone, and the argmax is
        one all-reduce (max) of a key per row (``sampler.argmax_keys``) instead of an all-gather of the
        whole vocabulary (16 MB of float32 at batch 64 for Llama-3 on two ranks); a step that needs the
        whole logits gathers them afterwards (:meth:`run_decode`)."""
        if self.split_head is None:
            logits = self._forward(ids, positions, meta)
            return logits, greedy_tokens(logits)
        shard = self._forward(ids, positions, meta, gather=False)
        keys = argmax_keys(shard, self.split_head.shard_columns()[0])
        return shard, key_tokens(self.split_head.tp_group.all_reduce(keys, "max"))

    def run_decode(self, staged: StagedDecode, tokens: torch.Tensor | None,
                   whole_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A staged decode step's ``(logits, greedy ids)``; ``whole_logits=False`` (every rank alike): a
        vocabulary-parallel model's logits stay this rank's columns (only the greedy ids are used)."""
        logits, greedy = self.graphs.run_staged(staged, tokens)
        if whole_logits and self.split_head is not None:
            logits = self.split_head.gather(logits)
        return logits, greedy

    def prefill_from_array(self, array: np.ndarray, n: int, b: int, max_query_len: int) -> torch.Tensor:
        """Logits at each sequence's last token of the prefill ``prefill_array`` packed."""
        packed = self.staging.to_device(array)
        meta = AttentionMetadata(slot_mapping=packed[2 * n:3 * n], block_tables=packed[3 * n + 2 * b + 1:].view(b, -1),
                                 seq_lens=packed[3 * n + b + 1:3 * n + 2 * b + 1],
                                 query_start_loc=packed[3 * n:3 * n + b + 1], max_query_len=max_query_len)
        if self.prefill_graphs is not None:  # ids, positions and slots lie back to back
            tokens = packed[:3 * n].view(3, n)
            logits = self.prefill_graphs.run(tokens, meta)
            if logits is None:
                logits = self.prefill_graphs.run_in_parts(tokens, meta, array[3 * n:3 * n + b + 1])
            if logits is not None:
                return logits
        return self._forward(packed[:n], packed[n:2 * n], meta, meta.query_start_loc[1:].long() - 1)

    def _scope(self, kind: str, ints: tuple, array: np.ndarray) -> ContextManager:
        return self.step_scope(kind, ints, array) if self.step_scope is not None else contextlib.nullcontext()

    def _stage(self, seqs: list[Sequence], is_prefill: bool, carried: PendingStep | None, share: int
               ) -> tuple[str, tuple, np.ndarray, Callable[[], tuple[torch.Tensor, torch.Tensor | None]]]:
        """``(kind, ints, array, run)``: the step packed as the workers receive it, and rank 0's part of it.
        ``ints`` end with ``share`` (how the workers learn the sampled ids: ``SHARE_*``)."""
        if is_prefill:
            array, n, b, max_query_len = prefill_array(seqs, self.block_size)
            return "prefill", (n, b, max_query_len, int(share)), array, \
                lambda: (self.prefill_from_array(array, n, b, max_query_len), None)
        rows = None
        if carried is not None:
            row_of = {id(s): i for i, s in enumerate(carried.seqs)}
            pairs = [(row_of[id(s)], dst) for dst, s in enumerate(seqs) if id(s) in row_of]
            rows = tuple(np.array(v, np.int32) for v in zip(*pairs)) if pairs else None
        staged = self.graphs.stage(decode_arrays(seqs, self.block_size), block_table_array(seqs), rows)
        tokens = carried.tokens if rows is not None else None
        return "decode", (*staged.header, int(share)), staged.array, \
            lambda: self.run_decode(staged, tokens, share != SHARE_GREEDY)

    @torch.inference_mode()
    def step_logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Logits ``[len(seqs), vocab]`` at each sequence's last token, after caching its new tokens."""
        kind, ints, array, run = self._stage(seqs, is_prefill, None, False)
        with self._scope(kind, ints, array):
            return run()[0]

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], is_prefill: bool, carried: PendingStep | None = None) -> PendingStep:
        """Queue one step and return without waiting for it. ``carried``: a decode step's sequences that
        were in ``carried`` take their input ids from its device-side tokens (their last host token
        is a placeholder then)."""
        params = SamplingTensors.from_sequences(seqs, self.device)
        share = SHARE_NONE if self.share_tokens is None else \
            SHARE_GREEDY if params.all_greedy and params.presence is None and params.num_logprobs is None \
            else SHARE_BROADCAST
        kind, ints, array, run = self._stage(seqs, is_prefill, carried, share)
        with self._scope(kind, ints, array):
            logits, greedy = run()
            sampled = sample(logits, params, greedy)
            if share == SHARE_BROADCAST:
                self.share_tokens(sampled.tokens)
        if self.device.type != "cuda":
            return PendingStep(seqs, sampled)
        packed = sampled.packed()
        host = self._host_buffer(packed)
        host[: len(seqs)].copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingStep(seqs, sampled, host, event, self.wait_step)

    def _host_buffer(self, packed: torch.Tensor) -> torch.Tensor:
        """Pinned room for ``packed``: for plain ids one of two buffers used in turn (see Staging); for
        ids with logprobs (rarer, and of any width) a new one from torch's pinned-memory cache."""
        if packed.dim() != 1:
            return torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        if not self._token_buffers or self._token_buffers[0].numel() < len(packed):
            size = max(len(packed), 256)
            self._token_buffers = [torch.empty(size, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        host = self._token_buffers[self._token_turn]
        self._token_turn ^= 1
        return host
