"""The embedded default model end to end: `mopt generate`, `mopt chat`, `mopt eval`, and the
tokenizer-facing API (chat template, stop strings, streaming). Needs the real default model
(built once per session by the ``default_model_cache`` fixture)."""

from __future__ import annotations

import json
import math

import pytest

from mopt import LLM, SamplingParams, cli
from mopt.engine import default_model

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def llm(default_model_cache):
    return LLM(default_model.default_model_path("fp8-kv"), device="cpu", kv_cache_memory=64 << 20)


def test_generate_answers_the_readme_question(default_model_cache, capsys):
    assert cli.main(["generate", "--prompt", QUESTION, "--max-tokens", "30"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_raw_batch(default_model_cache, capsys):
    assert cli.main(["generate", "--raw", "--prompt", "The capital of France is", "--prompt", "1, 2, 3, 4,",
                     "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- [") == 2


def test_stop_strings_and_streaming(llm):
    prompt = llm.chat_prompt([{"role": "user", "content": QUESTION}])
    full = llm.generate(prompt, SamplingParams(max_tokens=30))[0]
    assert "Paris" in full.text and full.finish_reason == "stop" and full.stop_reason in llm.eos_token_ids
    cut = llm.generate(prompt, SamplingParams(max_tokens=30, stop=["Paris"]))[0]
    assert cut.text == full.text[: full.text.index("Paris")]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", "Paris")
    assert "".join(llm.stream(prompt, SamplingParams(max_tokens=30))) == full.text
    assert "".join(llm.stream(prompt, SamplingParams(max_tokens=30, stop=["Paris"]))) == cut.text


def test_chat_api_equals_generate_with_template(llm):
    messages = [{"role": "user", "content": QUESTION}]
    assert llm.chat(messages)[0].token_ids == llm.generate(llm.chat_prompt(messages))[0].token_ids


def test_interactive_chat_streams(default_model_cache, monkeypatch, capsys):
    lines = iter([QUESTION, "/reset", "", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", "--max-tokens", "30"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_eval_against_bf16_reference(default_model_cache, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "smollm2:fp8-kv", "--reference", "smollm2:bf16", "--context", "256",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "perplexity" in capsys.readouterr().out
    # SmolLM2-135M on the shipped English text, measured with 512-token windows: BF16 31.9, FP8
    # 32.9 (+3.1%), KL 0.034, top-1 88.7%. Bounds leave room for the 256-token windows used here.
    assert 2 < result["perplexity"] < 100 and math.isfinite(result["reference_perplexity"])
    assert abs(result["perplexity"] / result["reference_perplexity"] - 1) < 0.08
    assert 0 < result["mean_kl"] < 0.1 and result["top1_agreement"] > 0.8


def test_unknown_model_folder_is_a_clear_error(capsys):
    assert cli.main(["generate", "/no/such/folder", "--prompt", "hi"]) == 1
    assert "no such checkpoint folder" in capsys.readouterr().err
