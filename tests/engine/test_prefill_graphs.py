"""Short prefills over static, padded buffers (what prefill CUDA graphs replay), run eagerly on the CPU.

Padding tokens (slot -1, in no sequence) and padding sequences (no tokens, length 0) must neither write
the cache nor change real rows: padded prefills give the unpadded logits (float32: the same kernels on
more rows, 1e-5 relative for matmuls blocked differently by row count), greedy generation is token for
token the same, and the cache ends up holding the same values. On the GPU, ``test_cuda_graphs.py``'s
graphs-on/off tests cover the captured prefill graphs too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mopt import LLM, SamplingParams
from mopt.engine.block_manager import blocks_needed
from mopt.engine.prefill_graphs import MAX_SEQS, TOKEN_BUCKETS, PrefillGraphs
from mopt.layers.attention import AttentionMetadata

PROMPTS = [[5, 17, 33], list(range(40, 70)), [7] * 9, list(range(100, 117)), [3, 1, 4, 1, 5]]


def _graphs(forward=lambda *a: None, max_num_seqs=20, max_model_len=64, blocks=16) -> PrefillGraphs:
    return PrefillGraphs(forward, torch.device("cpu"), max_num_seqs, max_model_len, blocks, capture=False)


@pytest.mark.parametrize("n,b,max_num_seqs,max_model_len,bucket", [
    (1, 1, 20, 64, 16), (16, 1, 20, 64, 16), (17, 3, 20, 64, 32), (100, 8, 20, 64, 128),
    (257, MAX_SEQS, 20, 64, 512), (2048, 1, 20, 2048, 2048), (2049, 1, 20, 4096, None),
    (40, MAX_SEQS + 1, 20, 64, None), (10, 4, 3, 64, None), (10, 3, 3, 64, 16),
    # 3 sequences of at most 64 tokens bring at most 192: no bucket above 256 is made.
    (200, 3, 3, 64, 256), (300, 3, 3, 64, None),
])
def test_bucket_choice(n, b, max_num_seqs, max_model_len, bucket):
    assert TOKEN_BUCKETS == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert _graphs(max_num_seqs=max_num_seqs, max_model_len=max_model_len).bucket(n, b) == bucket


def test_buckets_end_at_the_most_tokens_a_step_can_bring():
    assert _graphs(max_num_seqs=3, max_model_len=64).sizes == [16, 32, 64, 128, 256]
    assert _graphs(max_num_seqs=1, max_model_len=16).sizes == [16]
    assert _graphs(max_num_seqs=1, max_model_len=17).sizes == [16, 32]
    assert _graphs(max_num_seqs=64, max_model_len=4096).sizes == list(TOKEN_BUCKETS)


@pytest.mark.parametrize("lengths,max_num_seqs,max_model_len,runs", [
    ([128] * 32, 64, 4096, [(0, 16), (16, 32)]),  # two full graphs
    ([128] * 33, 64, 4096, None),  # past two largest buckets: eager
    ([16] * 64, 64, 4096, [(0, 16), (16, 32), (32, 48), (48, 64)]),
    ([1] * 17, 64, 4096, [(0, 16), (16, 17)]),  # one token past a graph's width
    ([1000, 1000, 1000, 48], 64, 4096, [(0, 2), (2, 4)]),  # by tokens: 2000 then 1048
    ([2048, 5], 64, 4096, [(0, 1), (1, 2)]),
    ([2049], 64, 4096, None),  # a prompt no graph takes: eager
    ([1100] * 3, 64, 4096, None),  # a run each, padded to 3 x 2048
    # 20 sequences of at most 64 tokens: buckets up to 1024; 16 x 60 fits one, 16 x 64 does not.
    ([60] * 20, 20, 64, [(0, 16), (16, 20)]),
    ([64] * 20, 20, 64, [(0, 16), (16, 20)]),
])
def test_plan_cuts_a_prefill_into_runs_that_fit_graphs(lengths, max_num_seqs, max_model_len, runs):
    starts = np.concatenate([[0], np.cumsum(lengths)])
    assert _graphs(max_num_seqs=max_num_seqs, max_model_len=max_model_len).plan(starts) == runs


def test_plan_leaves_a_step_with_a_failed_bucket_to_eager():
    graphs = _graphs(max_num_seqs=64, max_model_len=4096)
    starts = np.concatenate([[0], np.cumsum([128] * 20)])
    assert graphs.plan(starts) == [(0, 16), (16, 20)]
    graphs.failed[512] = "out of memory"
    assert graphs.plan(starts) is None


def _step(ids, positions, slots, lens, tables) -> tuple[torch.Tensor, AttentionMetadata]:
    """A prefill's ``(tokens [3, n], meta)`` as the runner hands them to ``PrefillGraphs.run``."""
    tokens = torch.tensor(np.stack([ids, positions, slots]), dtype=torch.int32)
    starts = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=tokens[2], block_tables=torch.tensor(tables, dtype=torch.int32),
                             seq_lens=torch.tensor(lens, dtype=torch.int32), query_start_loc=starts,
                             max_query_len=max(lens))
    return tokens, meta


