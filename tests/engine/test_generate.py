"""Generation with the paged KV cache: equal to cache-free decoding, batching- and preemption-proof.

Checkpoints are tiny random models (unquantized, and real ModelOpt exports incl. an FP8 KV cache)
without tokenizers, so prompts are token ids. Greedy tokens must be identical; logits of a cached
step and of the cache-free forward over the whole sequence must agree to 1e-4 relative (the same
float32 math, but attention over padded block tables with a mask instead of a causal kernel sums in
another order; measured <= 1e-6).
"""

from __future__ import annotations

import logging

import pytest
import torch

from mopt import LLM, SamplingParams
from mopt.engine.sampler import filter_logits

PROMPTS = [[5, 17, 33], list(range(40, 70)), [7] * 9, list(range(100, 117))]


@pytest.fixture(params=["plain", "fp8-kv", "nvfp4-qwen3"])
def checkpoint(request, plain_path, export_factory):
    if request.param == "plain":
        return plain_path
    if request.param == "fp8-kv":
        return export_factory("fp8-kv", 256).path
    return export_factory("nvfp4", 256, "qwen3").path


def greedy_without_cache(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([ids], device=next(model.parameters()).device))[0, -1].cpu()
            logits.append(last)
            ids.append(int(last.argmax()))
    return ids[len(prompt):], logits


def small_llm(path, **kw) -> LLM:
    return LLM(path, device="cpu", block_size=4, kv_cache_memory=kw.pop("kv_cache_memory", 4 << 20), **kw)


def test_paged_cache_equals_cache_free_greedy(checkpoint):
    llm = small_llm(checkpoint)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for prompt in PROMPTS[:2]:
        expected, expected_logits = greedy_without_cache(llm.model, prompt, 12)
        out = llm.generate(prompt, params)[0]
        assert out.token_ids == expected and out.finish_reason == "length"
    # The logits themselves, step by step, through the runner.
    from mopt.engine.sequence import Sequence

    seq = Sequence(list(PROMPTS[1]), params)
    llm.scheduler.blocks.allocate(seq)
    for step, want in enumerate(expected_logits):
        got = llm.runner.step_logits([seq], is_prefill=step == 0)[0]
        assert ((got - want).norm() / want.norm()).item() < 1e-4
        seq.output_token_ids.append(int(want.argmax()))
        llm.scheduler.blocks.append_slot(seq)
    llm.scheduler.blocks.release(seq)


@pytest.mark.parametrize("kv_cache_memory", [4 << 20, None])
def test_batched_equals_one_by_one(checkpoint, kv_cache_memory):
    """``None``: a cache so small that sequences must be preempted and recomputed."""
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    alone = [small_llm(checkpoint).generate(p, params)[0].token_ids for p in PROMPTS]
    llm = small_llm(checkpoint)
    if kv_cache_memory is None:  # 20 blocks of 4 tokens for 4 sequences of up to 40 tokens
        llm = small_llm(checkpoint, kv_cache_memory=20 * 4 * _bytes_per_token(llm), max_model_len=64)
    together = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in together] == alone
    assert llm.scheduler.blocks.num_free == llm.scheduler.blocks.num_blocks


def _bytes_per_token(llm) -> int:
    from mopt.engine.runner import kv_bytes_per_token

    return kv_bytes_per_token(llm.model, llm.dtype)


def test_preemption_actually_happens(plain_path):
    llm = small_llm(plain_path)
    llm = small_llm(plain_path, kv_cache_memory=20 * 4 * _bytes_per_token(llm), max_model_len=64)
    preempted = []
    original = llm.scheduler._preempt
    llm.scheduler._preempt = lambda seq: (preempted.append(seq.request_id), original(seq))
    llm.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))
    assert preempted


def test_seeded_sampling_is_reproducible_and_batch_independent(plain_path):
    llm = small_llm(plain_path)
    params = [SamplingParams(max_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=s, ignore_eos=True)
              for s in (1, 2)]
    batch = llm.generate([PROMPTS[0], PROMPTS[0]], params)
    alone = llm.generate(PROMPTS[0], params[0])[0]
    assert batch[0].token_ids == alone.token_ids
    assert batch[0].token_ids != batch[1].token_ids


