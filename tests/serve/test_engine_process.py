"""``mopt serve``'s engine in a process of its own (``EngineProcessClient``, the default of ``mopt serve``).

Every kind of request gives what the engine in a thread gives (tokens exactly; logprobs to 1e-5 relative:
the engine process may run torch with another thread count, which sums float32 logits in another order);
errors cross the process as the in-thread engine raises them (a bad request is a 400 naming its field, a full
queue a 429); an engine process that dies fails the streams and callers it had and turns ``/health`` to 503
instead of leaving them waiting; a model that fails to load raises its own error where the server starts;
and a server killed outright takes its engine process with it.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving import (DEADLINE, MODEL_NAME, answers, leave_during_validation, running_server, serve_process,
                     tiny_engine_process, tiny_llm)
from test_serve_load import metric

from mopt import LLM
from mopt.engine.process_client import EngineProcessClient
from mopt.errors import EngineArgumentError

LONG = 200


def test_an_engine_process_answers_as_an_engine_thread(chat_model_dir):
    with running_server(tiny_llm(chat_model_dir)) as server:
        want = answers(server)
    with running_server(tiny_engine_process(chat_model_dir)) as server:
        assert server.engine.max_model_len == 128 and server.engine.vocab_size == 320
        got = answers(server)
    logprobs = got.pop("logprobs"), want.pop("logprobs")
    assert got == want
    assert logprobs[0] == pytest.approx(logprobs[1], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("body, status, text", [
    ({"prompt": "Hello", "max_tokens": 2, "n": 2}, 429, "queue"),  # two sequences, a queue of one
    ({"prompt": [1, 2, 99999], "max_tokens": 2}, 400, "prompt"),  # refused by the engine: not in the vocabulary
], ids=["queue-full", "bad-token-id"])
def test_errors_cross_the_process(chat_model_dir, body, status, text, caplog):
    with running_server(tiny_engine_process(chat_model_dir, max_queue=1)) as server:
        response = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, **body}, timeout=DEADLINE)
        assert response.status_code == status, response.text
        assert text in response.text
        if status == 429:
            assert "retry-after" in response.headers
        else:
            assert response.json()["error"]["param"] == "prompt"
        ok = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3,
                                                                  "ignore_eos": True}, timeout=DEADLINE)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        server.wait_idle()
    # The stop reaps the engine process once: the reader thread reaping it too once made this stop log that the
    # engine "did not stop within 10 s" and SIGTERM a pid already gone.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_dead_engine_process_fails_its_requests_and_stops_the_server(chat_model_dir):
    """The stream in flight ends with an error event naming the engine's end, and the server, which could only
    fail requests from now on, shuts itself down with that reason (``mopt serve`` then exits 1 with it)."""
    engine = tiny_engine_process(chat_model_dir)
    with running_server(engine) as server:
        body = {"model": MODEL_NAME, "prompt": [1, 2, 3], "max_tokens": LONG, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=DEADLINE) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            engine._process.kill()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"code":"unavailable"' in rest[-2]
        assert "exited unexpectedly (killed by signal 9)" in rest[-2]
        server.thread.join(DEADLINE)
        assert not server.thread.is_alive()
        assert "exited unexpectedly (killed by signal 9)" in server.server.failure


def gated_tiny_llm(path: str, files: str) -> LLM:
    """(In the engine process.) The tiny LLM, whose requests wait at validation until the file
    ``files/gate`` exists, after creating ``files/reached``; an aborted sequence creates ``files/aborted``."""
    llm = tiny_llm(Path(path), max_model_len=256)
    make_sequence, abort, files = llm._make_sequence, llm.scheduler.abort, Path(files)

    def gated(*args):
        (files / "reached").touch()
        end = time.monotonic() + DEADLINE
        while not (files / "gate").exists() and time.monotonic() < end:
            time.sleep(0.005)
        return make_sequence(*args)

    def recorded_abort(seq):
        (files / "aborted").touch()
        return abort(seq)

    llm._make_sequence, llm.scheduler.abort = gated, recorded_abort
    return llm


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_client_gone_before_the_engine_process_answers(chat_model_dir, tmp_path, stream):
    """The client leaves while the engine process still validates its request: once admitted it is aborted."""
    reached, gate = tmp_path / "reached", tmp_path / "gate"
    engine = EngineProcessClient(functools.partial(gated_tiny_llm, str(chat_model_dir), str(tmp_path)))
    with running_server(engine) as server:
        leave_during_validation(server, stream, LONG, reached.exists)
        gate.touch()
        end = time.monotonic() + DEADLINE
        while metric(server.url, 'mopt_requests_total{outcome="abort"}') != 1:
            assert time.monotonic() < end
            time.sleep(0.01)
        server.wait_idle()
        assert (tmp_path / "aborted").exists()  # the engine aborted it (did not run it to its end)
        assert metric(server.url, "mopt_generation_tokens_total") < LONG


def test_a_failed_load_raises_its_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match="no-such-model"):
        EngineProcessClient(functools.partial(LLM, str(tmp_path / "no-such-model"), device="cpu"))
    assert time.monotonic() - start < DEADLINE


def test_a_factory_that_cannot_be_pickled_is_refused_by_name():
    with pytest.raises(EngineArgumentError, match="cannot be sent to the engine process.*picklable"):
        EngineProcessClient(lambda: None)


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: nobody may reap an orphan inside a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child pids from /proc (Linux)")
def test_a_killed_server_takes_its_engine_process_with_it(chat_model_dir):
    with serve_process(chat_model_dir) as (proc, _, _):
        children = _children(proc.pid)  # the engine process (and multiprocessing's resource tracker)
        assert children
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(DEADLINE)
        end = time.monotonic() + DEADLINE
        while not all(_gone(pid) for pid in children):
            assert time.monotonic() < end, f"of the server's children {children}, some still run"
            time.sleep(0.05)


@pytest.mark.gpu
def test_an_engine_process_on_a_gpu_answers_as_an_engine_thread(chat_model_dir):
    """CUDA in a spawned engine process, with CUDA already in use by the server's process (the in-thread engine
    before it): the same answers (logprobs to 1e-3 relative: bfloat16 logits on another process's kernels)."""
    import torch

    with running_server(tiny_llm(chat_model_dir, device="cuda", dtype=torch.bfloat16, block_size=16)) as server:
        want = answers(server)
    engine = tiny_engine_process(chat_model_dir, device="cuda", dtype=torch.bfloat16, block_size=16)
    with running_server(engine) as server:
        got = answers(server)
    logprobs = got.pop("logprobs"), want.pop("logprobs")
    assert got == want
    assert logprobs[0] == pytest.approx(logprobs[1], rel=1e-3, abs=1e-4)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child pids from /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["server-killed", "ctrl-c"])
def test_an_engine_process_still_loading_ends_with_its_server(sig):
    """A server killed while its model loads: the engine process stops loading and exits (it would otherwise
    load for minutes, and only then find nobody to serve). Ctrl-C while loading: the server stops it at once
    (not after the 10 s it grants an engine to finish its step)."""
    code = ("import functools, time\n"
            "from mopt.engine.process_client import EngineProcessClient\n"
            "EngineProcessClient(functools.partial(time.sleep, 600))\n")
    # A terminal's default disposition: a shell that starts pytest in the background has it ignore SIGINT.
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        end = time.monotonic() + DEADLINE
        while len(children := _children(proc.pid)) < 2:  # the engine process and the resource tracker
            assert proc.poll() is None and time.monotonic() < end, children
            time.sleep(0.05)
        time.sleep(1.0)  # well into its "load"
        sent = time.monotonic()
        os.kill(proc.pid, sig)
        proc.wait(DEADLINE)
        while not all(_gone(pid) for pid in children):
            assert time.monotonic() < sent + DEADLINE, f"of the server's children {children}, some still run"
            time.sleep(0.05)
        assert time.monotonic() - sent < 12.0  # the engine's 10 s to finish a step would take 15 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
