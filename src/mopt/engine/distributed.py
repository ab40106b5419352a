"""Tensor-parallel state that layers read when they are built, and the collectives they call.

A model is built once per rank inside :func:`parallel_state`; each parallel layer reads
:func:`current_parallel_state` in its constructor to learn its rank, the number of ranks and the
process group its all-reduces and all-gathers run on. The default state (rank 0 of 1, no group)
builds the unsharded model, so single-process code never sees any of this.

Split rules are checked where a layer is built, before any weight is read: a size that does not
divide over the ranks, or whose per-rank part breaks its format's block or kernel alignment, raises
:class:`TensorParallelSplitError` naming the layer, the sizes and the tensor-parallel size. ``mopt
inspect`` builds the model on the meta device in *collect* mode instead, where every problem is
recorded and construction goes on, to list them all at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mopt.errors import MoptError


class TensorParallelSplitError(MoptError):
    """A layer that cannot be split over the tensor-parallel ranks; the message names the layer,
    its sizes and the tensor-parallel size."""


class TensorParallelError(RuntimeError):
    """A tensor-parallel run failed: a rank died, did not join, or stopped responding. The message
    names the rank."""


@dataclass
class ParallelState:
    """Where the model being built runs: ``tp_rank`` of ``tp_size`` ranks, collectives on ``group``
    (None: no process group; layers then compute their own shard only, as tests of single layers
    do). ``expert_parallel``: mixture-of-experts layers divide whole experts among the ranks instead
    of splitting every expert's intermediate dimension. ``problems``: collect mode (see module doc)."""

    tp_rank: int = 0
    tp_size: int = 1
    group: object | None = None
    expert_parallel: bool = False
    problems: list[str] | None = field(default=None, repr=False)


_STATE: list[ParallelState] = [ParallelState()]


def current_parallel_state() -> ParallelState:
    return _STATE[-1]


@contextlib.contextmanager
def parallel_state(state: ParallelState) -> Iterator[ParallelState]:
    """Build models inside this block to build ``state``'s shard."""
    if not 0 <= state.tp_rank < state.tp_size:
        raise ValueError(f"tp_rank {state.tp_rank} out of range for tp_size {state.tp_size}")
    _STATE.append(state)
    try:
        yield state
    finally:
        _STATE.pop()


def split_problem(message: str) -> None:
    """Raise :class:`TensorParallelSplitError`, or record it in collect mode."""
    problems = current_parallel_state().problems
    if problems is None:
        raise TensorParallelSplitError(message)
    problems.append(message)


