"""Liveness of a tensor-parallel world: heartbeats, and rank 0's watch over the other ranks.

Each rank bumps ``alive/<rank>`` in the rendezvous store every second (:class:`Heartbeat`); a
:class:`PeerWatch` tells how long another rank's counter has not moved. Rank 0's :class:`Monitor`
also watches the spawned processes' sentinels and the ``failed/<rank>`` messages workers leave before
exiting; the first problem becomes a :class:`TensorParallelError` naming the rank that most likely
caused it (see ``tp_launch`` for the rest of the world's life).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from mopt.engine.distributed import TensorParallelError
from mopt.engine.tp_launch import (_SECONDARY, HEARTBEAT_S, World, _exit_description, abort_groups, failure_message,
                                   store_client)

logger = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Bumps ``alive/<rank>`` every second on its own store connection."""

    def __init__(self, world: World) -> None:
        super().__init__(daemon=True, name=f"mopt-tp-heartbeat{world.rank}")
        self.world, self.stopped = world, threading.Event()
        self.store = store_client(world)

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self.store.add(f"alive/{self.world.rank}", 1)
            except Exception:
                return  # the store went away with rank 0; the worker loop notices


class PeerWatch:
    """Whether another rank's heartbeat counter moved within ``timeout`` seconds (local clock)."""

    def __init__(self, store, rank: int, timeout: float) -> None:
        self.store, self.rank, self.timeout = store, rank, timeout
        self.value, self.since = None, time.monotonic()

    def silent_for(self) -> float:
        value = self.store.add(f"alive/{self.rank}", 0)
        now = time.monotonic()
        if value != self.value:
            self.value, self.since = value, now
        return now - self.since


class Monitor(threading.Thread):
    """Rank 0's watch over the workers (see module doc); ``failure`` is the first problem found."""

    def __init__(self, world: World) -> None:
        super().__init__(daemon=True, name="mopt-tp-monitor")
        self.world, self.stopped = world, threading.Event()
        self.failure: TensorParallelError | None = None
        self.on_failure: Callable[[], None] | None = None  # called once, from this thread, after ``failure`` is set
        self.store = store_client(world)
        self.peers = [PeerWatch(self.store, r, world.timeouts.peer) for r in range(1, world.size)]

    def fail(self, problems: dict[int, str]) -> None:
        """Record the failure, the rank most likely to blame first (see ``_SECONDARY``)."""
        if self.failure is not None or not problems:
            return

        def blame(item):
            rank, what = item
            return (any(s in what for s in _SECONDARY), rank)

        ranked = sorted(problems.items(), key=blame)
        text = "; ".join(f"rank {rank} {what}" for rank, what in ranked)
        self.failure = TensorParallelError(f"tensor-parallel {text}")
        logger.error("%s", self.failure)
        abort_groups(self.world)
        if self.on_failure is not None:
            self.on_failure()

    def scan(self, exited: set[int]) -> dict[int, str]:
        """Problems now: exited processes, failure messages, silent heartbeats."""
        problems: dict[int, str] = {r: _exit_description(self.world, r) for r in exited}
        for rank in range(1, self.world.size):
            message = failure_message(self.store, rank)
            if message and rank not in problems:
                problems[rank] = f"failed: {message}"
        for peer in self.peers:
            silent = peer.silent_for()
            if silent > peer.timeout and peer.rank not in problems:
                problems[peer.rank] = f"stopped responding (no heartbeat for {silent:.0f} s, MOPT_TP_PEER_TIMEOUT)"
        return problems

    def run(self) -> None:
        from multiprocessing.connection import wait

        sentinels = {p.sentinel: r for r, p in self.world.processes.items()}
        exited: set[int] = set()
        while not self.stopped.is_set() and self.failure is None:
            try:
                self.store.add("alive/0", 1)
                problems = self.scan(exited)
                if problems:
                    time.sleep(0.5)  # let the other ranks' reactions arrive, to tell cause from consequence
                    exited |= {sentinels[s] for s in wait(list(sentinels), timeout=0)} if sentinels else set()
                    if not self.stopped.is_set():
                        self.fail(self.scan(exited))
                    return
            except Exception as e:  # torchrun's agent store gone: the world is being torn down
                if not self.stopped.is_set():
                    self.fail({0: f"lost the rendezvous store ({str(e).splitlines()[0]})"})
                return
            ready = wait(list(sentinels), timeout=HEARTBEAT_S) if sentinels else self.stopped.wait(HEARTBEAT_S)
            if sentinels:
                exited |= {sentinels[s] for s in ready}
