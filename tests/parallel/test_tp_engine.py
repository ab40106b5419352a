"""``mopt.LLM(..., tensor_parallel_size=2)``: greedy generation identical to one process, arguments
checked before anything starts, and ``mopt inspect -tp``."""

from __future__ import annotations

import pytest
import torch

from mopt import LLM, EngineArgumentError, SamplingParams
from mopt.engine import tp_runtime
from mopt.engine.distributed import TensorParallelSplitError
from tp_helpers import moe_export, tp_world_per_module  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("tp_world_per_module")

PROMPTS = [[5, 17, 33], list(range(40, 60)), [7] * 9]


GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
# Seeded sampling: only rank 0 samples; async scheduling: the next decode step takes its input ids from
# the device-side tokens of the step before, which every rank receives by broadcast.
SAMPLED = [SamplingParams(max_tokens=8 + 3 * i, ignore_eos=True, temperature=0.8, top_p=0.9, seed=i)
           for i in range(len(PROMPTS))]


def _tokens(llm, params=GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, params)]


def _dummy_config():
    """One KV head (replicated on both ranks), a vocabulary that does not divide by 2 (the last rank's
    rows padded) and tied embeddings (each rank's lm_head rows are its embedding rows)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=321, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                       tie_word_embeddings=True, architectures=["LlamaForCausalLM"])


CASES = ["fp8-kv llama", "nvfp4 qwen3_moe expert-parallel", "fp8 dummy", "fp8 dummy async sampled"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_generation_equals_one_process(case, export_factory, tmp_path_factory):
    """Prefill and decode steps (batched prompts of different lengths, paged KV cache split by heads)
    give the same tokens on 2 ranks as on one: greedy, and seeded sampling under async scheduling."""
    engine = dict(device="cpu", block_size=4, kv_cache_memory=4 << 20, max_num_seqs=4)
    params = SAMPLED if "sampled" in case else GREEDY
    if "async" in case:
        engine["async_scheduling"] = True
    if "dummy" in case:
        model, extra = _dummy_config(), dict(load_format="dummy", quantization="fp8")
    elif "moe" in case:
        model, extra = moe_export(tmp_path_factory, "nvfp4", "qwen3_moe"), dict(enable_expert_parallel=True)
    else:
        model, extra = export_factory("fp8-kv", 256).path, {}
    want = _tokens(LLM(model, **engine, **{k: v for k, v in extra.items() if k != "enable_expert_parallel"}), params)
    llm = LLM(model, **engine, **extra, tensor_parallel_size=2)
    carried = _count_carried(llm)
    assert _tokens(llm, params) == want
    assert (sum(carried) > 0) == ("async" in case)  # async: steps were queued on the device-side ids
    if case == "fp8 dummy":  # the engine's model also scores without a cache, on both ranks
        ids = torch.tensor([PROMPTS[1]])
        one = LLM(model, **engine, **extra)
        torch.testing.assert_close(llm.model(ids), one.model(ids), rtol=2e-6, atol=2e-5)


@pytest.mark.slow
def test_greedy_logprobs_gather_the_whole_vocabulary():
    """Greedy decode steps keep each rank's logits columns and agree on the argmax by one all-reduce of
    keys; a greedy step that asks for logprobs gathers the whole vocabulary (a vocabulary of 321 splits
    unevenly): tokens and logprobs equal one process's, logprobs to float32 rounding (2e-6 relative or 1e-5:
    the two logits are equal to rounding, and dummy weights put the top logprobs near -50)."""
    engine = dict(device="cpu", block_size=4, kv_cache_memory=4 << 20, max_num_seqs=4, load_format="dummy",
                  quantization="fp8")
    params = SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3)
    want = LLM(_dummy_config(), **engine).generate(PROMPTS, params)
    got = LLM(_dummy_config(), **engine, tensor_parallel_size=2).generate(PROMPTS, params)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert [t.token_id for t in x.top] == [t.token_id for t in y.top]
            assert x.chosen.logprob == pytest.approx(y.chosen.logprob, rel=2e-6, abs=1e-5)
            assert [t.logprob for t in x.top] == pytest.approx([t.logprob for t in y.top], rel=2e-6, abs=1e-5)


def test_a_runner_that_fails_on_rank_0_stops_the_world_and_the_next_model_starts_a_new_one(monkeypatch):
    """On GPUs the ranks capture CUDA graphs in step, running the model's collectives in each warm-up, so
    a rank 0 whose ``ModelRunner`` fails midway may leave the workers waiting inside one: the failure
    stops the world at once (workers gone), and the next model gets a new world that works."""
    from mopt.engine import llm as llm_module

    engine = dict(device="cpu", block_size=4, kv_cache_memory=4 << 20, max_num_seqs=4, load_format="dummy",
                  quantization="fp8")
    runner = llm_module.ModelRunner

    def failing(*args, **kwargs):
        raise RuntimeError("CUDA out of memory while capturing (a stand-in)")

    monkeypatch.setattr(llm_module, "ModelRunner", failing)
    with pytest.raises(RuntimeError, match="CUDA out of memory while capturing"):
        LLM(_dummy_config(), **engine, tensor_parallel_size=2)
    broken = tp_runtime._RUNTIME
    assert broken.failed and not any(p.is_alive() for p in broken.world.processes.values())
    monkeypatch.setattr(llm_module, "ModelRunner", runner)
    got = _tokens(LLM(_dummy_config(), **engine, tensor_parallel_size=2))
    assert tp_runtime._RUNTIME is not broken
    assert got == _tokens(LLM(_dummy_config(), **engine))


def _count_carried(llm) -> list[bool]:
    """Whether each step the engine launches carries input ids from the step before."""
    seen, launch = [], llm.runner.launch

    def counting(seqs, is_prefill, carried=None):
        seen.append(carried is not None)
        return launch(seqs, is_prefill, carried)

    llm.runner.launch = counting
    return seen


def test_an_unsplittable_model_fails_before_any_process_starts(monkeypatch):
    monkeypatch.setattr(tp_runtime, "runtime", lambda *a: pytest.fail("a tensor-parallel world was started"))
    config = _dummy_config()
    config.intermediate_size = 48  # NVFP4 down_proj: 24 columns per rank, not whole 16-element blocks
    with pytest.raises(TensorParallelSplitError, match=r"mlp\.down_proj: input size 48 splits into 24 per rank over "
                                                       r"tensor_parallel_size 2"):
        LLM(config, device="cpu", load_format="dummy", quantization="nvfp4", tensor_parallel_size=2)


@pytest.mark.slow
def test_a_real_export_that_cannot_split_is_refused_before_any_process_starts(tmp_path_factory, monkeypatch):
    """ModelOpt's FP8_PB_WO export of the tiny Qwen3-MoE: every projection is one 128x128 block."""
    from mopt.engine.loader import load_model

    path = moe_export(tmp_path_factory, "fp8-pb-wo", "qwen3_moe")
    monkeypatch.setattr(tp_runtime, "runtime", lambda *a: pytest.fail("a tensor-parallel world was started"))
    with pytest.raises(TensorParallelSplitError, match=r"model\.layers\.\*\.self_attn\.o_proj: input size 128 splits "
                                                       r"into 64 per rank over tensor_parallel_size 2; "
                                                       r"ModelOptFp8PbWoLinearMethod needs a multiple of 128"):
        load_model(path, tensor_parallel_size=2, enable_expert_parallel=True)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tensor_parallel_size=0), r"tensor_parallel_size must be an integer >= 1, got 0"),
    (dict(tensor_parallel_size=2.0), r"tensor_parallel_size must be an integer >= 1, got 2.0"),
    (dict(tensor_parallel_size=True), r"tensor_parallel_size must be an integer >= 1, got True"),
    (dict(enable_expert_parallel="yes"), r"enable_expert_parallel must be True or False, got 'yes'"),
])
def test_parallel_arguments_are_checked_first(kwargs, message, monkeypatch):
    monkeypatch.setattr(tp_runtime, "runtime", lambda *a: pytest.fail("a tensor-parallel world was started"))
    with pytest.raises(EngineArgumentError, match=message):
        LLM(_dummy_config(), device="cpu", load_format="dummy", **kwargs)


