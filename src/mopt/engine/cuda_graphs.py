"""Decode steps over static input buffers, replayed as one CUDA graph per batch-size bucket.

A decode batch of ``B`` sequences is padded to the smallest bucket ``>= B`` (1, 2, 4, 8, then
steps of 16 up to ``max_num_seqs``). Padding rows have slot -1 (nothing is written to the cache)
and sequence length 0 (attention returns zeros for them); their logits are discarded. Every bucket's
graph is captured at start-up into one memory pool, largest first, after an eager warm-up run
(Triton compiles its kernels outside the capture). Without capture (CPUs, ``enforce_eager``) the
same buffers and padding run eagerly, so the bucket logic is the same everywhere.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

import numpy as np
import torch

from mopt.engine.distributed import TensorParallelError
from mopt.engine.staging import Staging
from mopt.layers.attention import AttentionMetadata

_IDS, _POSITIONS, _SLOTS, _SEQ_LENS = range(4)
T = TypeVar("T")


@dataclass(frozen=True)
class StagedDecode:
    """One decode step's inputs in the int32 layout ``run_staged`` copies to the static buffers: ids,
    positions, slots and sequence lengths of ``bucket`` rows (``batch`` real ones), the ``bucket x
    width`` block tables, then (async scheduling) the ``carried`` source and destination rows of input
    ids taken from the step before's device-side tokens. Tensor parallelism broadcasts it as it is."""

    array: np.ndarray
    batch: int
    bucket: int
    width: int
    carried: int = 0

    @property
    def header(self) -> tuple[int, int, int, int]:
        return self.batch, self.bucket, self.width, self.carried


def graph_blockers(model: torch.nn.Module) -> list[str]:
    """Why a CUDA graph cannot hold ``model``'s decode step: one line per layer whose kernel says it cannot
    be captured (``capturable() -> (ok, reason)``; e.g. the reference expert loop of the MoE formats
    that have no fused kernel yet). Empty: capture."""
    blockers = []
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "kernel", None)
        ok, why = kernel.capturable() if hasattr(kernel, "capturable") else (True, "")
        if not ok:
            blockers.append(f"{name}: {kernel.name} kernel {why}")
    return blockers


class CaptureSync(Protocol):
    """How one rank of a tensor-parallel world captures its graphs in step with the others.

    Every rank captures the same graphs in the same order, and the eager warm-up before each capture runs
    the model's collectives. ``wait(event)`` waits for a warm-up by polling, so a rank whose peer failed
    raises the peer's error instead of blocking on a collective that never completes; ``agree(ok)`` tells
    whether every rank captured a graph (an all-ranks AND), so that all keep it or all drop it."""

    rank: int

    def wait(self, event: torch.cuda.Event) -> None: ...

    def agree(self, ok: bool) -> bool: ...


class GraphCaptureError(RuntimeError):
    """A decode step's CUDA graph could not be captured (out of memory, a kernel that cannot be captured)."""


class WarmUpFailed(RuntimeError):
    """The eager run before a capture failed. Under tensor parallelism the other ranks ran (or wait in)
    that run's collectives, which this rank left midway: the ranks are out of step for good."""


