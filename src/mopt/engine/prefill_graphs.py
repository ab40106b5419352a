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
buffers, so one graph serves any mix of prompt lengths in its bucket.

A wider or longer prefill whose prompts each fit the largest bucket is cut into runs of consecutive prompts
that each fit one graph (``plan``), replayed one after another: a prompt's tokens attend only to its own, so
the logits are those of the whole step run at once. Only up to two largest buckets of padded tokens (4096):
past that, an eager step's host work hides behind its kernels and eager pads nothing. FP8 Llama-3-8B at TP=2
on 2x H200, one prefill step (``bench/prefill_latency.py``; ``bench/results/serve-prefill-runs-h200x2-2026-11-27.txt``):
17 x 128 tokens 40.2 ms eagerly, 26.5 in runs; 64 x 16: 49.3 and 26.2; 35 x 128: 52.5 and 51.8; 64 x 128: 75.8
and 85.6 (so eager). What no graph takes (a prompt longer than 2048 tokens, a wide step past 4096 tokens, a
failed bucket) runs eagerly; start-up runs the eager path once (:meth:`PrefillGraphs.warm_eager`), so that
Triton compiles its kernels before the first request rather than inside it.

Mixture-of-experts layers route padding tokens like any other (token 0 at position 0): their (token,
expert) pairs share GEMM tiles with real ones, whose rows they do not touch, and their outputs are dropped.
The routing kernels are sized for the most pairs a bucket can hold, as at decode. The cost is the padding
rows' expert work, which all lands on the same few experts.

A bucket whose capture fails (out of memory, a kernel that cannot be captured) is left out, and the
prefills it would take run eagerly; the other buckets keep their graphs. Under tensor parallelism every
rank must replay the same graphs, so the ranks agree after each bucket (``CaptureSync``) and all leave
out a bucket that failed on any of them. That holds for the capture itself, which runs no collective;
a rank whose eager warm-up before it fails has left the others inside that run's collectives, so it
raises ``TensorParallelError`` at once, which ends the world with an error naming the rank.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from typing import Callable

import numpy as np
import torch

from mopt.engine.cuda_graphs import CaptureSync, WarmUpFailed, capture_graph, first_line, wait_for_device
from mopt.engine.distributed import TensorParallelError
from mopt.layers.attention import AttentionMetadata

# Up to 2048 tokens, the scheduler's default step budget: an eager prefill of 8 x 128 or 1 x 512 tokens
# spent 24 ms at TP=1 and 55-62 ms at TP=2 on the host, for a few ms of kernels.
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
MAX_SEQS = 16
_IDS, _POSITIONS, _SLOTS = range(3)
# Tests: ``RANK:TOKENS[:warm-up]`` (comma-separated): the capture of that bucket on that rank, or with
# ``:warm-up`` the eager run before it, fails on purpose, as an out-of-memory would.
FAULT_ENV = "MOPT_TEST_FAIL_PREFILL_GRAPH"

logger = logging.getLogger(__name__)


