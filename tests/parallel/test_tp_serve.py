"""``mopt serve`` on a tensor-parallel engine: rank 0 runs the scheduler, the sampler and the HTTP server,
and a gloo worker process holds the other shard of the weights and of the KV cache.

Through the official ``openai`` client, on a real server on a loopback port, every kind of request gives
on 2 ranks what the same server gives on one process: completions and chats, streamed and not, several
streams at once, seeded sampling (rank 0 alone samples; the worker receives the ids by broadcast) and
logprobs (the whole vocabulary's logits gathered); a client that walks away mid-stream and a refused
request leave the engine serving, with every KV-cache block free. Tokens are compared exactly, as the other
tensor-parallel engine tests do (the 2-rank logits equal one process's to float32 rounding); logprobs to
1e-4 relative, float32 logits summed in another order and normalized over 320 entries.
"""

from __future__ import annotations

import pytest

from tp_helpers import load_test_module, tp_world_per_module  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("tp_world_per_module")

serving = load_test_module("serve", "serving")


@pytest.mark.slow
def test_a_tensor_parallel_server_answers_as_one_process(chat_model_dir):
    with serving.running_server(serving.tiny_llm(chat_model_dir)) as server:
        want = serving.answers(server)
    with serving.running_server(serving.tiny_llm(chat_model_dir, tensor_parallel_size=2)) as server:
        assert server.llm.tensor_parallel_size == 2
        got = serving.answers(server)
    logprobs = got.pop("logprobs"), want.pop("logprobs")
    assert got == want
    assert logprobs[0] == pytest.approx(logprobs[1], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_a_tensor_parallel_engine_process_answers_as_one_process(chat_model_dir):
    """``mopt serve``'s default: the engine, rank 0 of the world, in a process of its own that spawns the
    worker; the server's process holds no model and no process group."""
    with serving.running_server(serving.tiny_llm(chat_model_dir)) as server:
        want = serving.answers(server)
    with serving.running_server(serving.tiny_engine_process(chat_model_dir, tensor_parallel_size=2)) as server:
        assert server.engine.tensor_parallel_size == 2
        got = serving.answers(server)
    logprobs = got.pop("logprobs"), want.pop("logprobs")
    assert got == want
    assert logprobs[0] == pytest.approx(logprobs[1], rel=1e-4, abs=1e-6)
