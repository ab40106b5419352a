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

import concurrent.futures

import httpx
import openai
import pytest

from tp_helpers import load_test_module, tp_world_per_module  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("tp_world_per_module")

serving = load_test_module("serve", "serving")
PROMPTS = ["Hello", "The capital of", "1, 2, 3,", "abc"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def _answers(server) -> dict:
    """Every request kind against ``server``; its answers as plain values."""
    client = server.openai()
    model = serving.MODEL_NAME
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
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=serving.DEADLINE) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    # A refused request leaves the engine (and the workers' step stream) as it was.
    with pytest.raises(openai.BadRequestError, match="max_model_len|context"):
        client.completions.create(model=model, prompt="x" * 200, max_tokens=10)
    out["after_refusal"] = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10,
                                                     temperature=0).choices[0].text
    server.wait_idle()
    return out


@pytest.mark.slow
def test_a_tensor_parallel_server_answers_as_one_process(chat_model_dir):
    with serving.running_server(serving.tiny_llm(chat_model_dir)) as server:
        want = _answers(server)
    with serving.running_server(serving.tiny_llm(chat_model_dir, tensor_parallel_size=2)) as server:
        assert server.llm.tensor_parallel_size == 2
        got = _answers(server)
    logprobs = got.pop("logprobs"), want.pop("logprobs")
    assert got == want
    assert logprobs[0] == pytest.approx(logprobs[1], rel=1e-4, abs=1e-6)