class PrefillGraphs:
    """``run(tokens, meta) -> logits [b, vocab]`` for a prefill of ``b`` sequences, or None where no graph
    takes it.

    ``forward(ids [N], positions [N], meta, last_rows [B]) -> float32 logits [B, vocab]`` is the model step."""

    def __init__(self, forward: Callable, device: torch.device, max_num_seqs: int, max_model_len: int,
                 max_blocks_per_seq: int, capture: bool = True, progress: bool = False,
                 sync: CaptureSync | None = None) -> None:
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
        self.captured = capture  # else (tests on CPUs) the same padded buffers run eagerly
        self.failed: dict[int, str] = {}  # bucket -> why it has no graph
        if capture:
            self._capture_all(progress, sync)

    def bucket(self, n: int, b: int) -> int | None:
        """The token bucket of a prefill of ``n`` tokens of ``b`` sequences, or None (it runs eagerly)."""
        i = bisect.bisect_left(self.sizes, n)
        if i == len(self.sizes) or not 1 <= b <= self.seqs or self.sizes[i] in self.failed:
            return None
        return self.sizes[i]

    def plan(self, starts: np.ndarray) -> list[tuple[int, int]] | None:
        """For a prefill no single graph takes, given its sequences' query starts ``starts [b + 1]`` (on the
        host): ``[(first, end), ...]``, runs of consecutive sequences that each fit a graph, filled in order
        up to ``MAX_SEQS`` sequences and the largest bucket's tokens; None where a sequence alone fits no
        graph, a run's bucket failed to capture, or the runs pad to more than two largest buckets (see the
        module's text)."""
        lengths = np.diff(np.asarray(starts, dtype=np.int64))
        top, runs, first, tokens = self.sizes[-1], [], 0, 0
        for i, q in enumerate(lengths.tolist()):
            if q > top:
                return None
            if i > first and (i - first == self.seqs or tokens + q > top):
                runs.append((first, i))
                first, tokens = i, 0
            tokens += q
        runs.append((first, len(lengths)))
        padded = 0
        for first, end in runs:
            t = self.bucket(int(lengths[first:end].sum()), end - first)
            if t is None:
                return None
            padded += t
        return runs if padded <= 2 * top else None

    def run_in_parts(self, tokens: torch.Tensor, meta: AttentionMetadata, starts: np.ndarray) -> torch.Tensor | None:
        """``run`` for a prefill too wide or too long for one graph: its :meth:`plan`'s runs one after another
        (``starts``: ``meta.query_start_loc`` on the host). Logits at each sequence's last token, or None
        where the plan is None."""
        runs = self.plan(starts)
        if runs is None:
            return None
        parts = []
        for first, end in runs:
            t0, t1 = int(starts[first]), int(starts[end])
            part = AttentionMetadata(slot_mapping=meta.slot_mapping[t0:t1], block_tables=meta.block_tables[first:end],
                                     seq_lens=meta.seq_lens[first:end],
                                     query_start_loc=meta.query_start_loc[first:end + 1] - t0,
                                     max_query_len=int(np.diff(starts[first:end + 1]).max()))
            parts.append(self.run(tokens[:, t0:t1], part))
        return torch.cat(parts)

    def warm_eager(self, max_num_seqs: int, sync: CaptureSync | None = None) -> None:
        """Run the eager path as the widest step (``max_num_seqs`` prompts past two largest buckets of tokens),
        one just wider than a graph (``MAX_SEQS + 1`` prompts) and the longest one (a prompt past the largest
        bucket) would, writing nothing (slots -1), logits and greedy ids included: Triton compiles those kernels
        now, not in the first such request. The logits GEMV's variant depends on its row count (its tile: 16, 32
        or 64 rows; and whether the count is 1, a multiple of 16 or neither): decode graphs run 1, 2, 4, 8 and
        multiples of 16 rows, so 17 to 31 rows would be new, hence the middle width. A failure
        under tensor parallelism ends the world (the others wait in its collectives); alone it is a warning."""
        from mopt.engine.sampler import greedy_tokens

        top = self.sizes[-1]
        widths = sorted({max_num_seqs, min(max_num_seqs, MAX_SEQS + 1)}, reverse=True)
        shapes = [(b, -(-(2 * top + 1) // b)) for b in widths] + [(1, top + 1)]
        try:
            with torch.inference_mode():
                for b, length in shapes:
                    length = min(length, self.max_model_len)
                    n = b * length
                    positions = torch.arange(length, dtype=torch.int32, device=self.device).repeat(b)
                    starts = torch.arange(0, n + 1, length, dtype=torch.int32, device=self.device)
                    tables = torch.zeros((b, self.tables.shape[1]), dtype=torch.int32, device=self.device)
                    meta = AttentionMetadata(slot_mapping=torch.full((n,), -1, dtype=torch.int32, device=self.device),
                                             block_tables=tables,
                                             seq_lens=torch.full((b,), length, dtype=torch.int32, device=self.device),
                                             query_start_loc=starts, max_query_len=length)
                    greedy_tokens(self.forward(torch.zeros_like(positions), positions, meta, starts[1:].long() - 1))
                if self.device.type == "cuda":
                    wait_for_device(self.device, sync.wait if sync is not None else None)
        except TensorParallelError:
            raise
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if sync is not None:
                raise TensorParallelError(f"rank {sync.rank}: the eager prefill run at start-up failed ({first_line(e)}); "
                                          "the other ranks wait inside its collectives, so every rank stops") from e
            logger.warning("the eager prefill run at start-up failed (%s); wide or long prefills may compile "
                           "kernels on first use, or fail the same way", first_line(e))

    def _run_eager(self, t: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self.tokens[_SLOTS, :t], block_tables=self.tables,
                                 seq_lens=self.seq_lens, query_start_loc=self.query_start_loc, max_query_len=t)
        return self.forward(self.tokens[_IDS, :t], self.tokens[_POSITIONS, :t], meta, self.last_rows)

    def _capture_all(self, progress: bool, sync: CaptureSync | None) -> None:
        from tqdm.auto import tqdm

        faults = injected_faults(sync.rank if sync is not None else 0)
        pool, start = None, time.perf_counter()
        with torch.inference_mode():
            for t in tqdm(sorted(self.sizes, reverse=True), desc="capturing prefill graphs", unit="graph",
                          disable=not progress):
                graph = error = None
                try:
                    graph, out = self._capture(t, pool, sync, faults.get(t))
                except TensorParallelError:  # a rank failed: the world is over, not this bucket
                    raise
                except WarmUpFailed as e:
                    if sync is not None:
                        raise TensorParallelError(f"rank {sync.rank}: the eager run before capturing the {t}-token "
                                                  f"prefill graph failed ({e}); the other ranks wait inside its "
                                                  "collectives, so every rank stops") from e
                    error = f"this rank's eager run: {e}"
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # out of memory, a kernel that syncs
                    error = f"this rank: {first_line(e)}"
                if sync is not None and not sync.agree(error is None) and error is None:
                    error = "another rank failed it"
                if error is not None:
                    self.failed[t] = error
                    continue
                self.graphs[t], self.outputs[t] = graph, out
                pool = graph.pool()
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        if self.failed:
            logger.warning("prefills of the %s-token buckets run eagerly: capturing their CUDA graphs failed (%s)",
                           ", ".join(map(str, sorted(self.failed))),
                           "; ".join(f"{t}: {why}" for t, why in sorted(self.failed.items())))
        logger.info("captured %d prefill graphs (%d to %d tokens, up to %d prompts) in %.1f s", len(self.graphs),
                    self.sizes[0], self.sizes[-1], self.seqs, self.capture_seconds)

    def _capture(self, t: int, pool, sync: CaptureSync | None,
                 fault: str | None = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # One sequence (at most max_model_len tokens, what its block table spans) that writes nothing
        # (slots -1) and reads block 0's pages; the other tokens pad.
        length = min(t, self.max_model_len)
        self.tokens.zero_()
        self.tokens[_SLOTS].fill_(-1)
        self.query_start_loc.fill_(length)
        self.query_start_loc[0] = 0
        self.seq_lens.zero_()
        self.seq_lens[0] = length
        self.last_rows.zero_()
        self.last_rows[0] = length - 1
        runs = []

        def run() -> torch.Tensor:
            runs.append(None)
            if fault == ("warm-up" if len(runs) == 1 else "capture"):
                raise RuntimeError(f"{FAULT_ENV} failed the {fault} on purpose")
            return self._run_eager(t)

        return capture_graph(run, self.device, pool, sync.wait if sync is not None else None)

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


def injected_faults(rank: int) -> dict[int, str]:
    """``{tokens: "capture" or "warm-up"}``: what ``FAULT_ENV`` fails on purpose on ``rank`` (tests)."""
    value, faults = os.environ.get(FAULT_ENV, ""), {}
    for item in filter(None, value.split(",")):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[:2]) or parts[2:] not in ([], ["warm-up"]):
            raise ValueError(f"{FAULT_ENV} must be RANK:TOKENS or RANK:TOKENS:warm-up items separated by commas, "
                             f"got {value!r}")
        if int(parts[0]) == rank:
            faults[int(parts[1])] = parts[2] if len(parts) == 3 else "capture"
    return faults
