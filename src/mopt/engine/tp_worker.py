"""The worker ranks (1..N-1) of a tensor-parallel world: run rank 0's commands on their shards.

A spawned worker (one node) starts in :func:`spawned_worker_main`; under torchrun the user's program
reaches :func:`serve` through ``mopt.LLM`` / ``mopt.load_model`` on every rank other than 0, and the
process exits when rank 0 stops the world. A worker that fails writes its error to the store
(``failed/<rank>``) for rank 0 to report, and exits; one whose rank 0 is gone exits too. Spawned workers
ignore SIGINT: rank 0 answers Ctrl-C for the world.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings

import torch

from mopt.engine.distributed import TensorParallelError
from mopt.engine.sampler import greedy_tokens
from mopt.engine.tp_launch import HEARTBEAT_S, Timeouts, World, rendezvous, store_client
from mopt.engine.tp_protocol import (LoadSpec, Op, RankCaptureSync, ShardState, broadcast_object, exchange_errors,
                                     load_shard, local_kv_blocks, min_over_ranks, receive_command, receive_tokens)
from mopt.engine.tp_watch import Heartbeat, PeerWatch

logger = logging.getLogger(__name__)


# How long a GPU worker whose rank 0 is gone may stay before it leaves regardless: its main thread notices
# within a second or two, unless it blocks in the driver behind a GPU that waits on rank 0 in a collective.
ORPHAN_EXIT_S = 10.0


class RankZeroGone(Exception):
    """Rank 0 went away: the worker leaves quietly."""


def _rank0_check(world: World):
    """A callable that raises :class:`RankZeroGone` once rank 0 is gone (its own store connection)."""
    rank0 = PeerWatch(store_client(world), 0, world.timeouts.peer)

    def check_rank0() -> None:
        if world.parent_pid is not None and os.getppid() != world.parent_pid:
            raise RankZeroGone("rank 0's process exited")
        try:
            silent = rank0.silent_for()
        except Exception as e:
            raise RankZeroGone(f"rank 0's store is gone ({str(e).splitlines()[0]})") from None
        if silent > world.timeouts.peer:
            raise RankZeroGone(f"rank 0 sent no heartbeat for {silent:.0f} s")

    return check_rank0


def _needs_orphan_exit(world: World) -> bool:
    return world.device.type == "cuda"


def _exit_when_orphaned(world: World, stopped: threading.Event) -> None:
    """A GPU worker's watch thread: leave ``ORPHAN_EXIT_S`` after rank 0 went away if the process is still here."""
    check = _rank0_check(world)
    while not stopped.wait(HEARTBEAT_S):
        try:
            check()
        except RankZeroGone as e:
            if stopped.wait(ORPHAN_EXIT_S):
                return
            print(f"mopt tensor-parallel rank {world.rank}: {e}, and this rank is stuck in a step on its GPU; "
                  "exiting", file=sys.stderr, flush=True)
            os._exit(1)


def _quiet() -> None:
    """Rank 0 shows the warnings and progress of loading; the same ones from every worker are noise."""
    from tqdm import tqdm

    warnings.filterwarnings("ignore")
    logging.getLogger("mopt").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # tqdm's default lock is a multiprocessing semaphore, made even for a disabled bar; a worker that rank 0
    # terminates would leave it to the resource tracker, which warns of a leak when rank 0 exits.
    tqdm.set_lock(threading.RLock())


def spawned_worker_main(rank: int, size: int, port: int, device_type: str, parent_pid: int,
                        timeouts: Timeouts) -> None:
    """Entry point of a worker process spawned by rank 0 on this node."""
    # Ctrl-C reaches the terminal's whole process group. Rank 0 decides what it means (a server shuts down,
    # a command reports the interruption) and stops the world; a worker that took it too would die with a
    # traceback in whatever collective it was waiting in.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch.distributed as dist

    from mopt.engine.tp_launch import _tcp_store, device_for, prepare_process_env

    _quiet()
    prepare_process_env()
    try:
        store = dist.PrefixStore("mopt", _tcp_store("127.0.0.1", port, size, False, timeouts.init))
    except Exception:  # rank 0 is gone already
        sys.exit(1)
    world = World(rank, size, rank, torch.device("cpu"), store, ("127.0.0.1", port), timeouts, parent_pid=parent_pid)
    try:
        world.device = device_for(device_type, rank)
        rendezvous(world, device_type)
    except Exception as e:
        _report(world, e)
        sys.exit(1)
    sys.exit(serve(world))


def _report(world: World, error: BaseException) -> None:
    """Leave the error for rank 0 (which names this rank) and print it here."""
    text = f"{type(error).__name__}: {error}"
    print(f"mopt tensor-parallel rank {world.rank}: {text}", file=sys.stderr, flush=True)
    try:
        world.store.set(f"failed/{world.rank}", text)
    except Exception:  # the store went away with rank 0
        pass


