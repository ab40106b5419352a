"""Short prefill steps over static input buffers, replayed as one CUDA graph per token-count bucket.

A prefill of a few prompts is host-bound when it runs eagerly: on a 2x H200 host a Llama-3-8B prefill of
16 to 1024 tokens took 24-37 ms at TP=1 (28-64 at TP=2, whose ranks meet at every all-reduce) for 7-10
ms of kernels, the rest being Python, Triton launches and cuBLAS calls
(``bench/results/prefill-latency-h200x2-2026-11-27-*``). A graph replays the kernels with no host work:
one FP8 prompt of 16 or 128 tokens then takes 4.1 or 4.5 ms on an H200 (34 and 41 ms eagerly, same host;
``bench/results/prefill-graphs-h200x2-2026-11-27-*``).

A prefill of ``n`` tokens of ``b`` sequences (``n <= 2048``, ``b <= MAX_SEQS``) is padded to the smallest
token bucket ``T >= n`` (16, 32, ..., 2048) and to ``MAX_SEQS`` sequences. Padding tokens belong to no
sequence and have slot -1 (nothing is written to the cache); padding sequences have no tokens and length
0, so attention skips them; every later operation works row by row, so padding rows never reach a real
row, and their logits are not taken. Attention's grid covers ``T`` queries for each of ``MAX_SEQS``
sequences, the most a bucket can hold. The step's metadata, block tables and last-token rows are device
buffers, so one graph serves any mix of prompt lengths in its bucket. Longer or wider prefills run eagerly.

Mixture-of-experts layers route padding tokens like any other (token 0 at position 0): their (token,
expert) pairs share GEMM tiles with real ones, whose rows they do not touch, and their outputs are dropped.
The routing kernels are sized for the most pairs a bucket can hold, as at decode. The cost is the padding
rows' expert work, which all lands on the same few experts.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable

import torch

from mopt.engine.cuda_graphs import capture_graph
from mopt.layers.attention import AttentionMetadata

# Up to 2048 tokens, the scheduler's default step budget: an eager prefill of 8 x 128 or 1 x 512 tokens
# spent 24 ms at TP=1 and 55-62 ms at TP=2 on the host, for a few ms of kernels.
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
MAX_SEQS = 16
_IDS, _POSITIONS, _SLOTS = range(3)

logger = logging.getLogger(__name__)


class PrefillGraphs:
    """``run(tokens, meta) -> logits [b, vocab]`` for a prefill of ``b`` sequences, or None where no graph
    takes it.

    ``forward(ids [N], positions [N], meta, last_rows [B]) -> float32 logits [B, vocab]`` is the model step."""

    def __init__(self, forward: Callable, device: torch.device, max_num_seqs: int, max_model_len: int,
                 max_blocks_per_seq: int, capture: bool = True, progress: bool = False) -> None:
        self.forward, self.device, self.max_model_len = forward, device, max_model_len
        self.seqs = min(MAX_SEQS, max_num_seqs)
        # No larger bucket than the most tokens ``seqs`` sequences of ``max_model_len`` can bring.
        most = self.seqs * max_model_len
        self.sizes = [t for i, t in enumerate(TOKEN_BUCKETS) if i == 0 or TOKEN_BUCKETS[i - 1] < most]
        top = self.sizes[-1]
        self.tokens = torch.zeros((3, top), dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(self.seqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(self.seqs, dtype=torch.int32, device=device)
        self.last_rows = torch.zeros(self.seqs, dtype=torch.int64, device=device)
        self.tables = torch.zeros((self.seqs, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        if capture:  # else (tests on CPUs) the same padded buffers run eagerly
            self._capture_all(progress)

    def bucket(self, n: int, b: int) -> int | None:
        """The token bucket of a prefill of ``n`` tokens of ``b`` sequences, or None (it runs eagerly)."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) and 1 <= b <= self.seqs else None

    def _run_eager(self, t: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self.tokens[_SLOTS, :t], block_tables=self.tables,
                                 seq_lens=self.seq_lens, query_start_loc=self.query_start_loc, max_query_len=t)
        return self.forward(self.tokens[_IDS, :t], self.tokens[_POSITIONS, :t], meta, self.last_rows)

    def _capture_all(self, progress: bool) -> None:
        from tqdm.auto import tqdm

        pool, start = None, time.perf_counter()
        with torch.inference_mode():
            for t in tqdm(sorted(self.sizes, reverse=True), desc="capturing prefill graphs", unit="graph",
                          disable=not progress):
                # One sequence (at most max_model_len tokens, what its block table spans) that writes
                # nothing (slots -1) and reads block 0's pages; the other tokens pad.
                length = min(t, self.max_model_len)
                self.tokens.zero_()
                self.tokens[_SLOTS].fill_(-1)
                self.query_start_loc.fill_(length)
                self.query_start_loc[0] = 0
                self.seq_lens.zero_()
                self.seq_lens[0] = length
                self.last_rows.zero_()
                self.last_rows[0] = length - 1
                self.graphs[t], self.outputs[t] = capture_graph(lambda: self._run_eager(t), self.device, pool)
                pool = self.graphs[t].pool()
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d prefill graphs (%d to %d tokens, up to %d prompts) in %.1f s", len(self.graphs),
                    self.sizes[0], self.sizes[-1], self.seqs, self.capture_seconds)

    def run(self, tokens: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """``tokens [3, n]``: the prefill's ids, positions and slots; ``meta``: its sequences' metadata (as an
        eager step takes it). Logits at each sequence's last token, or None where no graph takes the step."""
        n, b = tokens.shape[1], meta.seq_lens.shape[0]
        t = self.bucket(n, b)
        if t is None:
            return None
        self.tokens[:, :n].copy_(tokens)
        self.tokens[_SLOTS, n:t].fill_(-1)
        self.query_start_loc[: b + 1].copy_(meta.query_start_loc)
        self.query_start_loc[b + 1:].fill_(n)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.seq_lens[b:].zero_()
        self.last_rows[:b].copy_(meta.query_start_loc[1:])
        self.last_rows[:b] -= 1
        self.last_rows[b:].zero_()  # a larger step's rows would index past this bucket's hidden rows
        self.tables[:b, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if t in self.graphs:
            self.graphs[t].replay()
            logits = self.outputs[t]
        else:
            logits = self._run_eager(t)
        return logits[:b].clone()  # the graph's output is rewritten by its next replay