def test_static_buffers_of_a_padded_prefill():
    seen = {}

    def forward(ids, positions, meta, last_rows):
        seen.update(ids=ids.clone(), positions=positions.clone(), slots=meta.slot_mapping.clone(),
                    lens=meta.seq_lens.clone(), qsl=meta.query_start_loc.clone(), tables=meta.block_tables.clone(),
                    last=last_rows.clone(), max_query_len=meta.max_query_len)
        return torch.arange(len(last_rows) * 3, dtype=torch.float32).view(len(last_rows), 3)

    graphs = _graphs(forward, blocks=4)
    positions = [0, 1, 2] + list(range(17))
    slots = [20, 21, 22] + list(range(8, 25))
    logits = graphs.run(*_step(np.arange(11, 31), positions, slots, [3, 17], [[5, 0], [2, 7]]))
    assert logits.tolist() == [[0, 1, 2], [3, 4, 5]]  # the real sequences' rows, a copy
    assert seen["max_query_len"] == 32 and seen["ids"][:20].tolist() == list(range(11, 31))
    assert seen["positions"][:20].tolist() == positions
    assert seen["slots"].tolist() == slots + [-1] * 12
    assert seen["qsl"].tolist() == [0, 3, 20] + [20] * (MAX_SEQS - 2)
    assert seen["lens"].tolist() == [3, 17] + [0] * (MAX_SEQS - 2)
    assert seen["last"].tolist() == [2, 19] + [0] * (MAX_SEQS - 2)
    assert seen["tables"][:2, :2].tolist() == [[5, 0], [2, 7]]
    # A smaller prefill after it: stale rows of the first are padding again, and no row it gathers lies
    # past its 16-token bucket (the larger step's last row, 19, would; on a GPU an out-of-range gather
    # is a device-side assert that ends the process).
    graphs.run(*_step([9], [0], [4], [1], [[1]]))
    assert seen["slots"].tolist() == [4] + [-1] * 15 and seen["qsl"].tolist() == [0] + [1] * MAX_SEQS
    assert seen["lens"].tolist() == [1] + [0] * (MAX_SEQS - 1)
    assert seen["last"].tolist() == [0] * MAX_SEQS
    # Longer than the largest bucket (16 sequences of 64 tokens: 1024): eager.
    assert graphs.run(*_step(np.arange(1025), np.arange(1025), np.arange(1025), [1025], [[1]])) is None


def _llm(source, padded: bool, **kw) -> LLM:
    llm = LLM(source, device="cpu", block_size=4, kv_cache_memory=4 << 20, max_num_seqs=8, **kw)
    if padded:
        runner = llm.runner
        runner.prefill_graphs = PrefillGraphs(runner._forward, runner.device, 8, llm.max_model_len,
                                              blocks_needed(llm.max_model_len, runner.block_size), capture=False)
    return llm


