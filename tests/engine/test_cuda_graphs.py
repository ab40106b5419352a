"""Decode over static, padded buffers (what CUDA graphs replay), run eagerly on the CPU; graphs on the GPU.

Padding rows (slot -1, sequence length 0) must neither write the cache nor change real rows: padded
batched decoding equals unpadded decoding token for token, and the cache holds the same bytes.
On the GPU, graphs on and off give identical greedy tokens for BF16, FP8 and NVFP4 models.
"""

from __future__ import annotations

import pytest
import torch

from mopt import LLM, SamplingParams
from mopt.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from mopt.engine.block_manager import blocks_needed

PROMPTS = [[5, 17, 33], list(range(40, 70)), [7] * 9, list(range(100, 117)), [3, 1, 4, 1, 5]]


@pytest.mark.parametrize("max_num_seqs,sizes", [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (20, [1, 2, 4, 8, 16, 20]), (64, [1, 2, 4, 8, 16, 32, 48, 64]),
    (100, [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]),
])
def test_graph_batch_sizes(max_num_seqs, sizes):
    assert graph_batch_sizes(max_num_seqs) == sizes


def test_bucket_choice_and_overflow():
    graphs = DecodeGraphs(lambda *a: None, torch.device("cpu"), 20, 4, capture=False, pad=True)
    assert [graphs.bucket(b) for b in (1, 2, 3, 5, 9, 16, 17, 20)] == [1, 2, 4, 8, 16, 16, 20, 20]
    with pytest.raises(ValueError, match="max_num_seqs 20"):
        graphs.bucket(21)
    assert DecodeGraphs(lambda *a: None, torch.device("cpu"), 20, 4, capture=False).bucket(3) == 3


def _llm(path, padded: bool, **kw) -> LLM:
    llm = LLM(path, device="cpu", block_size=4, kv_cache_memory=4 << 20, max_num_seqs=8, **kw)
    if padded:
        runner = llm.runner
        runner.graphs = DecodeGraphs(runner._decode_forward, runner.device, 8,
                                     blocks_needed(llm.max_model_len, runner.block_size), capture=False, pad=True)
    return llm


@pytest.mark.parametrize("checkpoint", ["plain", "fp8-kv"])
def test_padded_decode_equals_unpadded(checkpoint, plain_path, export_factory):
    path = plain_path if checkpoint == "plain" else export_factory("fp8-kv", 256).path
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    plain, padded = _llm(path, False), _llm(path, True)
    # 5 sequences decode in a bucket of 8; as they finish at different lengths the batch shrinks.
    per_prompt = [SamplingParams(max_tokens=4 + 2 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    assert [o.token_ids for o in padded.generate(PROMPTS, per_prompt)] == \
        [o.token_ids for o in plain.generate(PROMPTS, per_prompt)]
    assert [o.token_ids for o in padded.generate(PROMPTS[:3], params)] == \
        [o.token_ids for o in plain.generate(PROMPTS[:3], params)]
    assert padded.scheduler.blocks.num_free == padded.scheduler.blocks.num_blocks


def test_padding_rows_write_nothing_and_attend_to_nothing():
    """The static buffers a padded step sees: real rows as given, padding rows slot -1 and length 0."""
    import numpy as np

    from mopt.kernels.paged_attention import paged_attention, write_kv

    seen = {}

    def forward(ids, positions, meta):
        seen.update(ids=ids.clone(), positions=positions.clone(), slots=meta.slot_mapping.clone(),
                    lens=meta.seq_lens.clone(), tables=meta.block_tables.clone(), qsl=meta.query_start_loc.clone())
        return torch.zeros(len(ids), 7), torch.zeros(len(ids), dtype=torch.long)

    graphs = DecodeGraphs(forward, torch.device("cpu"), 8, 5, capture=False, pad=True)
    arrays = dict(ids=np.array([11, 12, 13], np.int32), positions=np.array([4, 0, 9], np.int32),
                  slots=np.array([20, 33, 9], np.int32), seq_lens=np.array([5, 1, 10], np.int32))
    tables = np.array([[5, 0, 0], [8, 0, 0], [2, 9, 0]], np.int32)
    logits, greedy = graphs.run(arrays, tables)
    assert logits.shape == (3, 7) and greedy.shape == (3,)
    assert seen["ids"].tolist() == [11, 12, 13, 0] and seen["slots"].tolist() == [20, 33, 9, -1]
    assert seen["lens"].tolist() == [5, 1, 10, 0] and seen["qsl"].tolist() == [0, 1, 2, 3, 4]
    # An eager step sees only the block-table columns in use (a captured graph sees all 5).
    assert seen["tables"][:3].tolist() == tables.tolist() and seen["tables"].shape == (4, 3)
    # What the reference kernels do with such rows: no write for slot -1, zeros for length 0.
    cache = torch.randn(4, 4, 2, 8)
    before = cache.clone()
    write_kv(torch.ones(2, 2, 8), torch.ones(2, 2, 8), cache, cache.clone(), torch.tensor([-1, 3]), 1.0, 1.0)
    assert torch.equal(cache.view(-1, 2, 8)[3], torch.ones(2, 8)) and torch.equal(cache.view(-1, 2, 8)[4:], before.view(-1, 2, 8)[4:])
    out = paged_attention(torch.randn(2, 2, 8), cache, cache, torch.tensor([[0], [1]]), torch.tensor([2, 0]),
                          torch.tensor([0, 1, 2]), 1, 0.3)
    assert torch.count_nonzero(out[1]) == 0 and not torch.isnan(out).any()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "fp8-kv", "nvfp4"])
def test_graphs_on_and_off_identical_gpu(fmt):
    from conftest import graphs_and_eager_gpu

    graphs, eager = graphs_and_eager_gpu(fmt, max_model_len=256)
    assert graphs.runner.graphs.graphs and not eager.runner.graphs.graphs
    prompts = [[(7 * i + 3 * j) % 300 for j in range(5 + 3 * i)] for i in range(11)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in graphs.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama-fp8-kv", "qwen3-nvfp4", "llama-nvfp4-kv", "qwen3_moe-fp8", "mixtral-nvfp4"])
def test_graphs_on_and_off_identical_real_exports_gpu(name):
    """Real tiny ModelOpt exports (made on a CPU by tests/make_gpu_exports.py, read from $MOPT_TEST_EXPORTS)."""
    import os
    from pathlib import Path

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    root = os.environ.get("MOPT_TEST_EXPORTS")
    path = Path(root) / name if root else None
    if path is None or not (path / "config.json").exists():
        pytest.skip("set MOPT_TEST_EXPORTS to a folder written by tests/make_gpu_exports.py")
    kw = dict(device="cuda", max_model_len=128, max_num_seqs=8, kv_cache_memory=32 << 20)
    prompts = [[(5 * i + 7 * j) % 300 for j in range(3 + 4 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    graphs, eager = LLM(path, **kw), LLM(path, enforce_eager=True, **kw)
    assert graphs.runner.graphs.graphs and graphs.runner.prefill_graphs is not None
    assert [o.token_ids for o in graphs.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]