def test_stop_token_ids_eos_and_lengths(plain_path):
    llm = small_llm(plain_path)
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    stop_at = free.token_ids[2]
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, stop_token_ids=[stop_at], ignore_eos=True))[0]
    first = free.token_ids.index(stop_at)
    assert out.token_ids == free.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)
    llm.eos_token_ids = {stop_at}
    assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=6))[0].finish_reason == "stop"
    assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids == free.token_ids
    # The context length ends generation too.
    short = small_llm(plain_path, max_model_len=8)
    out = short.generate(PROMPTS[0], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 - len(PROMPTS[0]) and out.finish_reason == "length"


@pytest.mark.parametrize("prompt,params,message", [
    ([], None, "empty prompt"),
    ([1, 2, 10_000], None, "outside the vocabulary"),
    (list(range(64)), None, "max_model_len is 64"),
    ("text", None, "has no tokenizer"),
])
def test_bad_requests(plain_path, prompt, params, message):
    llm = small_llm(plain_path, max_model_len=64)
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt] if isinstance(prompt, list) else prompt, params)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(stop=[""]), "stop strings"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_cache_too_small_for_max_model_len(plain_path):
    with pytest.raises(ValueError, match="KV cache"):
        LLM(plain_path, device="cpu", kv_cache_memory=1 << 16, max_model_len=256)


def test_fp8_kv_cache_without_scales(plain_path, caplog):
    with caplog.at_level(logging.WARNING):
        llm = small_llm(plain_path, kv_cache_dtype="fp8")
    assert "scale 1.0" in caplog.text
    attn = llm.model.model.layers[0].self_attn.attn
    assert attn.k_cache.dtype == torch.float8_e4m3fn and attn.k_scale_float == 1.0
    expected, _ = greedy_without_cache(llm.model, PROMPTS[1], 8)
    assert llm.generate(PROMPTS[1], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids == expected


def test_fp8_kv_checkpoint_uses_its_scales(export_factory):
    llm = small_llm(export_factory("fp8-kv", 256).path)
    attn = llm.model.model.layers[1].self_attn.attn
    assert attn.k_cache.dtype == torch.float8_e4m3fn and attn.k_scale_float != 1.0


def _reference_filter(logits, temperature, top_k, top_p):
    """Plain per-row top-k then top-p, written the obvious way."""
    out = []
    for row, t, k, p in zip(logits, temperature, top_k, top_p):
        row = row / t
        if k > 0:
            row = torch.where(row >= row.topk(min(int(k), len(row))).values[-1], row, torch.tensor(float("-inf")))
        probs = row.softmax(-1)
        order = probs.argsort(descending=True)
        keep, mass = [], 0.0
        for i in order.tolist():
            if p < 1 and mass >= p:
                break
            keep.append(i)
            mass += probs[i].item()
        mask = torch.full_like(row, float("-inf"))
        mask[keep] = 0
        out.append(row + mask)
    return torch.stack(out)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.5),
                                                     (1.3, 10, 0.8), (1.0, 1, 0.9), (0.5, 200, 0.3)])
def test_filter_logits_matches_plain_implementation(temperature, top_k, top_p):
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0)) * 3
    args = (torch.full((3,), temperature), torch.full((3,), top_k), torch.full((3,), top_p))
    got = filter_logits(logits, *args)
    want = _reference_filter(logits, *args)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_generation_on_gpu(plain_path, kv_cache_dtype):
    """The engine on CUDA: paged decoding equals cache-free decoding (float32), BF16 runs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    llm = LLM(plain_path, device="cuda", dtype=torch.float32, kv_cache_dtype=kv_cache_dtype,
              block_size=4, kv_cache_memory=16 << 20)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for prompt in PROMPTS:
        expected, _ = greedy_without_cache(llm.model, prompt, 12)
        assert llm.generate(prompt, params)[0].token_ids == expected
    bf16 = LLM(plain_path, device="cuda", block_size=16, kv_cache_memory=16 << 20)
    assert bf16.dtype == torch.bfloat16
    assert all(len(o.token_ids) == 12 for o in bf16.generate(PROMPTS, params))


@pytest.mark.gpu
def test_preemption_on_gpu(plain_path):
    """A cache too small for the batch on CUDA: sequences are preempted and recomputed, and every
    output still equals cache-free greedy decoding (float32)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    probe = LLM(plain_path, device="cuda", dtype=torch.float32, block_size=16, kv_cache_memory=16 << 20)
    per_block = 16 * _bytes_per_token(probe)
    llm = LLM(plain_path, device="cuda", dtype=torch.float32, block_size=16, kv_cache_memory=6 * per_block,
              max_model_len=64)
    preempted = []
    original = llm.scheduler._preempt
    llm.scheduler._preempt = lambda seq: (preempted.append(seq.request_id), original(seq))
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True))
    assert preempted
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == greedy_without_cache(llm.model, prompt, 20)[0]
    assert llm.scheduler.blocks.num_free == llm.scheduler.blocks.num_blocks