def test_torchrun_world_size_must_match(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(EngineArgumentError, match=r"tensor_parallel_size is 2 but this process runs under torchrun "
                                                  r"with WORLD_SIZE=4"):
        LLM(_dummy_config(), device="cpu", load_format="dummy", tensor_parallel_size=2)


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"], ["eval"], ["bench", "generate"],
                                     ["inspect"], ["serve"], ["bench", "serve"]])
def test_every_command_that_loads_a_model_takes_the_parallel_options(command):
    from mopt import cli

    args = cli.build_parser().parse_args([*command, "-tp", "2", "--enable-expert-parallel"])
    assert cli.parallel_kwargs(args) == dict(tensor_parallel_size=2, enable_expert_parallel=True)


def test_inspect_shows_rank_bytes_and_unsplittable_layers(export_factory, capsys):
    from mopt.cli import main

    path = str(export_factory("fp8-kv", 256).path)
    assert main(["inspect", path, "--tensor-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel 2 ranks" in out and "rank 1 " in out and "every layer splits" in out
    assert main(["inspect", path, "-tp", "3"]) == 0
    out = capsys.readouterr().out
    assert ("model.layers.*.self_attn.qkv_proj: number of attention heads (4) is not divisible by the "
            "tensor-parallel size 3 (2 layers)") in out


def test_bench_generate_names_the_world_it_measured(tmp_path, capsys):
    """A TP benchmark's title and JSON say how many ranks ran and how they summed (here gloo on CPUs; on GPUs
    the peer-memory path or NCCL and why, see test_one_shot.py)."""
    import json

    from mopt.cli import main

    config = tmp_path / "config.json"
    config.write_text(_dummy_config().to_json_string())
    out = tmp_path / "bench.json"
    assert main(["bench", "generate", "--dummy", str(config), "--format", "bf16", "--device", "cpu", "-tp", "2",
                 "--batch", "1", "--prompt-len", "4", "--tokens", "3", "--json", str(out)]) == 0
    assert "; tensor parallel: 2 ranks, gloo collectives" in capsys.readouterr().out
    assert json.loads(out.read_text())["tensor_parallel"] == "2 ranks, gloo collectives"
