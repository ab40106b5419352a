"""Penalties and logprobs in the device sampler against plain per-row reference implementations,
and through ``LLM.generate`` against cache-free decoding.

Tolerances: the batched penalties run the same float32 operations in the same order as the
per-row reference, but log-softmax over a batch may sum in another order than over one row, so
logprobs agree to 1e-6 (a few float32 ulps of values around 1-10); tokens must be identical
(random logits of scale 3 over 100 tokens leave no near ties). Against cache-free decoding the
cached step's logits agree to 1e-4 relative (see test_generate.py), so logprobs to 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from mopt import LLM, SamplingParams
from mopt.engine.sampler import SamplingTensors, gumbel_noise, sample
from mopt.engine.sequence import Sequence, choice_params, choice_seed

VOCAB = 100


def reference_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], params: SamplingParams):
    """One row, token by token, written the obvious way (vLLM's definition)."""
    out = logits.clone()
    for v in range(len(out)):
        count = output.count(v)
        if (v in prompt and params.repetition_penalty != 1) or count > 0:
            r = torch.tensor(params.repetition_penalty, dtype=torch.float32)
            out[v] = out[v] / r if out[v] > 0 else out[v] * r
        out[v] = out[v] - torch.tensor(params.frequency_penalty, dtype=torch.float32) * count
        out[v] = out[v] - torch.tensor(params.presence_penalty, dtype=torch.float32) * (count > 0)
    return out


def reference_token(logits: torch.Tensor, seq: Sequence) -> int:
    """Greedy: the argmax; sampled: Gumbel-max over logits / T with the request's own noise."""
    p = seq.params
    if p.greedy:
        return int(logits.argmax())
    noise = gumbel_noise(torch.tensor([seq.noise_key]), torch.tensor([len(seq.output_token_ids)]), len(logits))[0]
    return int((logits / p.temperature + noise).argmax())


# (name, params, prompt, output so far)
ROWS = [
    ("neutral greedy", dict(), [1, 2, 3], [4, 5]),
    ("repetition", dict(repetition_penalty=1.5), [1, 2, 3, 50], [4, 5, 5]),
    ("repetition < 1", dict(repetition_penalty=0.7), [10, 11], [12]),
    ("frequency", dict(frequency_penalty=0.8), [1], [7, 7, 7, 9]),
    ("presence", dict(presence_penalty=-1.2), [1], [7, 7, 9]),
    ("all three, sampled", dict(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5,
                                temperature=0.8, seed=3), [3, 4, 30], [30, 31, 31]),
    ("no output yet", dict(repetition_penalty=2.0, presence_penalty=1.0), [20, 21, 22], []),
    ("neutral sampled", dict(temperature=1.0, seed=9), [1], [2, 3]),
]


def _sequence(params: dict, prompt: list[int], output: list[int], logprobs: int | None) -> Sequence:
    seq = Sequence(list(prompt), SamplingParams(logprobs=logprobs, **params))
    seq.output_token_ids = list(output)
    return seq


@pytest.mark.parametrize("logprobs", [None, 0, 3])
@pytest.mark.parametrize("batch", [[i] for i in range(len(ROWS))] + [list(range(len(ROWS)))],
                         ids=[r[0] for r in ROWS] + ["whole table in one batch"])
def test_penalties_and_logprobs_match_plain_implementation(batch, logprobs):
    logits = torch.randn(len(ROWS), VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    seqs = [_sequence(*ROWS[i][1:], logprobs) for i in batch]
    rows = logits[batch]
    out = sample(rows, SamplingTensors.from_sequences(seqs, torch.device("cpu")))
    for b, seq in enumerate(seqs):
        want = reference_penalties(rows[b], seq.prompt_token_ids, seq.output_token_ids, seq.params)
        token = reference_token(want, seq)
        assert int(out.tokens[b]) == token
        if logprobs is None:
            assert out.logprobs is None
            continue
        want_logprobs = want.log_softmax(-1)
        torch.testing.assert_close(out.logprobs[b], want_logprobs[token], rtol=0, atol=1e-6)
        top = want_logprobs.sort(descending=True)
        assert out.top_ids[b].tolist() == top.indices[:logprobs].tolist()
        torch.testing.assert_close(out.top_logprobs[b], top.values[:logprobs], rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_penalties_and_logprobs_on_gpu():
    """The whole table on CUDA (Triton argmax of the penalised logits) equals the CPU result;
    logprobs to 1e-5 (GPU log-softmax sums in another order)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    logits = torch.randn(len(ROWS), VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    seqs = [_sequence(*row[1:], 3) for row in ROWS]
    cpu = sample(logits, SamplingTensors.from_sequences(seqs, torch.device("cpu")))
    gpu = sample(logits.cuda(), SamplingTensors.from_sequences(seqs, torch.device("cuda")))
    assert gpu.tokens.tolist() == cpu.tokens.tolist() and gpu.top_ids.tolist() == cpu.top_ids.tolist()
    torch.testing.assert_close(gpu.logprobs.cpu(), cpu.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(gpu.top_logprobs.cpu(), cpu.top_logprobs, rtol=0, atol=1e-5)


def test_neutral_rows_are_untouched_by_a_penalised_batch():
    """A row without penalties samples the same token alone and beside penalised rows, and greedy
    rows of a penalised batch ignore a (wrong) argmax passed in from the decode graph."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    seqs = [_sequence(*ROWS[i][1:], None) for i in (0, 1, 7)]
    together = sample(logits, SamplingTensors.from_sequences(seqs, torch.device("cpu")),
                      greedy=torch.zeros(3, dtype=torch.long)).tokens
    alone = [int(sample(logits[i:i + 1], SamplingTensors.from_sequences([s], torch.device("cpu"))).tokens)
             for i, s in enumerate(seqs)]
    assert together.tolist() == alone
    assert alone[1] == int(reference_penalties(logits[1], *ROWS[1][2:], seqs[1].params).argmax()) != 0


def test_to_host_unpacks_ids_and_values():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    seqs = [_sequence({}, [1], [], 2), _sequence({}, [1], [], 1)]
    out = sample(logits, SamplingTensors.from_sequences(seqs, torch.device("cpu")))
    tokens, rows = out.to_host()
    assert tokens == out.tokens.tolist()
    for b, (logprob, ids, values) in enumerate(rows):
        assert logprob == out.logprobs[b].item() and ids == out.top_ids[b].tolist()
        assert values == out.top_logprobs[b].tolist()
    assert sample(logits, SamplingTensors.from_sequences([_sequence({}, [1], [], None)] * 2,
                                                         torch.device("cpu"))).to_host()[1] is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\]"),
    (dict(frequency_penalty=float("nan")), r"frequency_penalty must be a number in \[-2, 2\]"),
    (dict(frequency_penalty="1"), r"frequency_penalty must be a number in \[-2, 2\], got str"),
    (dict(repetition_penalty=0), r"repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=-1.0), r"repetition_penalty must be a finite number > 0"),
    (dict(logprobs=-1), r"logprobs must be an integer in \[0, 21\)"),
    (dict(logprobs=21), r"logprobs must be an integer in \[0, 21\)"),
    (dict(logprobs=True), r"logprobs must be an integer in \[0, 21\), got bool True"),
])
def test_bad_penalty_and_logprob_params(kwargs, message):
    from mopt.errors import RequestError

    with pytest.raises(RequestError, match=message) as caught:
        SamplingParams(**kwargs)
    assert caught.value.field == next(iter(kwargs))


def test_choice_seeds_differ_and_repeat():
    params = choice_params(SamplingParams(seed=7, temperature=1.0), 3)
    assert [p.seed for p in params] == [7, choice_seed(7, 1), choice_seed(7, 2)]
    assert len({p.seed for p in params}) == 3
    assert [p.seed for p in choice_params(SamplingParams(seed=7), 3)] == [p.seed for p in params]
    assert all(p.seed is None for p in choice_params(SamplingParams(), 2))


# -- through LLM.generate -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from conftest import tiny_llama

    path = tmp_path_factory.mktemp("plain-llama-penalties")
    tiny_llama(256).save_pretrained(path)
    return LLM(path, device="cpu", block_size=4, kv_cache_memory=4 << 20)


def _cache_free_reference(model, prompt: list[int], params: SamplingParams, n: int):
    """Greedy decoding over the whole sequence without a cache, penalising each step's logits."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].float()
            penalised = reference_penalties(logits, prompt, ids[len(prompt):], params)
            token = int(penalised.argmax())
            logprobs.append(penalised.log_softmax(-1))
            ids.append(token)
    return ids[len(prompt):], logprobs


@pytest.mark.parametrize("penalties", [dict(), dict(repetition_penalty=1.8, frequency_penalty=0.6)],
                         ids=["plain", "penalised"])
def test_generate_logprobs_and_penalties_equal_cache_free_decoding(llm, penalties):
    prompt = [5, 17, 33, 17, 5]
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2, **penalties)
    out = llm.generate(prompt, params)[0]
    want_tokens, want_logprobs = _cache_free_reference(llm.model, prompt, params, 8)
    assert out.token_ids == want_tokens
    assert len(out.logprobs) == 8
    for token, got, want in zip(out.token_ids, out.logprobs, want_logprobs):
        assert got.chosen.token_id == token == got.top[0].token_id  # greedy: the most likely token
        assert abs(got.chosen.logprob - want[token].item()) < 1e-3
        assert [lp.token_id for lp in got.top] == want.topk(2).indices.tolist()
    if penalties:  # the penalty changed what greedy decoding does
        assert out.token_ids != llm.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids


def test_logprobs_only_when_asked(llm):
    assert llm.generate([1, 2, 3], SamplingParams(max_tokens=2))[0].logprobs is None
    out = llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=2, logprobs=0),
                                             SamplingParams(max_tokens=2, logprobs=4)])
    assert [len(p.top) for p in out[0].logprobs] == [0, 0] and [len(p.top) for p in out[1].logprobs] == [4, 4]


@pytest.mark.parametrize("penalised", [False, True], ids=["carried", "penalised (never carried)"])
def test_async_scheduling_changes_no_logprobs_or_penalties(llm, penalised):
    """With async scheduling (on here on the CPU) logprobs travel with their step's tokens, and a batch
    with a penalised request is not carried (its penalty needs the last token on the host): the
    outputs equal synchronous steps exactly."""
    prompts = [[5, 17, 33, 17, 5], [9, 8, 7], [1, 2, 3, 4]]
    params = [SamplingParams(max_tokens=9, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=7, ignore_eos=True, temperature=0.9, seed=3, logprobs=1),
              SamplingParams(max_tokens=9, ignore_eos=True, repetition_penalty=1.8 if penalised else 1.0)]
    async_llm = LLM(llm.path, device="cpu", block_size=4, kv_cache_memory=4 << 20, async_scheduling=True)
    carried_steps, launch = [], async_llm.runner.launch

    def counting_launch(seqs, is_prefill, carried=None):
        carried_steps.append(carried is not None)
        return launch(seqs, is_prefill, carried)

    async_llm.runner.launch = counting_launch
    want, got = llm.generate(prompts, params), async_llm.generate(prompts, params)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert (g.logprobs is None) == (w.logprobs is None)
        for a, b in zip(g.logprobs or [], w.logprobs or []):
            assert a.chosen == b.chosen and a.top == b.top
    assert any(carried_steps) != penalised


@pytest.mark.parametrize("vocab,ranks", [(320, 2), (321, 2), (10, 4), (5, 4)])
def test_vocabulary_parallel_greedy_keys_name_the_whole_rows_argmax(vocab, ranks):
    """Each rank's ``argmax_keys`` over its stretch of the vocabulary (as ``ParallelLMHead`` splits it:
    ceil(vocab / ranks) ids a rank, the last one shorter or empty), the largest key per row decoded by
    ``key_tokens``: ``argmax`` of the whole row, ties to the first id, whatever rank holds it."""
    from mopt.engine.sampler import argmax_keys, key_tokens

    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[0, :] = -2.0  # one tie over every rank: id 0
    logits[1, vocab - 1] = logits[1, vocab // 2] = 40.0  # a tie across ranks: the lower id
    logits[2] = -torch.rand(vocab, generator=torch.Generator().manual_seed(1)) - 5  # negatives only
    logits[3] = 0.0
    logits[3, 0] = -0.0  # equal to +0.0: still the first id
    logits[4, vocab - 1] = float("inf")
    per_rank = -(-vocab // ranks)
    keys = torch.stack([argmax_keys(logits[:, r * per_rank:(r + 1) * per_rank], r * per_rank) for r in range(ranks)])
    assert torch.equal(key_tokens(keys.max(dim=0).values), logits.argmax(dim=-1))
