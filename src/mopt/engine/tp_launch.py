"""The processes of a tensor-parallel world: starting them, their rendezvous, and watching them.

One node: rank 0 is the calling process; it opens a ``TCPStore`` on a free port of 127.0.0.1 and
starts ranks 1..N-1 with torch.multiprocessing's spawn context. Several nodes: every rank is started
by ``torchrun`` and reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. Either way every rank announces itself in the store; rank 0 waits for all of them
(naming any that does not come, or that died on the way) before creating two process groups of
mopt's own (``mopt.engine.distributed.Group``: never torch.distributed's default group):

* ``group``: the model's collectives (NCCL on GPUs, gloo on CPUs), with ``MOPT_TP_TIMEOUT``;
* ``ctrl``: gloo, rank 0's commands to the workers. Its own timeout is effectively infinite because
  an engine may idle for days; waits on it are polled, and a worker leaves when rank 0 goes away.

On one node's GPUs the model group also gets a one-shot all-reduce over peer memory for small sums
(``mopt.engine.one_shot``). Liveness (``mopt.engine.tp_watch``): each rank bumps a counter in the
store every second; rank 0's ``Monitor`` also watches the spawned processes' sentinels and the
``failed/<rank>`` messages workers leave before exiting; a dead, failed or silent
(``MOPT_TP_PEER_TIMEOUT``) rank becomes a :class:`TensorParallelError` naming it, and the engine,
which polls its steps, raises that error. NCCL-only groups are aborted so that no collective waits
forever; a GPU whose one-shot all-reduce waits on the dead rank cannot be freed, so such a process
leaves at exit without tearing NCCL down (``tp_runtime``). A worker leaves when its parent process
changes (one node), when rank 0's counter stops, or when the store or a collective reports rank 0
gone. NVLink multicast (``NCCL_NVLS_ENABLE``) is turned off for every process before NCCL starts, and
NCCL errors fail the collective instead of aborting the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``
unless set).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mopt.engine import one_shot
from mopt.engine.distributed import Group, TensorParallelError, new_group

logger = logging.getLogger(__name__)

CTRL_TIMEOUT_S = 3650 * 86400.0  # waits on the control group are polled (see module doc)
HEARTBEAT_S = 1.0
POLL_S = 1.0


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise TensorParallelError(f"{name} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise TensorParallelError(f"{name} must be positive, got {value!r}")
    return seconds


@dataclass(frozen=True)
class Timeouts:
    """``init``: for every rank to join; ``collective``: one collective of the model (or one command);
    ``peer``: a rank's heartbeat may stop this long before it counts as gone."""

    init: float = 300.0
    collective: float = 600.0
    peer: float = 60.0

    @classmethod
    def from_env(cls) -> "Timeouts":
        return cls(_seconds("MOPT_TP_INIT_TIMEOUT", cls.init), _seconds("MOPT_TP_TIMEOUT", cls.collective),
                   _seconds("MOPT_TP_PEER_TIMEOUT", cls.peer))


def prepare_process_env() -> None:
    """Settings every rank needs before NCCL starts."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # mopt never relies on NVLink multicast (NVLS)
    # When a peer dies, NCCL's watchdog aborts the communicators and fails the pending work, which raises
    # here, so that rank 0 can name the rank; torch's default (3) ends the whole process with SIGABRT first.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def torchrun_env() -> dict[str, str] | None:
    """The ranks' environment when this process was started by torchrun (or alike), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    env = {k: os.environ.get(k, "") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        int(env["LOCAL_RANK"] or 0)
        int(env["MASTER_PORT"])
    except ValueError:
        raise TensorParallelError(f"torchrun environment is not usable: {env}") from None
    if not 0 <= rank < world or not env["MASTER_ADDR"]:
        raise TensorParallelError(f"torchrun environment is not usable: {env}")
    return env