def divide(total: int, parts: int, what: str, multiple: int = 1, why: str = "") -> int:
    """``total / parts`` when it is whole and a multiple of ``multiple``; else a split problem naming
    ``what`` (the layer and the size) and, in collect mode, the rounded-up share so building goes on."""
    if parts == 1:
        return total  # nothing is split: a format's blocks are whole, partial edge blocks included
    share = -(-total // parts)
    if total % parts:
        split_problem(f"{what} ({total}) is not divisible by the tensor-parallel size {parts}")
    elif share % multiple:
        split_problem(f"{what} ({total}) splits into {share} per rank over tensor_parallel_size {parts}; "
                      f"each rank needs a multiple of {multiple}" + (f" ({why})" if why else ""))
    return -(-share // multiple) * multiple


def group_for(tp_size: int) -> object | None:
    """The process group of the current state when a layer of ``tp_size`` ranks belongs to it."""
    state = current_parallel_state()
    return state.group if tp_size > 1 and state.tp_size == tp_size else None


class Group:
    """A process group of mopt's own: a torch.distributed backend (``ProcessGroupNCCL`` on GPUs,
    ``ProcessGroupGloo`` on CPUs and for control messages) over the world's rendezvous store.

    It is deliberately not torch.distributed's default group: other code in rank 0's process that uses
    torch.distributed (ModelOpt's calibration syncs amaxes over the default group when one exists; a
    user's own data parallelism) neither sees nor joins mopt's ranks. Collectives are the backends' own,
    so NCCL ones are stream-ordered and capturable in CUDA graphs like ``torch.distributed.all_reduce``.
    """

    def __init__(self, backend, rank: int, size: int, name: str) -> None:
        self.backend, self.rank, self.size, self.name = backend, rank, size, name
        self.one_shot = None  # mopt.engine.one_shot.OneShotAllReduce: small sums on one node's GPUs

    def _done(self, work, async_op: bool):
        if async_op:
            return work
        work.wait()  # NCCL: the current stream waits; gloo: the host waits
        return None

    def all_reduce(self, x: torch.Tensor, op: str = "sum", async_op: bool = False):
        """The sum (max, min) of ``x`` over the ranks: ``x`` itself, reduced in place, or, for a small
        sum on one node's GPUs (see :mod:`mopt.engine.one_shot`), a new tensor. ``async_op``: the work."""
        import torch.distributed as dist

        if op == "sum" and not async_op and self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot(x)
        opts = dist.AllreduceOptions()
        opts.reduceOp = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        work = self._done(self.backend.allreduce([x], opts), async_op)
        return work if async_op else x

    def fused_rms_norm(self, x: torch.Tensor):
        """The all-reduce fused with the residual add and RMSNorm (``mopt.engine.one_shot.OneShotRMSNorm``)
        that takes the partial sums ``x``, or None where they take :meth:`all_reduce` and a separate norm.
        It depends on ``x``'s shape and dtype alone, so every rank decides alike."""
        norm = self.partial_sums_norm()
        return norm if norm is not None and norm.fits(x) else None

    def per_token_fp8(self, x2: torch.Tensor):
        """``(e4m3 codes, scale [M, 1])`` of this rank's slice ``x2 [M, K]`` of each row under the whole row's
        amax, in one kernel over peer memory (``OneShotRMSNorm.per_token_fp8``), or None where a MAX all-reduce
        must do it. It depends on ``x2``'s shape and dtype alone, so every rank decides alike."""
        norm = self.partial_sums_norm()
        return norm.per_token_fp8(x2) if norm is not None else None

    def partial_sums_norm(self):
        """The fused all-reduce + RMSNorm that the next norm uses where it fits (``OneShotRMSNorm``: a
        kernel computing the partial sums may send them to the peers for it), or None."""
        return self.one_shot.norm if self.one_shot is not None else None

    def broadcast(self, x: torch.Tensor, src: int = 0, async_op: bool = False):
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        return self._done(self.backend.broadcast([x], opts), async_op)

    def all_gather_into(self, out: torch.Tensor, x: torch.Tensor, async_op: bool = False):
        """``out`` (``size * x.shape[0]`` rows) gets every rank's ``x``, in rank order."""
        return self._done(self.backend._allgather_base(out, x), async_op)

    def abort(self) -> None:
        self.backend.abort()

    def shutdown(self) -> None:
        """Free the group once no collective is pending. NCCL's communicators are aborted rather than
        finalized: finalizing waited for a peer that had already left (seen on 2 H200s, tearing a world
        down between tests)."""
        if isinstance(self.backend, _nccl_backend_type()):
            self.backend.abort()
            return
        stop = getattr(self.backend, "shutdown", None)
        if stop is not None:
            stop()


def _nccl_backend_type() -> type | tuple:
    import torch.distributed as dist

    return getattr(dist, "ProcessGroupNCCL", ())


def new_group(kind: str, store, rank: int, size: int, timeout_s: float, name: str,
              device: torch.device | None = None) -> Group:
    """A :class:`Group` of ``size`` ranks (``kind``: ``"nccl"`` or ``"gloo"``); every rank calls it with the
    same ``name``, which keys its rendezvous in ``store``."""
    import datetime

    import torch.distributed as dist

    prefixed = dist.PrefixStore(f"group/{name}", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if kind == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
        options._timeout = timeout
        backend = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        if device is not None and hasattr(backend, "eager_connect_single_device"):
            backend.eager_connect_single_device(device)  # fail now, not in the first forward
    else:
        backend = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
    return Group(backend, rank, size, name)


def all_reduce(x: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    """Sum (or max) ``x`` over the group's ranks; use the result (``x`` reduced in place, or a new tensor)."""
    return group.all_reduce(x, op)


def all_gather_last_dim(x: torch.Tensor, group: Group, world: int) -> torch.Tensor:
    """``[..., n]`` shards of the ranks, in rank order, as ``[..., world * n]`` on every rank."""
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    group.all_gather_into(out, x)
    return out.view(world, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], world * x.shape[-1])
