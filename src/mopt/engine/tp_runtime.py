"""Rank 0's side of tensor parallelism: the world of this process, and models sharded over it.

A process has at most one tensor-parallel world (its workers and process groups), started by the
first ``LLM(..., tensor_parallel_size=N)`` or ``load_model(..., tensor_parallel_size=N)`` and shared
by every later one of the same size; it stops at exit (or :func:`shutdown`). Each loaded model
is a :class:`TensorParallelModel`: rank 0's shard, whose ``forward`` and engine steps are announced
to the workers first, so that every rank runs the same computation on its own shard.

Anything that goes wrong inside a step (a rank that died, an interrupt) leaves the ranks out of step:
the world is then *broken*: its workers are stopped, the step raises a :class:`TensorParallelError`
naming the rank when one is to blame, and the next tensor-parallel model starts a new world.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from mopt.engine import one_shot
from mopt.engine.distributed import TensorParallelError
from mopt.engine.tp_launch import World, destroy_groups, spawn_world, stop_processes, torchrun_env, torchrun_world
from mopt.engine.tp_protocol import (LoadSpec, Op, RankCaptureSync, SentCommand, broadcast_object, exchange_errors,
                                     load_shard, min_over_ranks, send_command)
from mopt.engine.tp_watch import Monitor
from mopt.errors import EngineArgumentError

logger = logging.getLogger(__name__)
T = TypeVar("T")

WEDGED_LOCK_S = 1.0  # how long shutdown waits for a step of a wedged world to let go of the runtime
# How long a step may go on holding a wedged world after a rank failed before this process leaves with the error:
# such a step never returns (the host blocks in the driver behind the GPU's wait on the dead rank). Longer than
# a server's own stop (AsyncEngine.HUNG_STEP_S, then its shutdown), which says more.
STUCK_STEP_EXIT_S = 30.0


class TensorParallelRuntime:
    def __init__(self, world: World) -> None:
        self.world = world
        self.lock = threading.RLock()
        self.monitor = Monitor(world)
        self.monitor.on_failure = self._on_failure
        self.monitor.start()
        self.next_id = 1
        self.pending_free: list[int] = []
        self.broken: BaseException | None = None
        self.closed = False

    # -- state ------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise if the world cannot run commands (a rank failed, or it was stopped)."""
        failure = self.monitor.failure
        if failure is not None:
            self._break(failure)
            raise failure
        if self.broken is not None:
            raise TensorParallelError(f"the tensor-parallel world stopped after an earlier error: {self.broken}")
        if self.closed:
            raise TensorParallelError("the tensor-parallel world was shut down")

    def _break(self, error: BaseException) -> None:
        if self.broken is None:
            self.broken = error
            self.monitor.stopped.set()
            stop_processes(self.world, grace=0.0)

    def _failure_after(self, error: BaseException, wait: float = 3.0) -> TensorParallelError | None:
        """The monitor's account of a failed collective (which rank died), given a moment to notice."""
        deadline = time.monotonic() + wait
        while self.monitor.failure is None and time.monotonic() < deadline and isinstance(error, RuntimeError):
            time.sleep(0.05)
        return self.monitor.failure

    def _on_failure(self) -> None:
        """The monitor's call once it found a failure."""
        if self.wedged:
            threading.Thread(target=self._exit_if_stuck, daemon=True, name="mopt-tp-stuck-watch").start()

    def _exit_if_stuck(self) -> None:
        """Leave the process with the failure if a step still holds the world ``STUCK_STEP_EXIT_S`` after it:
        rank 0's program would wait for good, its workers gone (a program that got the error is left alone)."""
        if self.lock.acquire(timeout=STUCK_STEP_EXIT_S):
            self.lock.release()
            return
        print(f"mopt: error: {self.monitor.failure} (rank 0 is stuck in a step on its GPU: exiting)", file=sys.stderr,
              flush=True)
        stop_processes(self.world, grace=0.0)
        os._exit(1)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run a step of every rank: serialized, and fatal to the world if it fails midway."""
        with self.lock:
            self.check()
            try:
                yield
            except BaseException as e:
                failure = self._failure_after(e)
                self._break(failure or e)
                if failure is not None and failure is not e:
                    raise failure from e
                raise

    def send(self, op: Op, model_id: int = 0, ints: tuple = (), payload: np.ndarray | None = None,
             wait: bool = True) -> SentCommand:
        """Broadcast a command; without ``wait``, the caller waits on what this returns (``SentCommand.wait``)."""
        with self.lock:
            self._flush_frees()
            return send_command(self.world, op, model_id, ints, payload, self.check, wait=wait)

    def _flush_frees(self) -> None:
        while self.pending_free:
            send_command(self.world, Op.FREE, self.pending_free.pop(), check=self.check)

    # -- models -----------------------------------------------------------------------------------

    def load(self, spec: LoadSpec, progress: bool = False) -> tuple[int, torch.nn.Module]:
        """Every rank loads its shard of ``spec``; ``(model id, rank 0's shard)``. A rank that cannot load
        it raises here (naming the rank) and the world stays usable."""
        with self.guard():
            model_id, self.next_id = self.next_id, self.next_id + 1
            self.send(Op.LOAD, model_id)
            broadcast_object(self.world, spec, self.check)
            shard, own = None, None
            try:
                shard = load_shard(spec, self.world, progress)
            except Exception as e:
                own = e
            errors = exchange_errors(self.world, None if own is None else f"{type(own).__name__}: {own}", self.check)
        if own is not None:
            raise own
        failed = [(rank, error) for rank, error in enumerate(errors) if error]
        if failed:
            rank, error = failed[0]
            raise TensorParallelError(f"tensor-parallel rank {rank} could not load the model: {error}")
        return model_id, shard

    def free(self, model_id: int) -> None:
        """Forget a model (its workers' memory is freed with the next command)."""
        self.pending_free.append(model_id)

    @property
    def failure(self) -> BaseException | None:
        """Why the world cannot run steps: a step broke it, or a rank failed (the monitor saw it); else None."""
        return self.broken or self.monitor.failure

    @property
    def failed(self) -> bool:
        return self.failure is not None

    @property
    def wedged(self) -> bool:
        """A rank failed while this GPU may wait on it in a collective that nothing can interrupt (the
        one-shot all-reduce waits without limit; NCCL's abort and shutdown then block on the device)."""
        return self.failed and self.world.device.type == "cuda"

    def shutdown(self) -> None:
        global _RUNTIME, _SHUT_DOWN_WEDGED
        # A step on a wedged GPU holds the lock for good (it hangs in the driver): stop the workers without it.
        locked = self.lock.acquire(timeout=WEDGED_LOCK_S if self.wedged else -1)
        try:
            if self.closed:
                return
            self.closed = True
            self.monitor.stopped.set()
            if not self.failed:
                try:
                    send_command(self.world, Op.STOP, check=lambda: None)
                except Exception as e:  # the workers are stopped below anyway
                    logger.debug("stopping the workers: %s", e)
            stop_processes(self.world)
            if self.wedged:
                _SHUT_DOWN_WEDGED = True  # for _at_exit, after _RUNTIME is gone
            else:
                destroy_groups(self.world)
            if _RUNTIME is self:
                _RUNTIME = None
        finally:
            if locked:
                self.lock.release()


_RUNTIME: TensorParallelRuntime | None = None
_SHUT_DOWN_WEDGED = False  # a world of this process was shut down wedged (see TensorParallelRuntime.wedged)
_START_LOCK = threading.Lock()


def runtime(size: int, device_type: str) -> TensorParallelRuntime:
    """This process's tensor-parallel world of ``size`` ranks on ``device_type``, started on first use.

    Under torchrun, ranks other than 0 serve rank 0's commands here and exit the process when rank 0
    ends (``SystemExit``); they never return.
    """
    global _RUNTIME
    with _START_LOCK:
        if _RUNTIME is not None and _RUNTIME.wedged:
            raise TensorParallelError("this process's GPUs still wait on a tensor-parallel rank that failed "
                                      f"({_RUNTIME.failure}); a new model needs a new process")
        if _RUNTIME is not None and _RUNTIME.failed:
            _RUNTIME.shutdown()
        if _RUNTIME is not None:
            have = (_RUNTIME.world.size, _RUNTIME.world.device.type)
            if have != (size, device_type):
                raise EngineArgumentError(f"this process already runs a tensor-parallel world of {have[0]} ranks on "
                                          f"{have[1]}; a model of tensor_parallel_size {size} on {device_type} "
                                          "needs its own process (or mopt.engine.tp_runtime.shutdown() first)")
            return _RUNTIME
        env = torchrun_env()
        if env is not None and int(env["WORLD_SIZE"]) > 1:
            world = torchrun_world(size, device_type)
            if world.rank != 0:
                from mopt.engine.tp_worker import serve

                raise SystemExit(serve(world))
        else:
            world = spawn_world(size, device_type)
        _RUNTIME = TensorParallelRuntime(world)
        return _RUNTIME


def describe_collectives() -> str | None:
    """How this process's tensor-parallel world sums partial sums (``one_shot.describe``), or None without one."""
    if _RUNTIME is None:
        return None
    world = _RUNTIME.world
    if world.device.type != "cuda":
        return f"{world.size} ranks, gloo collectives"
    return f"{world.size} ranks, " + one_shot.describe(world.group)


def shutdown() -> None:
    """Stop this process's tensor-parallel world, if it has one (also runs at exit)."""
    if _RUNTIME is not None:
        _RUNTIME.shutdown()


def _at_exit() -> None:
    wedged = _SHUT_DOWN_WEDGED or (_RUNTIME is not None and _RUNTIME.wedged)
    shutdown()
    if wedged:
        # Freeing NCCL's communicators (which interpreter teardown does) would wait forever on the GPU
        # work that waits on the failed rank; the error has been raised and reported, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


atexit.register(_at_exit)


class TensorParallelModel(torch.nn.Module):
    """Rank 0's shard of a model sharded over the world. ``forward(input_ids)`` (full-sequence logits,
    no cache) runs on every rank; attributes not found here are the shard's (``config``, ``model``,
    ``compute_logits``...), but only ``forward`` and the engine's steps reach the other ranks."""

    def __init__(self, shard: torch.nn.Module, runtime: TensorParallelRuntime, model_id: int) -> None:
        super().__init__()
        self.shard = shard
        self.runtime, self.model_id = runtime, model_id
        self._finalizer = _finalize(self, runtime, model_id)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if "shard" not in modules:
                raise
            return getattr(modules["shard"], name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.detach().cpu()
        with self.runtime.guard():
            self.runtime.send(Op.FORWARD, self.model_id, tuple(ids.shape), ids.numpy().astype(np.int32).reshape(-1))
            return self.shard(input_ids)

    def agree_kv_blocks(self, local_blocks: int, block_size: int, kv_cache_memory: int | None) -> int:
        """The KV-cache block count every rank can hold: the minimum over the ranks of what each one's
        memory (``kv_cache_memory`` bytes, or each GPU's free memory) takes; ``local_blocks`` is rank 0's."""
        with self.runtime.guard():
            self.runtime.send(Op.KV_BLOCKS, self.model_id, (block_size, -1 if kv_cache_memory is None else kv_cache_memory))
            return min_over_ranks(self.runtime.world, local_blocks, self.runtime.check)

    def start_runner(self, num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int,
                     enforce_eager: bool, build: Callable[[RankCaptureSync], T]) -> T:
        """Workers build their ``ModelRunner`` (KV cache, CUDA graphs) as rank 0 builds its own with
        ``build(sync)``. The ranks capture their graphs in step, with the model's collectives in each
        warm-up, so a rank 0 that fails midway may leave the workers waiting inside one: its failure stops
        the world (``guard``), and the next model starts a new one."""
        with self.runtime.guard():
            self.runtime.send(Op.RUNNER, self.model_id, (num_blocks, block_size, max_num_seqs, max_model_len,
                                                         int(enforce_eager)))
            return build(RankCaptureSync(self.runtime.world, self.runtime.check))

    def share_tokens(self, tokens: torch.Tensor) -> None:
        """The runner's ``share_tokens``: a step's sampled ids to the workers (inside the step's scope)."""
        self.runtime.world.group.broadcast(tokens.contiguous())

    def wait_step(self, event: torch.cuda.Event) -> None:
        """The runner's ``wait_step``: wait for a step by polling its event. The one-shot all-reduce
        (``mopt.engine.one_shot``) waits on its peers with no time limit, so a blocking wait would never
        return after a rank died; polling lets the monitor's error through."""
        while not event.query():
            if self.runtime.monitor.failure is not None:
                self.runtime.check()
            time.sleep(0)  # lets the other threads (a server's event loop) run

    @contextlib.contextmanager
    def step_scope(self, kind: str, ints: tuple, array: np.ndarray) -> Iterator[None]:
        """The runner's ``step_scope``: announce a prefill or decode step, then run rank 0's part of it."""
        with self.runtime.guard():
            # Rank 0 runs its part while the workers take the command; their receipt is checked after.
            sent = self.runtime.send(Op.PREFILL if kind == "prefill" else Op.DECODE, self.model_id, ints, array,
                                     wait=False)
            yield
            sent.wait()


def _finalize(model: TensorParallelModel, runtime: TensorParallelRuntime, model_id: int):
    import weakref

    return weakref.finalize(model, runtime.free, model_id)


def load_tensor_parallel(kind: str, model, device_type: str, dtype: torch.dtype, kv_cache_dtype: str,
                         tensor_parallel_size: int, expert_parallel: bool, quantization: str | None = None,
                         seed: int = 0, progress: bool = False) -> TensorParallelModel:
    """Check that the model splits (before any process starts), then load it on every rank."""
    from mopt.engine.tp_plan import check_split

    if kind == "dummy":
        from mopt.engine.dummy import dummy_quant_config, load_config

        model = load_config(model)
        config, quant = model, dummy_quant_config(quantization or "bf16")
    else:
        from mopt.engine.loader import read_model_spec

        model = str(Path(model))
        _, config, quant, _, _ = read_model_spec(Path(model))
    check_split(config, quant, tensor_parallel_size, expert_parallel)
    one_shot.max_bytes_from_env()  # a bad MOPT_TP_ONE_SHOT_BYTES, MOPT_TP_FUSED_NORM, MOPT_TP_GEMV_PUSH,
    one_shot.fused_norm_from_env()  # MOPT_TP_TWO_SHOT_ROWS or MOPT_TP_PEER_AMAX fails here, before any process starts
    one_shot.producer_push_from_env()
    one_shot.two_shot_rows_from_env()
    one_shot.peer_amax_from_env()
    world = runtime(tensor_parallel_size, device_type)
    spec = LoadSpec(kind, model, dtype, kv_cache_dtype, quantization, seed, expert_parallel)
    model_id, shard = world.load(spec, progress)
    gc.collect()
    return TensorParallelModel(shard, world, model_id)