@dataclass
class World:
    """This process's place in the world, with everything needed to talk to the other ranks."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    store: object  # a PrefixStore over the rendezvous TCPStore
    store_address: tuple[str, int]
    timeouts: Timeouts
    group: Group | None = None
    ctrl: Group | None = None
    processes: dict[int, object] = field(default_factory=dict)  # rank -> spawned process (one node, rank 0)
    parent_pid: int | None = None  # a spawned worker's rank 0

    @property
    def torchrun(self) -> bool:
        return not self.processes and self.parent_pid is None


def _tcp_store(host: str, port: int, size: int, is_master: bool, timeout: float):
    import torch.distributed as dist

    return dist.TCPStore(host, port, size, is_master, timeout=datetime.timedelta(seconds=timeout),
                         wait_for_workers=False) if is_master else \
        dist.TCPStore(host, port, size, False, timeout=datetime.timedelta(seconds=timeout))


def store_client(world: World):
    """A new connection to the rendezvous store (one per thread that uses it)."""
    import torch.distributed as dist

    host, port = world.store_address
    return dist.PrefixStore("mopt", _tcp_store(host, port, world.size, False, world.timeouts.init))


def device_for(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a child starts (a disposition the spawned interpreter keeps), where this thread
    may set signal handlers (the main thread); elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def spawn_world(size: int, device_type: str, timeouts: Timeouts | None = None) -> World:
    """Rank 0 of a world of ``size`` processes on this node (ranks 1.. are spawned here)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from mopt.engine.tp_worker import spawned_worker_main

    timeouts = timeouts or Timeouts.from_env()
    prepare_process_env()
    master = _tcp_store("127.0.0.1", 0, size, True, timeouts.init)
    port = master.port
    world = World(0, size, 0, device_for(device_type, 0), dist.PrefixStore("mopt", master), ("127.0.0.1", port),
                  timeouts)
    world._master_store = master  # keeps the store's server alive as long as the world
    context = mp.get_context("spawn")
    try:
        for rank in range(1, size):
            process = context.Process(target=spawned_worker_main, daemon=True, name=f"mopt-tp-rank{rank}",
                                      args=(rank, size, port, device_type, os.getpid(), timeouts))
            with _sigint_ignored():  # inherited: a worker ignores Ctrl-C from birth (see tp_worker)
                process.start()
            world.processes[rank] = process
        rendezvous(world, device_type)
    except BaseException:
        stop_processes(world, grace=0.0)
        raise
    return world


def torchrun_world(size: int, device_type: str, timeouts: Timeouts | None = None) -> World:
    """This process's rank of a world started by torchrun (``size`` must be its ``WORLD_SIZE``)."""
    import torch.distributed as dist

    env = torchrun_env()
    assert env is not None and int(env["WORLD_SIZE"]) == size, "checked by the caller"
    timeouts = timeouts or Timeouts.from_env()
    prepare_process_env()
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"] or 0)
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    # torchrun's agent may host the store itself (then every rank is a client of it).
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    try:
        raw = _tcp_store(host, port, size, rank == 0 and not agent_store, timeouts.init)
    except Exception as e:
        raise TensorParallelError(f"rank {rank}: cannot reach the rendezvous store at {host}:{port} within "
                                  f"{timeouts.init:.0f} s ({str(e).splitlines()[0]})") from None
    world = World(rank, size, local_rank, device_for(device_type, local_rank), dist.PrefixStore("mopt", raw),
                  (host, port), timeouts)
    world._master_store = raw
    rendezvous(world, device_type)
    return world


def _exit_description(world: World, rank: int) -> str:
    process = world.processes.get(rank)
    code = process.exitcode if process is not None else None
    message = failure_message(world.store, rank)
    if code is not None and code < 0:
        try:
            what = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            what = f"was killed by signal {-code}"
    else:
        what = f"exited with code {code}" if code is not None else "failed"
    return what + (f": {message}" if message else "")


# A worker whose collective failed because another rank died reports that as its own error; the
# monitor names the rank that failed first, telling these apart by their text.
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "remote process exited", "Broken pipe")


# A spawned worker imports the main module of rank 0's program; a script that starts a model at import time
# makes every worker fail there, before it can leave a message (its traceback is on stderr).
_SPAWN_HINT = (" (workers are started with multiprocessing's spawn method and import the main module: a script "
               "must create tensor-parallel models under `if __name__ == \"__main__\":`; the worker's own error is "
               "on stderr)")


def failure_message(store, rank: int) -> str | None:
    """What rank ``rank`` wrote to the store before it exited with an error, if anything."""
    try:
        if store.check([f"failed/{rank}"]):
            return store.get(f"failed/{rank}").decode(errors="replace")
    except Exception:  # the store is gone with rank 0; nothing to add
        return None
    return None


