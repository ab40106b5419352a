"""The embedded default model behind ``mopt serve``: a real tokenizer and chat template (built once
per session by the ``default_model_cache`` fixture)."""

from __future__ import annotations

import pytest

from mopt import LLM
from mopt.engine import default_model
from serving import MODEL_NAME, running_server

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_with_the_default_model(default_model_cache):
    llm = LLM(default_model.default_model_path("fp8-kv"), device="cpu", kv_cache_memory=64 << 20)
    prompt = llm.chat_prompt(MESSAGES)
    with running_server(llm) as server:
        client = server.openai()
        reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=30, temperature=0)
        (choice,) = reply.choices
        assert "Paris" in choice.message.content and choice.finish_reason == "stop"
        assert reply.usage.prompt_tokens == len(prompt)
        chunks = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=30, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
        server.wait_idle()
