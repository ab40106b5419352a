"""Helpers for the server tests: an engine on the tiny chat model (``chat_model_dir`` in conftest.py),
and a real server on a free loopback port in a background thread, stopped by the test itself."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mopt import LLM
from mopt.engine.async_engine import AsyncEngine

MODEL_NAME = "tiny"
DEADLINE = 30.0  # seconds for a server to start, stop or go idle: far above what it takes


def tiny_llm(path: Path, **kw) -> LLM:
    kw = {"device": "cpu", "block_size": 4, "kv_cache_memory": 4 << 20, "max_model_len": 128, **kw}
    return LLM(path, **kw)


@dataclass
class RunningServer:
    url: str
    engine: AsyncEngine

    @property
    def llm(self) -> LLM:
        return self.engine.llm

    def openai(self, api_key: str = "unused"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=DEADLINE)

    def wait_idle(self) -> None:
        """Until nothing is scheduled and every KV-cache block is free (or fail after DEADLINE)."""
        scheduler = self.llm.scheduler
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            stats = self.engine.stats
            if not scheduler.waiting and not scheduler.running and stats.free_blocks == stats.total_blocks \
                    and scheduler.blocks.num_free == scheduler.blocks.num_blocks:
                return
            time.sleep(0.01)
        raise AssertionError(f"engine not idle after {DEADLINE} s: {self.engine.stats}")


@contextlib.contextmanager
def running_server(llm: LLM, api_key: str | None = None, max_queue: int = 64):
    from mopt.serve.server import bind_socket, make_server

    engine = AsyncEngine(llm, max_queue)
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(engine, sock, MODEL_NAME, api_key)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + DEADLINE
        while not server.started:
            assert thread.is_alive() and time.monotonic() < end, "server did not start"
            time.sleep(0.01)
        yield RunningServer(f"http://127.0.0.1:{sock.getsockname()[1]}", engine)
    finally:
        server.should_exit = True
        thread.join(DEADLINE)
        sock.close()
        assert not thread.is_alive(), "server did not stop"
