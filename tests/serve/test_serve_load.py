"""``mopt serve`` under concurrent streams, clients that walk away, and signals.

Answers are long (up to 200 tokens at a few ms a step) so that a client closing after its first
chunks always leaves while its request still runs; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

import httpx
import pytest

from serving import DEADLINE, MODEL_NAME, leave_during_validation, running_server, serve_process, tiny_llm

LONG = 200  # tokens: far more than a closing client reads


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    raise AssertionError(f"{name} not in /metrics")


def test_half_of_16_streams_walk_away(chat_model_dir):
    llm = tiny_llm(chat_model_dir, kv_cache_memory=16 << 20, max_model_len=256)
    with running_server(llm) as server:
        async def client(i: int, http: httpx.AsyncClient):
            closes = i % 2 == 1
            body = {"model": MODEL_NAME, "prompt": [5 + i, 17, 33], "max_tokens": LONG, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                    "return_token_ids": True}
            chunks = []
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        chunks.append(line)
                        if closes and len(chunks) == 2:
                            return "closed", chunks  # leaving the block drops the connection mid-answer
                    elif line == "data: [DONE]":
                        return "done", chunks
            return "cut off", chunks

        async def main():
            limits = httpx.Limits(max_connections=16)
            async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE, limits=limits) as http:
                return await asyncio.gather(*(client(i, http) for i in range(16)))

        results = asyncio.run(asyncio.wait_for(main(), 2 * DEADLINE))
        assert [r[0] for r in results] == ["done", "closed"] * 8
        for state, chunks in results[::2]:
            assert all('"error"' not in c for c in chunks)
            assert '"finish_reason":"length"' in chunks[-2] and f'"completion_tokens":{LONG}' in chunks[-1]
        server.wait_idle()
        assert metric(server.url, 'mopt_requests_total{outcome="abort"}') == 8
        assert metric(server.url, 'mopt_requests_total{outcome="success"}') == 8
        assert metric(server.url, 'mopt_requests_total{outcome="error"}') == 0
        assert metric(server.url, "mopt_kv_cache_free_blocks") == metric(server.url, "mopt_kv_cache_total_blocks")


def test_closed_connection_aborts_a_non_streaming_request(chat_model_dir):
    with running_server(tiny_llm(chat_model_dir, max_model_len=256)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        body = (f'{{"model": "{MODEL_NAME}", "prompt": [1, 2, 3], "max_tokens": {LONG}, "ignore_eos": true}}').encode()
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            end = time.monotonic() + DEADLINE
            while not server.llm.scheduler.running:
                assert time.monotonic() < end
                time.sleep(0.005)
        server.wait_idle()
        assert metric(server.url, 'mopt_requests_total{outcome="abort"}') == 1
        assert metric(server.url, "mopt_generation_tokens_total") < LONG


def test_sigterm_stops_the_server_with_requests_in_flight(chat_model_dir):
    """``mopt serve`` as a process: SIGTERM with a stream and a plain request in flight ends both
    quickly and the process exits 0. (SIGINT takes the same handler; one child process is enough CI time.)"""
    with serve_process(chat_model_dir) as (proc, url, stderr):
        body = {"model": MODEL_NAME, "prompt": [1, 2, 3], "max_tokens": LONG, "ignore_eos": True}
        plain = {}
        thread = threading.Thread(target=lambda: plain.update(r=httpx.post(f"{url}/v1/completions", json=body,
                                                                            timeout=DEADLINE)))
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=DEADLINE) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            thread.start()
            time.sleep(0.2)  # the plain request is in flight too
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert proc.wait(DEADLINE) == 0, "".join(stderr)
        assert time.monotonic() - sent < 10  # ends the requests, does not wait for 200 tokens each
        assert rest[-1] == "data: [DONE]" and '"code":"unavailable"' in rest[-2]
        thread.join(DEADLINE)
        assert plain["r"].status_code == 503


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_client_gone_before_the_answer_starts(chat_model_dir, stream):
    """The client leaves while its request is still being validated: once admitted it is aborted."""
    llm = tiny_llm(chat_model_dir, max_model_len=256)
    gate, make_sequence = threading.Event(), llm._make_sequence
    llm._make_sequence = lambda *args: (gate.wait(DEADLINE), make_sequence(*args))[1]
    with running_server(llm) as server:
        leave_during_validation(server, stream, LONG,
                                lambda: server.engine._inbox.submissions or server.engine._inbox.num_sequences)
        gate.set()
        server.wait_idle()
        assert metric(server.url, 'mopt_requests_total{outcome="abort"}') == 1
        assert metric(server.url, "mopt_generation_tokens_total") < LONG