def first_line(e: BaseException) -> str:
    """An error's first line (CUDA's out-of-memory messages run on), or its type where it has no text."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def wait_for_device(device: torch.device, wait: Callable[[torch.cuda.Event], None] | None = None) -> None:
    """Wait until the work queued on ``device`` so far is done: through ``wait(event)`` first where given
    (``CaptureSync.wait``, which polls, so that a peer's failure reaches this rank), then synchronize."""
    if wait is not None:
        event = torch.cuda.Event()
        event.record()
        wait(event)
    torch.cuda.synchronize(device)


def capture_graph(run: Callable[[], T], device: torch.device, pool=None,
                  wait: Callable[[torch.cuda.Event], None] | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """``run()`` once eagerly (Triton compiles its kernels outside the capture; a failure there raises
    ``WarmUpFailed``), then captured as a graph into ``pool`` (shared by a family of graphs, captured
    largest first); its output is the graph's. ``wait(event)`` waits for the warm-up
    (``CaptureSync.wait``) instead of a blocking synchronize."""
    try:
        run()
    except TensorParallelError:  # another rank failed: not this run's own failure
        raise
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        raise WarmUpFailed(first_line(e)) from e
    wait_for_device(device, wait)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """``run(arrays, tables) -> (logits [B, vocab], greedy ids [B])`` for one decode step.

    ``forward(ids [N], positions [N], meta) -> (float32 logits [N, vocab], argmax [N])`` is the model step.
    """

    def __init__(self, forward: Callable, device: torch.device, max_num_seqs: int, max_blocks_per_seq: int,
                 capture: bool, pad: bool | None = None, progress: bool = False,
                 wait: Callable[[torch.cuda.Event], None] | None = None) -> None:
        self.forward, self.device, self.wait = forward, device, wait
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.pad = capture if pad is None else pad
        self.vectors = torch.zeros((4, max_num_seqs), dtype=torch.int32, device=device)
        self.tables = torch.zeros((max_num_seqs, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)
        self.staging = Staging(device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if capture:
            self._capture_all(progress)

    def bucket(self, batch: int) -> int:
        if not self.pad:
            return batch
        i = bisect.bisect_left(self.sizes, batch)
        if i == len(self.sizes):
            raise ValueError(f"decode batch of {batch} sequences exceeds max_num_seqs {self.sizes[-1]}")
        return self.sizes[i]

    def _meta(self, bs: int, width: int | None = None) -> AttentionMetadata:
        """Metadata over the static buffers; a graph sees every block-table column, an eager step only the
        ``width`` in use (the reference attention reads every column it is given)."""
        return AttentionMetadata(slot_mapping=self.vectors[_SLOTS, :bs], block_tables=self.tables[:bs, :width],
                                 seq_lens=self.vectors[_SEQ_LENS, :bs], query_start_loc=self.query_start_loc[:bs + 1],
                                 max_query_len=1)

    def _run_eager(self, bs: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(self.vectors[_IDS, :bs], self.vectors[_POSITIONS, :bs], self._meta(bs, width))

    def _capture_all(self, progress: bool) -> None:
        self.vectors[_SLOTS].fill_(-1)  # warm-up and capture runs write nothing and read nothing
        self.vectors[_SEQ_LENS].zero_()
        with torch.inference_mode():
            self._capture_each(progress)
        torch.cuda.synchronize(self.device)

    def _capture_each(self, progress: bool) -> None:
        from tqdm.auto import tqdm

        pool = None
        for bs in tqdm(sorted(self.sizes, reverse=True), desc="capturing CUDA graphs", unit="graph",
                       disable=not progress):
            try:
                self.graphs[bs], self.outputs[bs] = capture_graph(lambda: self._run_eager(bs), self.device, pool,
                                                                  self.wait)
            except TensorParallelError:  # another rank failed: its error, not this capture's
                raise
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                raise GraphCaptureError(f"capturing the decode CUDA graph of {bs} sequences failed ({first_line(e)}); "
                                        "start with --enforce-eager (enforce_eager=True) to decode without CUDA "
                                        "graphs, or with a smaller --max-num-seqs") from e
            pool = self.graphs[bs].pool()

    def run(self, arrays: dict[str, np.ndarray], tables: np.ndarray,
            carry: tuple[torch.Tensor, np.ndarray, np.ndarray] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step. ``carry = (tokens, src, dst)``: rows ``dst`` take their input ids from
        ``tokens[src]``, the device-side output of a step whose tokens the host has not read yet."""
        staged = self.stage(arrays, tables, None if carry is None else (carry[1], carry[2]))
        return self.run_staged(staged, None if carry is None else carry[0])

    def stage(self, arrays: dict[str, np.ndarray], tables: np.ndarray,
              rows: tuple[np.ndarray, np.ndarray] | None = None) -> StagedDecode:
        """The step's inputs packed as ``run_staged`` reads them (``rows``: carry's ``(src, dst)``)."""
        batch, width = tables.shape
        bs = self.bucket(batch)
        carried = 0 if rows is None else len(rows[0])
        staging = np.zeros(4 * bs + bs * width + 2 * carried, np.int32)
        vectors = staging[: 4 * bs].reshape(4, bs)
        vectors[_IDS, :batch], vectors[_POSITIONS, :batch] = arrays["ids"], arrays["positions"]
        vectors[_SLOTS, :batch], vectors[_SEQ_LENS, :batch] = arrays["slots"], arrays["seq_lens"]
        vectors[_SLOTS, batch:] = -1
        tail = 4 * bs + bs * width
        staging[tail - bs * width:tail].reshape(bs, width)[:batch] = tables
        if carried:
            staging[tail:tail + carried], staging[tail + carried:] = rows
        return StagedDecode(staging, batch, bs, width, carried)

    def run_staged(self, staged: StagedDecode, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and greedy ids of the ``batch`` real rows of a staged step; carried rows take their input
        ids from ``tokens`` (the device-side tokens of the step before)."""
        batch, bs, width, carried = staged.batch, staged.bucket, staged.width, staged.carried
        tail = 4 * bs + bs * width
        device_staging = self.staging.to_device(staged.array)
        self.vectors[:, :bs].copy_(device_staging[: 4 * bs].view(4, bs))
        self.tables[:bs, :width].copy_(device_staging[4 * bs:tail].view(bs, width))
        if carried:
            src, dst = staged.array[tail:tail + carried], staged.array[tail + carried:]
            if carried == batch and np.array_equal(src, dst) and np.array_equal(dst, np.arange(batch)):
                self.vectors[_IDS, :batch].copy_(tokens[:batch])
            else:
                rows = device_staging[tail:].long()
                self.vectors[_IDS].index_copy_(0, rows[carried:], tokens.index_select(0, rows[:carried]).int())
        if bs in self.graphs:
            self.graphs[bs].replay()
            logits, greedy = self.outputs[bs]
        else:
            logits, greedy = self._run_eager(bs, width)
        return logits[:batch], greedy[:batch]
