"""Helpers for the server tests: an engine on the tiny chat model (``chat_model_dir`` in conftest.py),
in a thread or in a process of its own, a real server on a free loopback port in a background thread,
stopped by the test itself, and a table of requests of every kind to compare servers by."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mopt import LLM
from mopt.engine.async_engine import AsyncEngine, ServingEngine
from mopt.engine.process_client import EngineProcessClient

MODEL_NAME = "tiny"
DEADLINE = 30.0  # seconds for a server to start, stop or go idle: far above what it takes
PROMPTS = ["Hello", "The capital of", "1, 2, 3,", "abc"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
TINY_LLM_ARGS = {"device": "cpu", "block_size": 4, "kv_cache_memory": 4 << 20, "max_model_len": 128}


def tiny_llm(path: Path, **kw) -> LLM:
    return LLM(path, **{**TINY_LLM_ARGS, **kw})


def tiny_engine_process(path: Path, max_queue: int = 64, **kw) -> EngineProcessClient:
    """An engine process serving ``tiny_llm(path, **kw)`` (the factory pickles: ``LLM`` and plain values)."""
    return EngineProcessClient(functools.partial(LLM, str(path), **{**TINY_LLM_ARGS, **kw}), max_queue)


@dataclass
class RunningServer:
    url: str
    engine: ServingEngine
    server: object  # the uvicorn server (``failure``: why it shut itself down)
    thread: threading.Thread  # runs it

    @property
    def llm(self) -> LLM:
        return self.engine.llm

    def openai(self, api_key: str = "unused"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=DEADLINE)

    def wait_idle(self) -> None:
        """Until nothing is scheduled and every KV-cache block is free (or fail after DEADLINE); an engine
        process is seen through the stats it sends after each step."""
        scheduler = self.llm.scheduler if isinstance(self.engine, AsyncEngine) else None
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            stats = self.engine.stats
            if not stats.running and not stats.waiting and stats.free_blocks == stats.total_blocks and (
                    scheduler is None or (not scheduler.waiting and not scheduler.running
                                          and scheduler.blocks.num_free == scheduler.blocks.num_blocks)):
                return
            time.sleep(0.01)
        raise AssertionError(f"engine not idle after {DEADLINE} s: {self.engine.stats}")


@contextlib.contextmanager
def running_server(llm: LLM | ServingEngine, api_key: str | None = None, max_queue: int = 64):
    """A server on ``llm`` (in an :class:`AsyncEngine`), or on an engine already made."""
    from mopt.serve.server import bind_socket, make_server

    engine = AsyncEngine(llm, max_queue) if isinstance(llm, LLM) else llm
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(engine, sock, MODEL_NAME, api_key)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + DEADLINE
        while not server.started:
            assert thread.is_alive() and time.monotonic() < end, "server did not start"
            time.sleep(0.01)
        yield RunningServer(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, server, thread)
    finally:
        server.should_exit = True
        thread.join(DEADLINE)
        sock.close()
        assert not thread.is_alive(), "server did not stop"
        if not isinstance(engine, AsyncEngine):
            engine.release()  # an engine process ends here (an AsyncEngine's model stays for the test to look at)


def answers(server: RunningServer) -> dict:
    """Every request kind against ``server``; its answers as plain values."""
    import openai

    client = server.openai()
    model = MODEL_NAME
    out = {}
    out["completion"] = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10,
                                                  temperature=0).choices[0].text
    out["chat"] = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10,
                                                 temperature=0).choices[0].message.content
    stream = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True)
    out["streamed"] = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    out["sampled"] = [c.text for c in client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=12,
                                                                 temperature=0.8, top_p=0.9, seed=7, n=2).choices]
    logprobs = client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=4, temperature=0,
                                         logprobs=3).choices[0].logprobs
    out["logprob_tokens"] = logprobs.tokens
    out["logprobs"] = logprobs.token_logprobs

    def one_stream(prompt: str) -> str:
        chunks = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=8, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        out["concurrent"] = list(pool.map(one_stream, PROMPTS))
    # A client that walks away mid-stream: its sequence is aborted and its blocks freed (wait_idle below).
    body = dict(model=model, prompt=PROMPTS[1], max_tokens=60, temperature=0, stream=True, ignore_eos=True)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=DEADLINE) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    # A refused request leaves the engine (and the workers' step stream) as it was.
    with pytest.raises(openai.BadRequestError, match="max_model_len|context"):
        client.completions.create(model=model, prompt="x" * 200, max_tokens=10)
    out["after_refusal"] = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10,
                                                     temperature=0).choices[0].text
    server.wait_idle()
    return out


def leave_during_validation(server: RunningServer, stream: bool, max_tokens: int, validating) -> None:
    """Send a completion request over a raw connection and close it once ``validating()`` is true (the engine
    holds the request in validation)."""
    port = int(server.url.rsplit(":", 1)[1])
    body = (f'{{"model": "{MODEL_NAME}", "prompt": [1, 2, 3], "max_tokens": {max_tokens}, "ignore_eos": true, '
            f'"stream": {str(stream).lower()}}}').encode()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        end = time.monotonic() + DEADLINE
        while not validating():
            assert time.monotonic() < end, "the request never reached validation"
            time.sleep(0.005)
    time.sleep(0.1)  # the server sees the connection close


@contextlib.contextmanager
def serve_process(model_dir: Path):
    """``mopt serve`` on ``model_dir`` as a process of its own, on CPU and a free port: ``(process, url,
    stderr lines so far)`` once it listens; killed at the end if still running."""
    proc = subprocess.Popen([sys.executable, "-m", "mopt.cli", "serve", str(model_dir), "--device", "cpu",
                             "--port", "0", "--served-model-name", MODEL_NAME], stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    announced = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line)
            if "listening on http://" in line:
                announced.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        assert announced.wait(120), "".join(stderr)
        url = next(line for line in stderr if "listening on" in line).split("listening on ")[1].strip()
        yield proc, url, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

