"""Mixture-of-experts decoders: Qwen3-MoE, Qwen2-MoE (shared expert with its gate), Mixtral.

Attention is the Llama family's; the feed-forward block of sparse layers is a router (an
unquantized linear layer, as ModelOpt leaves it) feeding a :class:`FusedMoE`. Per-expert checkpoint
tensors (``mlp.experts.N.gate_proj.weight``; Mixtral: ``block_sparse_moe.experts.N.w1.weight``)
load into the stacked expert parameters through ``expert_projections``.
"""

from __future__ import annotations

import torch
from torch import nn

from mopt.errors import ModelConfigError
from mopt.layers.fused_moe import FusedMoE
from mopt.layers.linear import ReplicatedLinear
from mopt.models import validate
from mopt.models.llama import LlamaForCausalLM, LlamaMLP


class SparseMoeBlock(nn.Module):
    def __init__(self, config, quant_config, prefix: str, params_dtype, num_experts: int, top_k: int,
                 intermediate_size: int, renormalize: bool, shared_intermediate_size: int = 0) -> None:
        super().__init__()
        h = config.hidden_size
        self.gate = ReplicatedLinear(h, num_experts, quant_config=None, prefix=f"{prefix}.gate",
                                     params_dtype=params_dtype)
        self.experts = FusedMoE(num_experts, top_k, h, intermediate_size, params_dtype, renormalize,
                                quant_config, prefix=f"{prefix}.experts")
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            self.shared_expert = LlamaMLP(config, quant_config, f"{prefix}.shared_expert", params_dtype,
                                          shared_intermediate_size)
            self.shared_expert_gate = ReplicatedLinear(h, 1, quant_config=None, prefix=f"{prefix}.shared_expert_gate",
                                                       params_dtype=params_dtype)

    @property
    def partial_output(self) -> bool:
        """Whether ``forward(x, reduce=False)`` can hand partial sums to the next norm: not with a shared
        expert, whose gated output is added after the experts' sum."""
        return self.shared_expert is None

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = self.experts(x2, self.gate(x2), reduce=reduce or self.shared_expert is not None)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x2)) * self.shared_expert(x2)
        return y.reshape(x.shape)


def _check_top_k(config, source: str, experts_field: str) -> None:
    experts = getattr(config, experts_field)
    if experts and config.num_experts_per_tok > experts:
        raise ModelConfigError(f"{source}: num_experts_per_tok ({config.num_experts_per_tok}) must be at most "
                               f"{experts_field} ({experts})")


class MoeFamily(LlamaForCausalLM):
    """What the mixture-of-experts families share: experts compute SiLU only (the fused kernels
    have it built in) and have no biases."""

    activations = ("silu", "swish")
    mlp_bias = False


class Qwen3MoeForCausalLM(MoeFamily):
    qk_norm = True
    sliding_window_rule = "all_layers"
    expert_projections = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    shared_expert = False
    config_fields = {"num_experts": validate.non_negative_int, "num_experts_per_tok": validate.positive_int,
                     "moe_intermediate_size": validate.positive_int, "decoder_sparse_step": validate.positive_int,
                     "norm_topk_prob": validate.boolean, "mlp_only_layers": validate.index_list}

    @classmethod
    def validate_config(cls, config, source: str) -> None:
        _check_top_k(config, source, "num_experts")

    def make_mlp(self, config, quant_config, layer, params_dtype):
        experts = getattr(config, "num_experts", 0)
        step = getattr(config, "decoder_sparse_step", 1) or 1
        if not experts or layer in (getattr(config, "mlp_only_layers", None) or []) or (layer + 1) % step:
            return None
        shared = getattr(config, "shared_expert_intermediate_size", 0) if self.shared_expert else 0
        return SparseMoeBlock(config, quant_config, f"model.layers.{layer}.mlp", params_dtype, experts,
                              config.num_experts_per_tok, config.moe_intermediate_size,
                              bool(getattr(config, "norm_topk_prob", False)), shared)


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    qk_norm = False
    qkv_bias, o_bias = "qkv_bias", False
    sliding_window_rule = "layer_types"
    shared_expert = True
    config_fields = {**Qwen3MoeForCausalLM.config_fields, "qkv_bias": validate.boolean,
                     "shared_expert_intermediate_size": validate.positive_int}


class MixtralForCausalLM(MoeFamily):
    qkv_bias = o_bias = False
    sliding_window_rule = "all_layers"
    expert_projections = {"w1": "w1", "w3": "w3", "w2": "w2"}
    module_renames = {"block_sparse_moe": "mlp"}
    config_fields = {"num_local_experts": validate.positive_int, "num_experts_per_tok": validate.positive_int}

    @classmethod
    def validate_config(cls, config, source: str) -> None:
        _check_top_k(config, source, "num_local_experts")

    def make_mlp(self, config, quant_config, layer, params_dtype):
        return SparseMoeBlock(config, quant_config, f"model.layers.{layer}.block_sparse_moe", params_dtype,
                              config.num_local_experts, config.num_experts_per_tok, config.intermediate_size,
                              renormalize=True)