def serve(world: World) -> int:
    """Run commands until rank 0 stops the world; returns the process's exit code."""
    heartbeat = Heartbeat(world)
    heartbeat.start()
    if _needs_orphan_exit(world):
        threading.Thread(target=_exit_when_orphaned, args=(world, heartbeat.stopped), daemon=True,
                         name=f"mopt-tp-orphan-watch{world.rank}").start()
    try:
        code = _serve_commands(world, _rank0_check(world))
    finally:
        heartbeat.stopped.set()
    if code != 0 and world.device.type == "cuda":
        # A collective on this GPU may wait forever on the rank that failed, and freeing NCCL's
        # communicators (here or in interpreter teardown) would wait with it: leave at once.
        sys.stderr.flush()
        os._exit(code)
    from mopt.engine.tp_launch import destroy_groups

    destroy_groups(world)
    return code


def _serve_commands(world: World, check_rank0) -> int:
    shards: dict[int, ShardState] = {}
    try:
        while True:
            op, model_id, ints, payload = receive_command(world, check_rank0)
            if op is Op.STOP:
                return 0
            _run(world, shards, op, model_id, ints, payload, check_rank0)
    except RankZeroGone as e:
        print(f"mopt tensor-parallel rank {world.rank}: {e}; exiting", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        # A collective that failed because rank 0 is exiting (Ctrl-C, an error there) breaks here a moment
        # before rank 0's process is gone: give it that moment before reporting an error of this rank.
        if _rank0_gone(world, check_rank0, wait=2.0):
            print(f"mopt tensor-parallel rank {world.rank}: rank 0 went away; exiting", file=sys.stderr, flush=True)
            return 1
        logger.debug("%s", traceback.format_exc())
        _report(world, e)
        return 1


def _rank0_gone(world: World, check, wait: float = 0.0) -> bool:
    """Whether rank 0 is gone, asking again for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            check()
        except RankZeroGone:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _run(world: World, shards: dict[int, ShardState], op: Op, model_id: int, ints: list[int], payload,
         check) -> None:
    if op is Op.LOAD:
        spec: LoadSpec = broadcast_object(world, check=check)
        error = None
        try:
            shards[model_id] = ShardState(load_shard(spec, world), spec.dtype)
        except Exception as e:  # reported to rank 0, which raises it; the world stays usable
            error = f"{type(e).__name__}: {e}"
        if any(exchange_errors(world, error, check)):
            shards.pop(model_id, None)
        return
    if op is Op.FREE:
        shards.pop(model_id, None)
        gc.collect()
        if world.device.type == "cuda":
            torch.cuda.empty_cache()
        return
    shard = shards.get(model_id)
    if shard is None:
        raise TensorParallelError(f"rank 0 sent {op.name} for model {model_id}, which this rank does not hold")
    with torch.inference_mode():
        if op is Op.FORWARD:
            batch, tokens = ints[:2]
            ids = torch.from_numpy(payload).to(world.device, torch.int64).view(batch, tokens)
            shard.model(ids)
        elif op is Op.KV_BLOCKS:
            block_size, memory = ints[:2]
            min_over_ranks(world, local_kv_blocks(shard, world.device, block_size, None if memory < 0 else memory),
                           check)
        elif op is Op.RUNNER:
            from mopt.engine.runner import ModelRunner

            num_blocks, block_size, max_num_seqs, max_model_len, eager = ints[:5]
            shard.runner = ModelRunner(shard.model, num_blocks, block_size, shard.dtype, max_num_seqs, max_model_len,
                                       enforce_eager=bool(eager), sync=RankCaptureSync(world, check))
        elif op is Op.PREFILL:
            n, b, max_query_len, share = ints[:4]
            logits = shard.runner.prefill_from_array(payload, n, b, max_query_len)
            _keep_tokens(world, shard, share, b, lambda: greedy_tokens(logits))
        elif op is Op.DECODE:
            from mopt.engine.cuda_graphs import StagedDecode

            batch, bucket, width, carried, share = ints[:5]
            if carried and shard.tokens is None:
                raise TensorParallelError("rank 0 sent a decode step that carries tokens this rank never received")
            from mopt.engine.runner import SHARE_GREEDY

            _, greedy = shard.runner.run_decode(StagedDecode(payload, batch, bucket, width, carried), shard.tokens,
                                                share != SHARE_GREEDY)
            _keep_tokens(world, shard, share, batch, lambda: greedy)
        else:
            raise TensorParallelError(f"unknown tensor-parallel command {op!r}")


def _keep_tokens(world: World, shard: ShardState, share: int, count: int, greedy) -> None:
    """A step's sampled ids, as rank 0 shares them (``runner.SHARE_*``), for the next step to carry."""
    from mopt.engine.runner import SHARE_BROADCAST, SHARE_GREEDY

    if share == SHARE_BROADCAST:
        shard.tokens = receive_tokens(world, count)
    elif share == SHARE_GREEDY:
        shard.tokens = greedy()