@pytest.mark.parametrize("checkpoint", ["plain", "fp8-kv", "moe-fp8-dummy"])
def test_padded_prefill_equals_unpadded(checkpoint, plain_path, export_factory):
    """Mixture-of-experts layers route the padding tokens too (``moe-fp8-dummy``: a tiny Qwen3-MoE with
    random FP8 experts); their pairs must not change the real tokens' rows."""
    kw = {}
    if checkpoint == "moe-fp8-dummy":
        from mopt.engine.dummy import tiny_moe_preset_config

        path, kw = tiny_moe_preset_config(), dict(load_format="dummy", quantization="fp8", dtype=torch.float32)
    else:
        path = plain_path if checkpoint == "plain" else export_factory("fp8-kv", 256).path
    plain, padded = _llm(path, False, **kw), _llm(path, True, **kw)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in padded.generate(PROMPTS, params)] == \
        [o.token_ids for o in plain.generate(PROMPTS, params)]
    # The logits and the cache of one prefill step of three prompts, side by side.
    runners = []
    for llm in (plain, padded):
        seqs = [llm._make_sequence(p, params) for p in PROMPTS[:3]]
        for s in seqs:
            llm.scheduler.add(s)
        scheduled, is_prefill = llm.scheduler.schedule()
        assert is_prefill and len(scheduled) == 3
        runners.append((llm.runner.step_logits(scheduled, True), llm.runner))
    (want, one), (got, two) = runners
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    for a, b in zip(one.model.modules(), two.model.modules()):
        if getattr(a, "k_cache", None) is not None:
            assert torch.allclose(b.k_cache.float(), a.k_cache.float(), rtol=1e-5, atol=1e-6)
            assert torch.allclose(b.v_cache.float(), a.v_cache.float(), rtol=1e-5, atol=1e-6)


def test_a_run_of_prefills_of_every_size_equals_unpadded(plain_path):
    """Static buffers keep what the step before wrote (ids, positions, slots, block tables, query starts,
    last rows): prefills of 1 to 8 prompts, long and short, in an order that shrinks and grows both the
    prompt count and the bucket, give the unpadded engine's tokens. A stale entry that a smaller step
    read (a row past its bucket, a slot, a sequence) would change a token or raise."""
    plain, padded = _llm(plain_path, False), _llm(plain_path, True)
    rng = np.random.default_rng(5)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for count, longest in [(8, 60), (1, 3), (5, 40), (2, 70), (8, 5), (1, 90), (3, 17), (6, 33)]:
        prompts = [rng.integers(0, 320, rng.integers(1, longest + 1)).tolist() for _ in range(count)]
        assert [o.token_ids for o in padded.generate(prompts, params)] == \
            [o.token_ids for o in plain.generate(prompts, params)], (count, longest)


def test_prefills_too_wide_or_too_long_for_one_graph_run_in_parts(plain_path, monkeypatch):
    """More prompts than a graph holds (``MAX_SEQS``), and more tokens than the largest bucket: the
    step runs as several padded runs (``PrefillGraphs.run_in_parts``), with the unpadded engine's tokens
    and logits."""
    def llm(padded):
        out = LLM(plain_path, device="cpu", block_size=4, kv_cache_memory=16 << 20, max_num_seqs=MAX_SEQS + 6,
                  max_num_batched_tokens=4096)
        if padded:
            runner = out.runner
            runner.prefill_graphs = PrefillGraphs(runner._forward, runner.device, MAX_SEQS + 6, out.max_model_len,
                                                  blocks_needed(out.max_model_len, runner.block_size), capture=False)
        return out

    plain, padded = llm(False), llm(True)
    assert padded.runner.prefill_graphs.sizes[-1] == 2048
    parts = []
    real = PrefillGraphs.run_in_parts

    def spy(self, tokens, meta, starts):
        out = real(self, tokens, meta, starts)
        parts.append(None if out is None else len(self.plan(starts)))
        return out

    monkeypatch.setattr(PrefillGraphs, "run_in_parts", spy)
    rng = np.random.default_rng(7)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for prompts in ([rng.integers(0, 320, rng.integers(1, 40)).tolist() for _ in range(MAX_SEQS + 5)],
                    [rng.integers(0, 320, 230).tolist() for _ in range(10)]):  # 2300 tokens
        assert [o.token_ids for o in padded.generate(prompts, params)] == \
            [o.token_ids for o in plain.generate(prompts, params)]
    assert parts == [2, 2]
    # One such step's logits side by side.
    logits, prompts = [], [rng.integers(0, 320, 9).tolist() for _ in range(MAX_SEQS + 2)]
    for engine in (plain, padded):
        for s in [engine._make_sequence(p, params) for p in prompts]:
            engine.scheduler.add(s)
        scheduled, is_prefill = engine.scheduler.schedule()
        assert is_prefill and len(scheduled) == MAX_SEQS + 2
        logits.append(engine.runner.step_logits(scheduled, True))
    want, got = logits
    assert got.shape == want.shape and ((got - want).norm() / want.norm()).item() <= 1e-5


