"""Async scheduling: step k + 1 is queued on placeholders before step k's tokens reach the host.

It must change nothing a caller sees: the same tokens, texts and finish reasons as stepping
synchronously (compared exactly: the same float32 math runs in the same order), under early stops
on end-of-sequence tokens, different max_tokens, seeded sampling, preemption and aborted requests,
and no KV-cache block may leak. On the CPU it is off by default; these tests turn it on.
"""

from __future__ import annotations

import pytest
import torch

from mopt import LLM, SamplingParams
from mopt.errors import EngineArgumentError

PROMPTS = [[5, 17, 33], list(range(40, 70)), [7] * 9, list(range(100, 117)), [3, 1, 4, 1, 5, 9, 2, 6]]


def make_llm(path, async_scheduling: bool, kv_cache_memory: int = 4 << 20) -> LLM:
    return LLM(path, device="cpu", block_size=4, kv_cache_memory=kv_cache_memory,
               async_scheduling=async_scheduling)


def mixed_params(stop_token: int | None) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=12, ignore_eos=True),
        SamplingParams(max_tokens=5, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.8, top_k=20, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=14, stop_token_ids=[stop_token] if stop_token is not None else None),
        SamplingParams(max_tokens=1, ignore_eos=True),
    ]


def outputs(llm: LLM, params: list[SamplingParams]) -> list[tuple]:
    return [(o.token_ids, o.finish_reason, o.stop_reason) for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("kv_cache_memory", [4 << 20, 80 << 10], ids=["roomy", "preempting"])
def test_async_scheduling_changes_no_output(plain_path, kv_cache_memory):
    sync = make_llm(plain_path, False, kv_cache_memory)
    # A stop token that the fourth prompt's greedy continuation reaches mid-way, so one sequence stops
    # early while the others run on (its carried row is computed in vain and must be dropped).
    probe = sync.generate(PROMPTS[3], SamplingParams(max_tokens=14, ignore_eos=True))[0].token_ids
    params = mixed_params(probe[6])
    want = outputs(sync, params)
    assert want[3][1] == "stop" and len(want[3][0]) < 14

    llm = make_llm(plain_path, True, kv_cache_memory)
    preempted = []
    preempt = llm.scheduler._preempt
    llm.scheduler._preempt = lambda seq: (preempted.append(seq), preempt(seq))
    carried_steps = []
    launch = llm.runner.launch

    def counting_launch(seqs, is_prefill, carried=None):
        carried_steps.append(carried is not None)
        return launch(seqs, is_prefill, carried)

    llm.runner.launch = counting_launch
    assert outputs(llm, params) == want
    assert sum(carried_steps) >= 5, "decode steps should be queued before the previous tokens are read"
    assert bool(preempted) == (kv_cache_memory < 1 << 20)
    assert outputs(llm, params) == want  # and again, after a step left queued by the first call
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=2, ignore_eos=True))
    assert llm.scheduler.blocks.num_free == llm.scheduler.blocks.num_blocks


def test_request_aborted_while_a_step_is_queued(plain_path):
    llm = make_llm(plain_path, True)
    want = make_llm(plain_path, False).generate(PROMPTS[1], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    seq = llm._make_sequence(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    llm.scheduler.add(seq)
    for _ in range(4):
        llm._step()
    assert llm._pending is not None and seq in llm._pending.seqs
    produced = len(seq.output_token_ids)
    llm.scheduler.abort(seq)  # as a server does when its client goes away
    got = llm.generate(PROMPTS[1], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert got.token_ids == want.token_ids
    assert len(seq.output_token_ids) == produced and seq.finish_reason == "abort"
    llm._step()  # nothing left: takes in whatever is queued
    assert llm._pending is None
    assert llm.scheduler.blocks.num_free == llm.scheduler.blocks.num_blocks


def test_async_scheduling_argument_is_checked(plain_path):
    with pytest.raises(EngineArgumentError, match="async_scheduling must be True, False or None, got 'yes'"):
        LLM(plain_path, device="cpu", async_scheduling="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "fp8-kv"])
def test_async_scheduling_on_cuda_graphs(fmt):
    """On a GPU (CUDA graphs, device-side input ids): the same greedy tokens as synchronous steps."""
    kw = dict(load_format="dummy", quantization=fmt, device="cuda", max_model_len=256, max_num_seqs=16,
              kv_cache_memory=256 << 20)
    prompts = [list(range(10 + i, 30 + 3 * i)) for i in range(6)]
    params = [SamplingParams(max_tokens=8 + 5 * i, ignore_eos=True) for i in range(6)]
    want = [o.token_ids for o in LLM("llama3-1b", async_scheduling=False, **kw).generate(prompts, params)]
    got = [o.token_ids for o in LLM("llama3-1b", async_scheduling=True, **kw).generate(prompts, params)]
    assert got == want