def rendezvous(world: World, device_type: str) -> None:
    """Every rank announces itself; rank 0 waits for all (naming those missing), then the groups."""
    store = world.store
    store.set(f"joined/{world.rank}", str(os.getpid()))
    if world.rank == 0:
        deadline = time.monotonic() + world.timeouts.init
        while True:
            missing = [r for r in range(1, world.size) if not store.check([f"joined/{r}"])]
            dead = [r for r in missing if r in world.processes and world.processes[r].exitcode is not None]
            if dead:
                raise TensorParallelError("tensor-parallel " + "; ".join(
                    f"rank {r} {_exit_description(world, r)} before joining" for r in dead)
                    + ("" if all(failure_message(store, r) for r in dead) else _SPAWN_HINT))
            if not missing:
                break
            if time.monotonic() > deadline:
                where = f"{world.store_address[0]}:{world.store_address[1]}"
                raise TensorParallelError(
                    f"tensor-parallel rendezvous at {where} timed out after {world.timeouts.init:.0f} s: "
                    f"rank(s) {missing} of {world.size} did not join (MOPT_TP_INIT_TIMEOUT)")
            time.sleep(0.05)
    kind = "nccl" if device_type == "cuda" else "gloo"
    world.ctrl = new_group("gloo", store, world.rank, world.size, world.timeouts.init, "ctrl")
    world.group = new_group(kind, store, world.rank, world.size, world.timeouts.collective, "model",
                            world.device if kind == "nccl" else None)
    world.group.one_shot = one_shot.set_up(world, lambda ok: _agree(world.ctrl, ok))
    world.ctrl.backend.set_timeout(datetime.timedelta(seconds=CTRL_TIMEOUT_S))  # connected; now never time out


def _agree(ctrl: Group, ok: bool) -> bool:
    """Whether every rank says ``ok`` (a MIN over the control group)."""
    flag = torch.tensor([int(ok)])
    ctrl.all_reduce(flag, op="min")
    return bool(flag.item())


def wait_polled(work, check: callable, what: str, limit: float | None = None) -> None:
    """Wait for an asynchronous collective, calling ``check()`` (which raises when a peer is gone) every
    ``POLL_S`` seconds, and at most ``limit`` seconds."""
    start = time.monotonic()
    while True:
        try:
            work.wait(timeout=datetime.timedelta(seconds=POLL_S))
            return
        except RuntimeError as e:
            if "Operation timed out" not in str(e):
                raise
        check()
        if limit is not None and time.monotonic() - start > limit:
            raise TensorParallelError(f"{what}: no answer from the other ranks within {limit:.0f} s (MOPT_TP_TIMEOUT)")


def abort_groups(world: World) -> None:
    """Make collectives that wait on a dead rank return (NCCL; gloo ones fail by themselves)."""
    if world.device.type != "cuda" or world.group is None or world.group.one_shot is not None:
        return  # a one-shot all-reduce never sees NCCL's abort, and the abort would block on it
    try:
        world.group.abort()
    except Exception as e:  # best effort: the collective timeout still bounds the wait
        logger.warning("could not abort the NCCL process group: %s", e)


def stop_processes(world: World, grace: float = 10.0) -> None:
    """Join the spawned workers for ``grace`` seconds, then terminate and kill what is left."""
    deadline = time.monotonic() + grace
    for process in world.processes.values():
        process.join(max(0.0, deadline - time.monotonic()))
    for process in world.processes.values():
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)


TEARDOWN_S = 30.0


def destroy_groups(world: World) -> None:
    """Free the world's groups. CUDA graphs that captured NCCL collectives go first (models hold them in
    reference cycles, hence the collection); each group's shutdown gets ``TEARDOWN_S`` seconds, after
    which it is left to the process's exit (seen on 2 H100s: NCCL's abort never returned in a process
    that had captured and replayed its collectives), so that tearing a world down never hangs."""
    if world.device.type == "cuda":
        gc.collect()
        try:
            torch.cuda.synchronize(world.device)
        except Exception as e:  # a failed device: the shutdowns below are bounded anyway
            logger.debug("synchronizing before the groups' shutdown: %s", e)
    if world.group is not None and world.group.one_shot is not None:
        one_shot.unregister_process_group(world.group.one_shot.name)
    for group in (world.group, world.ctrl):
        if group is not None:
            _shut_down_within(group, TEARDOWN_S)
    world.group = world.ctrl = None


def _shut_down_within(group: Group, seconds: float) -> bool:
    done = threading.Event()

    def run() -> None:
        try:
            group.shutdown()
        except Exception as e:  # a failed world may not tear down cleanly; the processes are gone anyway
            logger.debug("shutting down group %s: %s", group.name, e)
        finally:
            done.set()

    threading.Thread(target=run, name=f"mopt-shutdown-{group.name}", daemon=True).start()
    if done.wait(seconds):
        return True
    logger.warning("tensor parallelism: shutting down the %s process group did not finish within %.0f s; "
                   "leaving it to the process's exit", group.name, seconds)
    return False
