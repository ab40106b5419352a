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


def all_reduce(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """Sum (or max) ``x`` over the group's ranks in place; ``x`` on every rank afterwards. Capturable in
    CUDA graphs (NCCL runs it on the stream)."""
    import torch.distributed as dist

    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """``[..., n]`` shards of the ranks, in rank order, as ``[..., world * n]`` on every rank."""
    import torch.distributed as dist

    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out.view(world, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], world * x.shape[-1])
