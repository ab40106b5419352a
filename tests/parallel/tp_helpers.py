"""Helpers of the tensor-parallel tests.

(No conftest.py here: tests import ``conftest`` from tests/ by that name, and a second one would
shadow it.)"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
import torch
from sibling import load_test_module  # noqa: F401  (the parallel tests import it from here)

TESTS = Path(__file__).resolve().parent.parent
SRC = TESTS.parent / "src"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python that imports this tree's mopt and the test helpers."""
    env = dict(os.environ, **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in extra:
            env.pop(key, None)
    paths = [str(SRC), str(TESTS), str(TESTS / "parallel")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _test_moe():
    return load_test_module("models", "test_moe")


def moe_export(tmp_path_factory, fmt: str, arch: str) -> Path:
    """tests/models/test_moe.py's tiny Qwen3-MoE / Mixtral exports."""
    return _test_moe().moe_export(tmp_path_factory, fmt, arch)[0]


def tiny_moe(arch: str):
    """tests/models/test_moe.py's tiny transformers MoE model (float32, random)."""
    return _test_moe().tiny_moe(arch)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def tp_world_per_module():
    """Stop this process's tensor-parallel world (2 gloo workers, started by the module's first TP model
    and shared by the rest) when the module ends; ``atexit`` would only do it when pytest exits."""
    yield
    import time

    from mopt.engine import tp_runtime

    start = time.monotonic()
    tp_runtime.shutdown()
    print(f"tensor-parallel world shut down in {time.monotonic() - start:.1f} s")


class ThreadGroup:
    """Stands in for a process group when the ranks are threads of this process (layer tests): every
    collective meets at a barrier (60 s, so a rank that skips one fails the test instead of hanging it)
    and combines the ranks' tensors in rank order. ``member(rank)`` is what a rank's layers hold."""

    def __init__(self, size: int) -> None:
        self.size, self.barrier, self.slots = size, threading.Barrier(size, timeout=60), [None] * size

    def member(self, rank: int) -> "_Member":
        return _Member(self, rank)

    def run(self, work) -> list:
        """``work(rank)`` on one thread per rank; their results in rank order (a rank's error re-raised)."""
        results, errors = [None] * self.size, []

        def target(rank: int) -> None:
            try:
                results[rank] = work(rank)
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise errors[0]
        return results


class _Member:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        group = self.group
        group.slots[self.rank] = x.clone()
        group.barrier.wait()
        values = list(group.slots)
        group.barrier.wait()  # every rank has read the slots before they are written again
        return values

    def fused_rms_norm(self, x: torch.Tensor):
        return None

    def partial_sums_norm(self):
        return None

    def per_token_fp8(self, x2: torch.Tensor):
        return None  # no peer memory: per-token FP8 takes a MAX all_reduce of the amaxes, as over gloo

    def all_reduce(self, x: torch.Tensor, op: str = "sum", async_op: bool = False):
        values = self._exchange(x)
        out = values[0].clone()
        for v in values[1:]:
            out = out + v if op == "sum" else torch.maximum(out, v) if op == "max" else torch.minimum(out, v)
        x.copy_(out)
        return x

    def all_gather_into(self, out: torch.Tensor, x: torch.Tensor, async_op: bool = False):
        out.copy_(torch.cat(self._exchange(x)))
