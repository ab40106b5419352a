"""Every error status of ``mopt serve`` in OpenAI's error JSON, and ``mopt serve`` arguments refused
before anything loads. After each error the engine must be idle (nothing scheduled, every block free).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from mopt import cli
from serving import DEADLINE, MODEL_NAME, running_server, tiny_llm


@pytest.fixture(scope="module")
def server(chat_model_dir):
    with running_server(tiny_llm(chat_model_dir)) as running:
        yield running


def assert_error(response: httpx.Response, status: int, param: str | None = None, message: str = "",
                 code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error
    if code is not None:
        assert error["code"] == code
    return error


COMPLETION = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}

BAD_REQUESTS = [
    # (name, route, body changes, param, message)
    ("negative max_tokens", "completions", {"max_tokens": -5}, "max_tokens", "max_tokens must be an integer >= 1"),
    ("negative temperature", "completions", {"temperature": -1}, "temperature", "temperature must be a finite number"),
    ("max_tokens as a string", "completions", {"max_tokens": "5"}, "max_tokens", "valid integer"),
    ("prompt past the context", "completions", {"prompt": [1] * 200}, "prompt",
     "prompt has 200 tokens; max_model_len is 128"),
    ("text past the context", "chat", {"messages": [{"role": "user", "content": "x" * 300}]}, "messages",
     "max_model_len is 128"),
    ("no prompt", "completions", {"prompt": None}, "prompt", "prompt must be a string"),
    ("empty prompt list", "completions", {"prompt": []}, "prompt", "prompt must be a string"),
    ("token past the vocabulary", "completions", {"prompt": [1, 400]}, "prompt", "outside the vocabulary"),
    ("bool token", "completions", {"prompt": [1, True]}, "prompt", "prompt token 1 must be an integer"),
    ("top_p 0", "completions", {"top_p": 0}, "top_p", "top_p must be a number in (0, 1]"),
    ("presence_penalty 3", "chat", {"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ("repetition_penalty 0", "completions", {"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ("negative seed", "completions", {"seed": -1}, "seed", "seed must be an integer"),
    ("n 0", "completions", {"n": 0}, "n", "n must be an integer in [1, 128]"),
    ("logprobs 6", "completions", {"logprobs": 6}, "logprobs", "logprobs must be an integer in [0, 5]"),
    ("top_logprobs 21", "chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ("top_logprobs alone", "chat", {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ("negative max_completion_tokens", "chat", {"max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    ("empty stop string", "completions", {"stop": [""]}, "stop", "stop strings must not be empty"),
    ("echo", "completions", {"echo": True}, "echo", "not supported"),
    ("tools", "chat", {"tools": [{"type": "function"}]}, "tools", "not supported"),
    ("image part", "chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "only text parts"),
    ("no messages", "chat", {"messages": []}, "messages", "messages must be a non-empty list"),
    ("message without role", "chat", {"messages": [{"content": "Hi"}]}, "messages.0.role", "Field required"),
]


@pytest.mark.parametrize("route,changes,param,message", [row[1:] for row in BAD_REQUESTS],
                         ids=[row[0] for row in BAD_REQUESTS])
def test_bad_requests_are_400_naming_the_field(server, route, changes, param, message):
    body = {**(COMPLETION if route == "completions" else CHAT), **changes}
    path = "/v1/completions" if route == "completions" else "/v1/chat/completions"
    for stream in (False, True):  # refused before any event is sent
        error = assert_error(httpx.post(f"{server.url}{path}", json={**body, "stream": stream}), 400, param, message)
        assert error["type"] == "invalid_request_error"
    server.wait_idle()


def test_malformed_json_is_400(server):
    response = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_unknown_model_is_404(server):
    assert_error(httpx.post(f"{server.url}/v1/completions", json={**COMPLETION, "model": "gpt-9"}), 404, "model",
                 "'gpt-9' does not exist", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        server.openai().chat.completions.create(model="gpt-9", messages=CHAT["messages"])


def test_api_key(chat_model_dir):
    with running_server(tiny_llm(chat_model_dir), api_key="sesame") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            assert_error(httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers=headers), 401, None,
                         "API key", "invalid_api_key")
        assert_error(httpx.get(f"{server.url}/v1/models"), 401, None, "API key")
        ok = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert server.openai("sesame").models.list().data[0].id == MODEL_NAME
        with pytest.raises(openai.AuthenticationError):
            server.openai("wrong").models.list()
        assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics stay open
        assert 'mopt_requests_total{outcome="unauthorized"} 5.0' in httpx.get(f"{server.url}/metrics").text


def _stall_first_step(llm):
    """The engine thread blocks in its first model step until the returned event is set."""
    gate, original = threading.Event(), llm.runner.launch
    llm.runner.launch = lambda *args, **kw: (gate.wait(DEADLINE), original(*args, **kw))[1]
    return gate


def test_full_queue_is_429_with_retry_after(chat_model_dir):
    llm = tiny_llm(chat_model_dir, max_num_seqs=1)
    gate = _stall_first_step(llm)
    with running_server(llm, max_queue=1) as server:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as http:
                first = asyncio.ensure_future(http.post("/v1/completions", json=COMPLETION))  # runs, stalled
                while not llm.scheduler.running:
                    await asyncio.sleep(0.01)
                second = asyncio.ensure_future(http.post("/v1/completions", json=COMPLETION))  # the queue's slot
                while server.engine._inbox.num_sequences + len(llm.scheduler.waiting) < 1:
                    await asyncio.sleep(0.01)
                third = await http.post("/v1/completions", json=COMPLETION)
                gate.set()
                return third, await first, await second

        third, first, second = asyncio.run(asyncio.wait_for(main(), DEADLINE))
        assert_error(third, 429, None, "takes at most 1", "queue_full")
        assert third.headers["retry-after"] == "1"
        assert first.status_code == second.status_code == 200
        server.wait_idle()


def test_engine_failure_is_500_and_the_server_goes_on(chat_model_dir, caplog):
    llm = tiny_llm(chat_model_dir)
    original, calls = llm.runner.launch, [0]

    def launch(*args, **kw):
        calls[0] += 1
        if calls[0] in (1, 2):
            raise RuntimeError("injected failure")
        return original(*args, **kw)

    llm.runner.launch = launch
    with running_server(llm) as server:
        error = assert_error(httpx.post(f"{server.url}/v1/completions", json=COMPLETION), 500, None,
                             "model step failed", "internal_error")
        assert error["type"] == "server_error" and "injected failure" not in error["message"]
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**COMPLETION, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and '"code":"internal_error"' in lines[-2]
        server.wait_idle()
        assert httpx.post(f"{server.url}/v1/completions", json=COMPLETION).status_code == 200
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'mopt_requests_total{outcome="error"} 2.0' in metrics
    assert "injected failure" in caplog.text  # the detail is in the log


def test_shutting_down_is_503_and_ends_streams(chat_model_dir):
    llm = tiny_llm(chat_model_dir)
    with running_server(llm) as server:
        body = {**COMPLETION, "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            server.engine.begin_shutdown()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"code":"unavailable"' in rest[-2]
        refused = httpx.post(f"{server.url}/v1/completions", json=COMPLETION)
        assert_error(refused, 503, None, "shutting down", "unavailable")
        assert refused.headers["retry-after"] == "1"
        assert httpx.get(f"{server.url}/health").status_code == 503
        server.wait_idle()


# -- the command line -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,status,message", [
    (["--port", "70000"], 2, "argument --port: expected a port in [0, 65535], got 70000"),
    (["--max-queue", "0"], 2, "argument --max-queue: expected an integer >= 1, got 0"),
    (["--max-num-seqs", "0"], 2, "argument --max-num-seqs: expected an integer >= 1, got 0"),
    (["--max-model-len", "-5"], 2, "argument --max-model-len: expected an integer >= 1, got -5"),
    (["--dummy", "no-such-preset"], 1, "no-such-preset: not a preset"),
    (["--dummy", "llama3-1b", "--format", "int3"], 1, "--format int3: dummy formats are"),
    (["--format", "int3"], 1, "--format int3: the default model's formats are"),
    (["--tokenizer", "/no/such/folder"], 1, "--tokenizer /no/such/folder: no such folder"),
    (["--device", "vulkan"], 1, "device type 'vulkan' is not supported"),
    (["--api-key", " "], 1, "--api-key must not be empty"),
], ids=["port", "max-queue", "max-num-seqs", "max-model-len", "preset", "dummy format", "format", "tokenizer",
        "device", "api key"])
def test_serve_arguments_refused_before_loading(argv, status, message, capsys, monkeypatch):
    """No MODEL: the default model would be built if any check came after loading. argparse refuses
    bad values (status 2), mopt's checks the rest (status 1), each naming the option."""
    monkeypatch.setattr("mopt.serve.command.make_llm", lambda args: pytest.fail("loaded a model"))
    try:
        got = cli.main(["serve", *argv])
    except SystemExit as e:
        got = e.code
    assert got == status
    assert message in capsys.readouterr().err


def test_taken_port_is_refused_before_loading(monkeypatch, capsys):
    from mopt.serve.server import bind_socket

    monkeypatch.setattr("mopt.serve.command.make_llm", lambda args: pytest.fail("loaded a model"))
    taken = bind_socket("127.0.0.1", 0)
    taken.listen()
    try:
        assert cli.main(["serve", "--port", str(taken.getsockname()[1])]) == 1
    finally:
        taken.close()
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_without_the_serve_extra():
    """``import mopt`` and the parser work without fastapi; ``mopt serve`` names the extra."""
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "import mopt, mopt.cli\n"
            "assert mopt.cli.build_parser()\n"
            "sys.exit(mopt.cli.main(['serve', '--port', '0']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "mopt serve needs the 'serve' extra (fastapi missing): pip install 'mopt[serve]'" in result.stderr