def test_the_start_up_eager_run_takes_the_widest_and_longest_steps_and_writes_nothing(plain_path):
    seqs = MAX_SEQS + 3
    engine = LLM(plain_path, device="cpu", block_size=4, kv_cache_memory=16 << 20, max_num_seqs=seqs)
    runner, seen = engine.runner, []

    def forward(ids, positions, meta, last_rows):
        seen.append((meta.seq_lens.tolist(), meta.slot_mapping.unique().tolist(), last_rows.tolist()))
        return runner._forward(ids, positions, meta, last_rows)

    graphs = PrefillGraphs(forward, runner.device, seqs, engine.max_model_len,
                           blocks_needed(engine.max_model_len, runner.block_size), capture=False)
    top, most = graphs.sizes[-1], engine.max_model_len
    caches = [(m.k_cache.clone(), m.v_cache.clone()) for m in runner.model.modules() if getattr(m, "k_cache", None) is not None]
    graphs.warm_eager(seqs)
    want = []
    for b, length in [(seqs, -(-(2 * top + 1) // seqs)), (MAX_SEQS + 1, -(-(2 * top + 1) // (MAX_SEQS + 1))),
                      (1, top + 1)]:
        length = min(length, most)
        want.append(([length] * b, [-1], [length * (i + 1) - 1 for i in range(b)]))
    assert seen == want
    after = [(m.k_cache, m.v_cache) for m in runner.model.modules() if getattr(m, "k_cache", None) is not None]
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(caches, after))


class _FailingSync:
    rank = 1

    def wait(self, event):
        raise AssertionError("not reached: the run failed before its wait")


@pytest.mark.parametrize("sync", [None, _FailingSync()], ids=["alone", "tensor-parallel"])
def test_a_failed_start_up_eager_run_warns_alone_and_stops_a_tensor_parallel_world(sync, caplog):
    from mopt.engine.distributed import TensorParallelError

    def forward(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    graphs = _graphs(forward, max_num_seqs=20, max_model_len=64)
    if sync is None:
        graphs.warm_eager(20)
        assert "the eager prefill run at start-up failed (CUDA out of memory" in caplog.text
    else:
        with pytest.raises(TensorParallelError, match=r"rank 1: the eager prefill run at start-up failed \(CUDA out"):
            graphs.warm_eager(20, sync)


def test_reference_attention_gives_padding_rows_zeros():
    from mopt.kernels.paged_attention import paged_attention

    cache = torch.randn(4, 4, 2, 8)
    q = torch.randn(5, 2, 8)
    table, lens, starts = torch.tensor([[0, 1]]), torch.tensor([3]), torch.tensor([0, 3])
    out = paged_attention(q, cache, cache, table, lens, starts, 16, 0.3)
    assert torch.equal(out[:3], paged_attention(q[:3], cache, cache, table, lens, starts, 3, 0.3))
    assert torch.count_nonzero(out[3:]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8-kv", "nvfp4"])
def test_prefill_graphs_on_and_off_identical_gpu(fmt, moe):
    """Captured prefill graphs (up to MAX_SEQS prompts, 2048 tokens) against eager steps: the same greedy tokens,
    for prefills in one bucket, several buckets, and ones too wide or too long for a graph."""
    from conftest import graphs_and_eager_gpu

    graphs, eager = graphs_and_eager_gpu(fmt, max_model_len=320, max_num_seqs=MAX_SEQS + 8, moe=moe,
                                         max_num_batched_tokens=4096)
    assert sorted(graphs.runner.prefill_graphs.graphs) == list(TOKEN_BUCKETS)
    assert eager.runner.prefill_graphs is None
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for prompts in ([[(7 * j + 3) % 300 for j in range(5)]],
                    [[(7 * i + 3 * j) % 300 for j in range(5 + 9 * i)] for i in range(MAX_SEQS)],
                    [[(5 * i + j) % 300 for j in range(3 + i)] for i in range(MAX_SEQS + 3)],
                    [list(range(1, 290))],
                    [[(3 * i + j) % 300 + 1 for j in range(300)] for i in range(8)]):  # 2400 tokens
        assert [o.token_ids for o in graphs.generate(prompts, params)] == \
            [o.token_ids for o in eager.generate(prompts, params)]
