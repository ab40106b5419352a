"""Where the model hands partial sums to a norm, and the bounded teardown of a world's groups.

The ranks are threads of this process (``tp_helpers.ThreadGroup``) whose group offers a "fused"
all-reduce + RMSNorm (here the all-reduce followed by the reference norm, counted): a TP=2 model must
take it for the vocabulary-parallel embedding's rows (the first layer's norm) and after every o_proj and
every MLP -- 2 per decoder layer, counting the final norm -- except after a mixture-of-experts block with
a shared expert (Qwen2-MoE), which reduces its own output; its
logits equal one process's to float32 rounding. On GPUs the real kernel runs in ``tests/parallel/test_tp_gpu.py``.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from tp_helpers import ThreadGroup, _Member

from mopt.engine import tp_launch
from mopt.engine.distributed import ParallelState, parallel_state
from mopt.engine.loader import load_local_model
from mopt.kernels.glue import rms_norm_reference


class _FusingMember(_Member):
    calls: list

    def fused_rms_norm(self, x: torch.Tensor):
        def run(x, residual, weight, eps, fp8_scale=None, nvfp4_scale=None):
            self.calls.append(tuple(x.shape))
            total = self.all_reduce(x.clone())
            if residual is None:  # the first layer's norm, given the embedding's rows
                return rms_norm_reference(total, weight, eps, None, fp8_scale, nvfp4_scale), total
            return rms_norm_reference(total, weight, eps, residual, fp8_scale, nvfp4_scale)
        return run


def _llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config)


def _mixtral(layers: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=320, hidden_size=128, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, architectures=["MixtralForCausalLM"])
    return MixtralForCausalLM(config)


def _qwen2_moe(layers: int):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(vocab_size=320, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, architectures=["Qwen2MoeForCausalLM"])
    return Qwen2MoeForCausalLM(config)


@pytest.mark.parametrize("family,layers,fused_per_rank", [(_llama, 3, 7), (_mixtral, 2, 5), (_qwen2_moe, 2, 3)],
                         ids=["dense", "moe", "moe-shared-expert"])
def test_partial_sums_go_to_the_next_norm(tmp_path, monkeypatch, family, layers, fused_per_rank):
    monkeypatch.setenv("MOPT_BACKEND", "reference")
    torch.manual_seed(0)
    family(layers).save_pretrained(tmp_path)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        want = load_local_model(tmp_path, torch.device("cpu"), torch.float32)(ids)
    group = ThreadGroup(2)
    members, models = [_FusingMember(group, r) for r in range(2)], []
    for r, member in enumerate(members):  # built one after the other: the parallel state is per process
        member.calls = []
        with parallel_state(ParallelState(r, 2, member)):
            models.append(load_local_model(tmp_path, torch.device("cpu"), torch.float32))

    def rank(r: int):
        with torch.no_grad():
            return models[r](ids), members[r].calls

    (got, calls0), (_, calls1) = group.run(rank)
    assert len(calls0) == len(calls1) == fused_per_rank
    assert all(shape[-1] == 128 for shape in calls0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _StuckGroup:
    name, one_shot = "model", None

    def __init__(self) -> None:
        self.release = threading.Event()

    def shutdown(self) -> None:
        self.release.wait(30)


def test_a_shutdown_that_hangs_is_left_behind(monkeypatch, caplog):
    monkeypatch.setattr(tp_launch, "TEARDOWN_S", 0.2)
    stuck = _StuckGroup()
    world = tp_launch.World(0, 2, 0, torch.device("cpu"), None, ("127.0.0.1", 0), tp_launch.Timeouts())
    world.group, world.ctrl = stuck, None
    with caplog.at_level(logging.WARNING, logger="mopt.engine.tp_launch"):
        tp_launch.destroy_groups(world)
    stuck.release.set()
    assert world.group is None
    assert "did not finish within 0 s" in caplog.text
