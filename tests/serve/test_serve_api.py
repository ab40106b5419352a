"""The OpenAI API of ``mopt serve`` through the official ``openai`` client and raw HTTP, against a
real server on a loopback port: answers equal ``LLM.generate``/``LLM.chat`` on the same model.

The tiny model is random, so its "text" is whatever bytes it picks; what matters is that the server
returns exactly what the engine computes. Greedy tokens are compared exactly. Logprobs are
compared to 1e-6: the same float32 computation on the same CPU gives the same values, and JSON
carries Python floats exactly; the margin only covers a different batch composition.
"""

from __future__ import annotations

import json

import httpx
import pytest

from mopt import SamplingParams
from serving import MODEL_NAME, running_server, tiny_llm

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def reference(chat_model_dir):
    """An engine of its own on the same model, for expected answers."""
    return tiny_llm(chat_model_dir)


@pytest.fixture(scope="module")
def server(chat_model_dir):
    with running_server(tiny_llm(chat_model_dir)) as running:
        yield running


@pytest.fixture
def client(server):
    yield server.openai()
    server.wait_idle()  # every test leaves the engine as it found it


def sse_events(response: httpx.Response) -> list:
    """The JSON events of a server-sent-events answer; asserts the format and the final [DONE]."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_models_and_health(server, client):
    (card,) = client.models.list().data
    assert card.id == MODEL_NAME and card.max_model_len == 128 and card.vocab_size == 320
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_chat(client, reference):
    want = reference.chat(MESSAGES, SamplingParams(max_tokens=8))[0]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(want.prompt_token_ids), 8)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_chat_streaming(client, reference):
    want = reference.chat(MESSAGES, SamplingParams(max_tokens=8))[0]
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


def test_chat_max_completion_tokens_and_content_parts(client, reference):
    want = reference.chat(MESSAGES, SamplingParams(max_tokens=3))[0]
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                       {"type": "text", "text": "there"}]}]
    joined = reference.chat([MESSAGES[0], {"role": "user", "content": "Hello\nthere"}], SamplingParams(max_tokens=3))[0]
    assert client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=3,
                                          temperature=0).choices[0].message.content == want.text
    assert client.chat.completions.create(model=MODEL_NAME, messages=parts, max_tokens=3,
                                          temperature=0).choices[0].message.content == joined.text


@pytest.mark.parametrize("prompt", ["Once upon", ["Once upon", "a time"], [5, 17, 33], [[5, 17, 33], [40, 41]]],
                         ids=["text", "texts", "token ids", "token-id lists"])
def test_completions_prompt_forms(client, reference, prompt):
    want = reference.generate(prompt, SamplingParams(max_tokens=5))
    reply = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0)
    assert [c.index for c in reply.choices] == list(range(len(want)))
    assert [c.text for c in reply.choices] == [o.text for o in want]
    assert reply.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in want)
    assert reply.usage.completion_tokens == 5 * len(want)


def test_completions_streaming_raw(server, client, reference):
    want = reference.generate([5, 17, 33], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    body = {"model": MODEL_NAME, "prompt": [5, 17, 33], "max_tokens": 6, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    choices = [e["choices"][0] for e in events if e["choices"]]
    assert [t for c in choices for t in c["token_ids"]] == want.token_ids
    assert "".join(c["text"] for c in choices) == want.text and choices[-1]["finish_reason"] == "length"
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


def test_completions_default_max_tokens_is_openais_16(client):
    reply = client.completions.create(model=MODEL_NAME, prompt=[1, 2, 3], temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 16


def test_seeded_sampling_is_reproducible(client, reference):
    def ask(seed):
        return client.completions.create(model=MODEL_NAME, prompt=[5, 17, 33], max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True, "return_token_ids": True})

    first, again, other = ask(7), ask(7), ask(8)
    assert first.choices[0].token_ids == again.choices[0].token_ids != other.choices[0].token_ids
    want = reference.generate([5, 17, 33], SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True))
    assert first.choices[0].token_ids == want[0].token_ids


def test_n_choices(client, reference):
    def ask(n, stream=False):
        return client.completions.create(model=MODEL_NAME, prompt=[5, 17, 33], max_tokens=10, temperature=1.0,
                                         seed=3, n=n, stream=stream, extra_body={"ignore_eos": True,
                                                                                 "return_token_ids": True})

    two = ask(2)
    ids = [c.token_ids for c in two.choices]
    assert [c.index for c in two.choices] == [0, 1] and ids[0] != ids[1]
    assert [c.token_ids for c in ask(2).choices] == ids  # reproducible
    assert ask(1).choices[0].token_ids == ids[0]  # choice 0 keeps the request's seed
    streamed = {0: [], 1: []}
    for chunk in ask(2, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.token_ids or []
    assert [streamed[0], streamed[1]] == ids
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, n=2, temperature=1.0,
                                          seed=3)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8


def test_logprobs_equal_generate(client, reference):
    want = reference.generate([5, 17, 33], SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True))[0]
    reply = client.completions.create(model=MODEL_NAME, prompt=[5, 17, 33], max_tokens=4, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    got = reply.choices[0].logprobs
    assert got.tokens == [p.chosen.token for p in want.logprobs]
    for value, top, expected in zip(got.token_logprobs, got.top_logprobs, want.logprobs):
        assert value == pytest.approx(expected.chosen.logprob, abs=1e-6)
        # Top tokens and the chosen one, keyed by text (byte tokens that decode alike share a key).
        assert top == pytest.approx({t.token: t.logprob for t in expected.top + [expected.chosen]}, abs=1e-6)
    chat_want = reference.chat(MESSAGES, SamplingParams(max_tokens=4, logprobs=2))[0]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [p.chosen.token for p in chat_want.logprobs]
    for c, expected in zip(content, chat_want.logprobs):
        assert c.logprob == pytest.approx(expected.chosen.logprob, abs=1e-6)
        assert c.bytes == list(c.token.encode())
        assert [t.logprob for t in c.top_logprobs] == pytest.approx([t.logprob for t in expected.top], abs=1e-6)


def test_penalties_and_stop_reach_the_engine(client, reference):
    params = dict(max_tokens=8, presence_penalty=1.5, frequency_penalty=0.5)
    want = reference.generate([5, 5, 5, 17], SamplingParams(repetition_penalty=1.3, ignore_eos=True, **params))[0]
    reply = client.completions.create(model=MODEL_NAME, prompt=[5, 5, 5, 17], temperature=0, **params,
                                      extra_body={"repetition_penalty": 1.3, "ignore_eos": True,
                                                  "return_token_ids": True})
    assert reply.choices[0].token_ids == want.token_ids
    plain = reference.generate("Once upon", SamplingParams(max_tokens=8, ignore_eos=True))[0].text
    stop = plain[2:4]
    cut = client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=8, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == plain[: plain.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_metrics(server, client):
    client.completions.create(model=MODEL_NAME, prompt=[1, 2, 3], max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    for name in ("mopt_prompt_tokens_total", "mopt_generation_tokens_total", "mopt_num_requests_running",
                 "mopt_num_requests_waiting", "mopt_kv_cache_usage_ratio", "mopt_kv_cache_free_blocks",
                 "mopt_kv_cache_total_blocks", "mopt_time_to_first_token_seconds_count",
                 "mopt_time_per_output_token_seconds_count", 'mopt_requests_total{outcome="success"}',
                 'mopt_requests_total{outcome="abort"}'):
        assert name in values, name
    assert values['mopt_requests_total{outcome="success"}'] >= 1 and values["mopt_generation_tokens_total"] >= 3
    assert values["mopt_time_to_first_token_seconds_count"] >= 1
    assert values["mopt_kv_cache_total_blocks"] == server.llm.scheduler.blocks.num_blocks
