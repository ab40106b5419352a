"""Sharded layers in one process: every rank's shard built in its parallel state (no process group), the
collectives done by hand, against the unsharded layer. Also the split rules and what a rank reads.

Tolerances: outputs that only concatenate shards are exact (``torch.equal``); sums over ranks (what the
all-reduce computes) equal the unsharded result to float32 rounding (rtol/atol 1e-5 at these sizes:
one extra float32 addition per element, in another order).
"""

from __future__ import annotations

import re

import pytest
import torch

from mopt.engine.distributed import ParallelState, TensorParallelSplitError, parallel_state
from mopt.engine.loader import build_model
from mopt.engine.tp_plan import check_split, shard_plan
from mopt.layers.basic import VocabEmbedding
from mopt.layers.fused_moe import FusedMoE
from mopt.layers.linear import ParallelLMHead, RowParallelLinear
from mopt.quant.config import ModelOptFp8Config, ModelOptNvFp4Config, config_from_dict
from mopt.quant.formats import fp8, nvfp4


def _in_rank(rank: int, size: int, build, expert_parallel: bool = False):
    with parallel_state(ParallelState(rank, size, None, expert_parallel)):
        return build()


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MOPT_BACKEND", "reference")


@pytest.mark.parametrize("vocab,tp", [(320, 2), (321, 2), (10, 4)])
def test_vocab_parallel_embedding_and_head_pad_the_last_rank(vocab, tp):
    """Each rank holds ceil(vocab/tp) rows (zeros past the vocabulary): lookups sum, logits concatenate."""
    weight = torch.randn(vocab, 8, generator=torch.Generator().manual_seed(vocab))
    ids = torch.tensor([[0, vocab - 1, vocab // 2, 1]])
    x = torch.randn(3, 8)
    lookups, logits = [], []
    for rank in range(tp):
        emb = _in_rank(rank, tp, lambda: VocabEmbedding(vocab, 8, torch.float32, "embed"))
        emb.weight.weight_loader(emb.weight, weight)
        assert emb.weight.loaded
        lookups.append(emb(ids))
        head = _in_rank(rank, tp, lambda: ParallelLMHead(8, vocab, prefix="lm_head", params_dtype=torch.float32))
        head.weight_loader(head.weight, weight)
        head.process_weights_after_loading()
        logits.append(head(x))
    assert torch.equal(sum(lookups), weight[ids])
    assert torch.equal(torch.cat(logits, -1)[:, :vocab], x @ weight.t())


def test_row_parallel_per_token_fp8_quantizes_under_the_whole_row_amax():
    """FP8_PER_CHANNEL_PER_TOKEN: each rank quantizes its slice of a token under the amax of the whole
    row (the MAX all-reduce ``reduce_token_amax`` stands for), so the ranks' sum is the unsharded output."""
    k, n = 256, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    q, s = fp8.quantize_per_channel(w)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    x[:, :k // 2] *= 10  # the two halves of each row have very different amaxes
    qc = ModelOptFp8Config("FP8_PER_CHANNEL_PER_TOKEN")

    def layer(rank, size):
        lin = RowParallelLinear(k, n, quant_config=qc, prefix="down", params_dtype=torch.float32, tp_rank=rank,
                                tp_size=size)
        lin.weight_loader(lin.weight, q)
        lin.weight_loader(lin.weight_scale, s)
        lin.process_weights_after_loading()
        return lin

    want = layer(0, 1)(x)
    row_amax = x.abs().amax(-1, keepdim=True)
    parts = []
    for rank in range(2):
        shard = layer(rank, 2)
        shard.reduce_token_amax = lambda amax: torch.maximum(amax, row_amax)
        parts.append(shard(x[:, rank * k // 2:(rank + 1) * k // 2]))
    torch.testing.assert_close(sum(parts), want, rtol=1e-5, atol=1e-5)
    unreduced = sum(layer(r, 2)(x[:, r * k // 2:(r + 1) * k // 2]) for r in range(2))
    assert not torch.allclose(unreduced, want, rtol=1e-5, atol=1e-5)  # what the all-reduce prevents


@pytest.mark.parametrize("reduce,over_peers,path", [(False, None, "local"), (True, None, "max all-reduce"),
                                                    (True, "declines", "max all-reduce"), (True, "takes", "peers")])
def test_layer_per_token_fp8_takes_the_peer_kernel_where_the_layer_offers_one(reduce, over_peers, path):
    """``kernels.linear.layer_per_token_fp8``: a layer without ``reduce_token_amax`` quantizes its rows alone; a
    row-parallel one through ``token_fp8_over_peers`` where that takes the rows (returns not None), else under the
    MAX all-reduce; the peer kernel's own bits are tested in ``tests/kernels/test_triton_peer_amax.py``."""
    from types import SimpleNamespace

    from mopt.kernels.linear import layer_per_token_fp8

    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    whole = x.abs().amax(-1, keepdim=True) * 3  # as if another rank's slice held larger values
    layer = SimpleNamespace()
    if reduce:
        layer.reduce_token_amax = lambda amax: torch.maximum(amax, whole)
    marker = (torch.zeros(1), torch.ones(1))
    if over_peers:
        layer.token_fp8_over_peers = lambda x2: marker if over_peers == "takes" else None
    got = layer_per_token_fp8(layer, x, lambda x2: fp8.quantize_per_token(x2))
    want = {"local": fp8.quantize_per_token(x), "max all-reduce": (fp8.quantize(x, whole / 448), whole / 448),
            "peers": marker}[path]
    assert torch.equal(got[0].view(torch.uint8) if got[0].dtype == fp8.FP8_DTYPE else got[0],
                       want[0].view(torch.uint8) if want[0].dtype == fp8.FP8_DTYPE else want[0])
    assert torch.equal(got[1], want[1])


def _moe(fmt: str, num_experts: int, hidden: int, inter: int):
    g = torch.Generator().manual_seed(7)
    qc = {"fp8": ModelOptFp8Config("FP8"), "nvfp4": ModelOptNvFp4Config()}.get(fmt)
    layer = FusedMoE(num_experts, 2, hidden, inter, quant_config=qc, prefix="model.layers.0.mlp.experts")
    for e in range(num_experts):
        for name, (rows, cols) in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            stacked = "w2" if name == "w2" else "w13"
            w = torch.randn(rows, cols, generator=g) * 0.1
            if fmt == "fp8":
                q, s = fp8.quantize_per_tensor(w)
                tensors = {"weight": q, "weight_scale": s, "input_scale": torch.tensor(0.01 + 0.001 * e)}
            elif fmt == "nvfp4":
                g2 = nvfp4.global_scale_from_amax(w.abs().max())
                q, s = nvfp4.quantize(w, g2)
                tensors = {"weight": q, "weight_scale": s, "weight_scale_2": g2,
                           "input_scale": torch.tensor(4.0 / 2688 * (1 + 0.1 * e))}
            else:
                tensors = {"weight": w}
            for suffix, t in tensors.items():
                layer.weight_loader(getattr(layer, f"{stacked}_{suffix}"), t, (name, e))
    layer.process_weights_after_loading()
    return layer


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("expert_parallel", [False, True])
@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_moe_shards_sum_to_the_whole_layer(fmt, expert_parallel, kernel):
    """Intermediate-split or expert-parallel shards (each loading only its slices or experts) add up to
    the unsharded layer, through the reference loop and the Triton fused MoE (interpreted; pairs
    routed to another rank's experts are skipped)."""
    if kernel == "triton":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernel runs interpreted on CPUs")
        from mopt.kernels.moe import TritonFusedMoEKernel
    num_experts, hidden, inter, tokens = 4, 64, 64, 9
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(tokens, num_experts, generator=torch.Generator().manual_seed(2))
    want = _moe(fmt, num_experts, hidden, inter)(x, logits)
    parts = []
    for rank in range(2):
        shard = _in_rank(rank, 2, lambda: _moe(fmt, num_experts, hidden, inter), expert_parallel)
        assert shard.num_experts == (2 if expert_parallel else 4)
        assert shard.intermediate_size == (64 if expert_parallel else 32)
        if kernel == "triton":
            shard.quant_method.kernel = TritonFusedMoEKernel()
        parts.append(shard(x, logits))
    torch.testing.assert_close(sum(parts), want, rtol=1e-5, atol=1e-5)


def _llama(**overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, architectures=["LlamaForCausalLM"])
    return LlamaConfig(**dict(fields, **overrides))


def _mixtral(**overrides):
    from transformers import MixtralConfig

    fields = dict(vocab_size=320, hidden_size=128, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                  architectures=["MixtralForCausalLM"])
    return MixtralConfig(**dict(fields, **overrides))


def _quant(fmt: str, exclude=("lm_head",)):
    section = {"fp8": {"quant_algo": "FP8"}, "fp8-pb-wo": {"quant_algo": "FP8_PB_WO"},
               "nvfp4": {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None}}[fmt]
    return config_from_dict({"producer": {"name": "modelopt"},
                             "quantization": dict(section, exclude_modules=list(exclude))}, fmt)


# (config, format, tp, expert parallel, the error: layer, sizes and tensor-parallel size)
SPLIT_ERRORS = [
    (_llama(hidden_size=64, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2), "nvfp4", 2, False,
     r"model\.layers\.\*\.mlp\.down_proj: input size 48 splits into 24 per rank over tensor_parallel_size 2; "
     r"ModelOptNvFp4LinearMethod needs a multiple of 16 per rank \(whole 16-element blocks"),
    (_llama(num_attention_heads=8, num_key_value_heads=8), "fp8-pb-wo", 8, False,
     r"model\.layers\.\*\.mlp\.down_proj: input size 512 splits into 64 per rank over tensor_parallel_size 8; "
     r"ModelOptFp8PbWoLinearMethod needs a multiple of 128 per rank \(whole 128x128 weight blocks"),
    (_llama(intermediate_size=40), "fp8", 2, False,
     r"down_proj: input size 40 splits into 20 per rank over tensor_parallel_size 2; ModelOptFp8LinearMethod "
     r"needs a multiple of 16 per rank \(the Hopper FP8 GEMV"),
    (_llama(num_attention_heads=6, num_key_value_heads=6, hidden_size=384), "fp8", 4, False,
     r"qkv_proj: number of attention heads \(6\) is not divisible by the tensor-parallel size 4"),
    (_llama(num_attention_heads=12, num_key_value_heads=4, hidden_size=768, intermediate_size=768), "fp8", 6, False,
     r"qkv_proj: tensor_parallel_size 6 is not a multiple of the 4 KV heads"),
    (_llama(vocab_size=321), "fp8-no-exclusions", 2, False,
     r"lm_head: vocabulary size 321 is not divisible by tensor_parallel_size 2 and a ModelOptFp8LinearMethod head "
     r"cannot be padded"),
    (_mixtral(intermediate_size=48), "nvfp4", 2, False,
     r"block_sparse_moe\.experts: expert intermediate size \(48\) splits into 24 per rank over tensor_parallel_size "
     r"2; each rank needs a multiple of 16 \(whole 16-element blocks"),
    (_mixtral(num_attention_heads=6, num_key_value_heads=3, hidden_size=96), "fp8", 3, True,
     r"experts: number of experts \(expert parallelism\) \(4\) is not divisible by the tensor-parallel size 3"),
]


@pytest.mark.parametrize("config,fmt,tp,expert_parallel,message", SPLIT_ERRORS)
def test_unsplittable_layers_are_named_with_sizes_and_tp_size(config, fmt, tp, expert_parallel, message):
    quant = _quant("fp8", exclude=()) if fmt == "fp8-no-exclusions" else _quant(fmt)
    with pytest.raises(TensorParallelSplitError, match=message):
        check_split(config, quant, tp, expert_parallel)
    plan = shard_plan(config, quant, tp, expert_parallel)  # inspect lists the same problem, loading nothing
    assert any(re.search(message, p) for p in plan.problems), plan.problems
    with pytest.raises(TensorParallelSplitError) as refused:  # the real build refuses at its first problem
        _in_rank(0, tp, lambda: build_model(config, quant, torch.device("meta"), torch.float32, "auto"),
                 expert_parallel)
    layer_any = lambda text: re.sub(r"\.layers\.\d+\.", ".layers.*.", text)  # noqa: E731
    assert any(layer_any(p).startswith(layer_any(str(refused.value))) for p in plan.problems), plan.problems


def test_plan_halves_the_sharded_bytes_and_replicates_kv_heads():
    """Two KV heads over 2 ranks: one each, everything but norms and scalar scales halves. One KV head
    over 2 ranks: replicated, so each rank holds exactly what it held with two (one head's k/v_proj
    and KV cache), though the unsharded model is smaller."""
    two, one = (shard_plan(_llama(num_key_value_heads=kv), _quant("fp8"), 2) for kv in (2, 1))
    assert not two.problems and not one.problems and len(two.rank_bytes) == 2
    assert 0.5 < two.rank_bytes[0] / two.total_bytes < 0.502
    whole = {kv: shard_plan(_llama(num_key_value_heads=kv), _quant("fp8"), 1) for kv in (2, 1)}
    assert two.kv_bytes_per_token == [whole[2].kv_bytes_per_token[0] // 2] * 2
    assert one.total_bytes < two.total_bytes and one.rank_bytes == two.rank_bytes
    assert one.kv_bytes_per_token == [whole[1].kv_bytes_per_token[0]] * 2


def test_a_rank_reads_only_its_slices(export_factory, monkeypatch):
    """Loading rank 1 of 2 reads about half the checkpoint: LazyTensor narrows before it reads."""
    from safetensors import safe_open

    from mopt.engine import lazy_tensor
    from mopt.engine.loader import load_local_model

    path = export_factory("fp8", 256).path
    with safe_open(path / "model.safetensors", "pt") as f:
        total = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    read = []
    materialize = lazy_tensor.LazyTensor.materialize
    monkeypatch.setattr(lazy_tensor.LazyTensor, "materialize",
                        lambda self: read.append(self.numel() * self.dtype.itemsize) or materialize(self))
    with parallel_state(ParallelState(1, 2, None)):
        load_local_model(path, torch.device("cpu"), torch.float32)
    assert 0.45 * total < sum(read) < 0.55 * total, (sum(read), total)
