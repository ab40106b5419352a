"""Fuzz LLM.generate / LLM.stream requests on a tiny model with a byte-level tokenizer.

Oracle: a RequestError, or outputs that obey their parameters; either way the engine ends idle
(nothing scheduled, every KV block free), also when a step fails at a random point, and afterwards
it still generates what a fresh engine generates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mopt import LLM, SamplingParams
from mopt.errors import MoptError
from fuzzlib import fuzz_settings, json_values, outcome

VOCAB, MAX_MODEL_LEN = 320, 32
REFERENCE = ([5, 17, 33, 2, 9], SamplingParams(max_tokens=8, ignore_eos=True))


BYTES_PER_TOKEN = 2 * 2 * 2 * 64 * 4  # tiny_llama(256): layers x (K, V) x KV heads x head size x float32


def make_llm(path) -> LLM:
    # 20 blocks of 4 tokens for up to 3 sequences of up to 32: long batches get preempted.
    return LLM(path, device="cpu", block_size=4, kv_cache_memory=20 * 4 * BYTES_PER_TOKEN, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import tiny_llama
    from tiny_tokenizer import save_byte_tokenizer

    path = tmp_path_factory.mktemp("fuzz-requests")
    tiny_llama(256).save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def odd(*values):
    return st.sampled_from(list(values)) | json_values


any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=10)  # lone surrogates included
VALID_FIELDS = {
    "max_tokens": st.integers(1, 40),
    "temperature": st.floats(0, 2) | st.sampled_from([0.0, 1e-45, 9e-6, 1e-5, 0.7]),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 400),
    "seed": st.none() | st.integers(0, 2**64 - 1),
    "stop": st.none() | st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 400), max_size=3),
    "ignore_eos": st.booleans(),
}
INVALID_FIELDS = {
    "max_tokens": odd(0, -1, True, "5", 2.0, None),
    "temperature": odd(float("nan"), float("inf"), -1.0, True, "0.5", None),
    "top_p": odd(None, 0, 1.5, float("nan")),
    "top_k": odd(-1, True, 1.5, None),
    "seed": odd(-1, 2**64, "1", 1.0),
    "stop": odd(5, [1], ["\ud800"], [""], [["a"]]),
    "stop_token_ids": odd(5, [True], ["2"], [-1]),
    "ignore_eos": odd("yes", 1, None),
}


@st.composite
def sampling_kwargs(draw) -> dict:
    """Valid parameters, with one field made invalid a quarter of the time."""
    kwargs = draw(st.fixed_dictionaries({}, optional=VALID_FIELDS))
    if draw(st.integers(0, 3)) == 3:  # hypothesis favours small numbers: 0 would be drawn most
        field = draw(st.sampled_from(sorted(INVALID_FIELDS)))
        kwargs[field] = draw(INVALID_FIELDS[field])
    return kwargs


valid_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
token = st.integers(-5, VOCAB + 5) | odd(float("-inf"), float("nan"), "a", True, [1], 1.0)
prompts_one = st.one_of(
    valid_ids, valid_ids, st.text(min_size=1, max_size=10),  # mostly valid
    st.lists(token, max_size=40),
    any_text,
    valid_ids.map(np.array),
    valid_ids.map(lambda t: np.array(t, dtype=np.float32)),
    valid_ids.map(torch.tensor),
    odd(None, 5, {"role": "user"}),
)


@st.composite
def requests(draw) -> tuple:
    """``(prompts argument, [SamplingParams kwargs])``: one prompt or a batch, and one parameter set,
    one per prompt, or (rarely) a wrong count."""
    batch = draw(st.lists(prompts_one, min_size=1, max_size=3))
    prompts = batch[0] if len(batch) == 1 and draw(st.booleans()) else batch
    count = draw(st.sampled_from([1, len(batch), 1, len(batch), len(batch) + 1]))
    return prompts, [draw(sampling_kwargs()) for _ in range(count)]


def check_output(out, params: SamplingParams) -> None:
    assert out.finish_reason in ("stop", "length"), out.finish_reason
    assert len(out.token_ids) <= params.max_tokens and all(0 <= t < VOCAB for t in out.token_ids)
    total = len(out.prompt_token_ids) + len(out.token_ids)
    assert total <= MAX_MODEL_LEN
    if out.finish_reason == "length":
        assert len(out.token_ids) == params.max_tokens or total == MAX_MODEL_LEN


class InjectedFailure(Exception):
    pass


def test_fuzz_requests(model_dir):
    llm = make_llm(model_dir)
    assert llm.scheduler.blocks.num_blocks == 20
    reference = make_llm(model_dir).generate(*REFERENCE)[0].token_ids
    original_launch = llm.runner.launch  # every model step goes through it

    @fuzz_settings(max_examples=60)
    @given(request=requests(), use_stream=st.booleans(), fail_at=st.none() | st.none() | st.integers(0, 6))
    def run(request, use_stream, fail_at):
        prompts, kwargs = request
        params = [outcome(lambda k=k: SamplingParams(**k)) for k in kwargs]
        if any(isinstance(p, MoptError) for p in params):
            return
        calls = [0]

        def launch(*args, **kw):
            calls[0] += 1
            if fail_at is not None and calls[0] > fail_at:
                raise InjectedFailure
            return original_launch(*args, **kw)

        llm.runner.launch = launch
        try:
            if use_stream:
                prompt = prompts[0] if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else prompts
                deltas = outcome(lambda: list(llm.stream(prompt, params[0])))
                if not isinstance(deltas, MoptError):
                    assert "".join(deltas) == llm.last_output.text
                    check_output(llm.last_output, params[0])
            else:
                outs = outcome(lambda: llm.generate(prompts, params if len(params) > 1 else params[0]))
                if not isinstance(outs, MoptError):
                    chosen = params if len(params) > 1 else params * len(outs)
                    for out, p in zip(outs, chosen):
                        check_output(out, p)
        except InjectedFailure:
            pass
        finally:
            llm.runner.launch = original_launch
        assert not llm.scheduler.waiting and not llm.scheduler.running
        assert llm.scheduler.blocks.num_free == llm.scheduler.blocks.num_blocks

    run()
    assert llm.generate(*REFERENCE)[0].token_ids == reference
