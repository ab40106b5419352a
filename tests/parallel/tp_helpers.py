"""Helpers of the tensor-parallel tests.

(No conftest.py here: tests import ``conftest`` from tests/ by that name, and a second one would
shadow it.)"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

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
    """tests/models/test_moe.py as a module (one cache of exports when both files run)."""
    if "test_moe" not in sys.modules:
        sys.path.insert(0, str(TESTS / "models"))
        try:
            import test_moe  # noqa: F401
        finally:
            sys.path.remove(str(TESTS / "models"))
    return sys.modules["test_moe"]


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
    from mopt.engine import tp_runtime

    tp_runtime.shutdown()
