"""Mixture-of-experts: routers and the ``FusedMoE`` layer with stacked expert weights.

Expert weights are stacked: ``w13 [E, 2I, H]`` (gate rows, then up rows: the gated activation is
``silu(x @ w1^T) * (x @ w3^T)``) and ``w2 [E, H, I]``. Checkpoints store one tensor per expert and
projection; the layer's ``weight_loader`` takes ``shard_id=(projection, expert)`` with projection
``"w1"`` (gate), ``"w3"`` (up) or ``"w2"`` (down). The router is a plain unquantized linear layer
outside this module; ``forward`` takes its logits.

Tensor parallelism (the parallel state the layer is built in): by default every rank holds every
expert with a slice of its intermediate dimension (w13's rows, w2's columns: column- then
row-parallel) and the ranks' outputs are summed by an all-reduce. With expert parallelism each rank
holds whole experts, ``E / tp`` of them; tokens are routed on every rank (activations are
replicated), each rank runs the (token, expert) pairs of its own experts (pairs of other ranks'
experts carry the id ``num_experts``, which kernels skip) and the all-reduce combines them.
Checkpoint tensors of other ranks' experts are never read, except the scalars a method reduces over
all experts (``ExpertParameter.global_experts``: FP8's static input scales take their maximum over
every expert, so each rank must quantize activations with the same scale one rank would).
"""

from __future__ import annotations

import torch
from torch import nn

from mopt.engine.distributed import all_reduce, current_parallel_state, divide, group_for
from mopt.kernels.route import local_expert_ids, softmax_topk
from mopt.layers.expert_parameter import ExpertParameter
from mopt.layers.parameter import WeightLoadError


def grouped_topk(logits: torch.Tensor, top_k: int, renormalize: bool, num_expert_group: int, topk_group: int,
                 scoring: str = "sigmoid", e_score_correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style routing: score experts (sigmoid or softmax), rank groups of experts by the sum
    of their two best biased scores (the best one without a bias), keep the ``topk_group`` best
    groups, pick ``top_k`` experts there by biased score, and weight them by their unbiased score."""
    scores = logits.float().sigmoid() if scoring == "sigmoid" else logits.float().softmax(dim=-1)
    t, e = scores.shape
    if e % num_expert_group:
        raise ValueError(f"{e} experts do not split into {num_expert_group} groups")
    choice = scores + e_score_correction_bias.float() if e_score_correction_bias is not None else scores
    grouped = choice.view(t, num_expert_group, -1)
    if e_score_correction_bias is not None:
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_score = grouped.amax(dim=-1)
    keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(topk_group, dim=-1).indices, 1.0)
    mask = keep.unsqueeze(-1).expand_as(grouped).reshape(t, e).bool()
    ids = choice.masked_fill(~mask, float("-inf")).topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * routed_scaling_factor, ids


class FusedMoE(nn.Module):
    """``forward(x [T, H], router_logits [T, E]) -> [T, H]``: routed experts, weighted and summed."""

    quant_kind = "moe"

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 params_dtype: torch.dtype = torch.float32, renormalize: bool = True, quant_config=None,
                 prefix: str = "", num_expert_group: int | None = None, topk_group: int | None = None,
                 scoring: str = "softmax", e_score_correction_bias: bool = False,
                 routed_scaling_factor: float = 1.0) -> None:
        super().__init__()
        from mopt.quant.methods.moe import UnquantizedFusedMoEMethod

        self.prefix = prefix
        self.top_k = top_k
        self.total_num_experts, self.total_intermediate_size = num_experts, intermediate_size
        self.hidden_size = hidden_size
        self.renormalize, self.scoring = renormalize, scoring
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts), requires_grad=False) if e_score_correction_bias else None
        )
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        self.quant_method = method or UnquantizedFusedMoEMethod()
        self._split(current_parallel_state())
        self.quant_method.create_weights(self, self.num_experts, hidden_size, self.intermediate_size, params_dtype)
        for name, param in self.named_parameters(recurse=False):
            param.mopt_name = f"{prefix}.{name}"
            if isinstance(param, ExpertParameter):
                offset = 0 if param.global_experts else self.expert_start
                param.tp_rank, param.tp_size, param.expert_offset = self.tp_rank, self.tp_size, offset

    def _split(self, state) -> None:
        """This rank's experts (``expert_start`` + ``num_experts``) and intermediate size (see module doc)."""
        self.expert_parallel = state.expert_parallel and state.tp_size > 1
        self.tp_group = group_for(state.tp_size)
        if self.expert_parallel:
            self.tp_rank, self.tp_size = 0, 1
            self.num_experts = divide(self.total_num_experts, state.tp_size,
                                      f"{self.prefix}: number of experts (expert parallelism)")
            self.expert_start = state.tp_rank * self.num_experts
            self.intermediate_size = self.total_intermediate_size
            return
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        if self.tp_group is not None:  # w2's input is split: per-token activation scales take the whole row's amax
            self.reduce_token_amax = lambda amax: all_reduce(amax, self.tp_group, op="max")
            self.token_fp8_over_peers = lambda x2: self.tp_group.per_token_fp8(x2)  # see RowParallelLinear
        self.num_experts, self.expert_start = self.total_num_experts, 0
        self.intermediate_size = divide(self.total_intermediate_size, state.tp_size,
                                        f"{self.prefix}: expert intermediate size",
                                        getattr(self.quant_method, "intermediate_split_multiple", 1),
                                        getattr(self.quant_method, "intermediate_split_reason", ""))

    def weight_loader(self, param: ExpertParameter, loaded: torch.Tensor, shard_id: tuple[str, int]) -> None:
        projection, expert = shard_id
        if not 0 <= expert < self.total_num_experts:
            raise WeightLoadError(f"{param.mopt_name}: expert {expert} out of range (the layer has "
                                  f"{self.total_num_experts})")
        if param.global_experts:
            param.load_expert(loaded, projection, expert)
            return
        expert -= self.expert_start
        if 0 <= expert < self.num_experts:  # else another rank's expert: not read
            param.load_expert(loaded, projection, expert)

    def select_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights float32 [T, k], ids [T, k])``: each token's experts, as ids of this rank's experts
        (other ranks' experts: ``num_experts``; see the module docstring)."""
        local = (self.expert_start, self.num_experts) if self.expert_parallel else None
        if self.num_expert_group:
            weights, ids = grouped_topk(router_logits, self.top_k, self.renormalize, self.num_expert_group,
                                        self.topk_group, self.scoring, self.e_score_correction_bias,
                                        self.routed_scaling_factor)
            return weights, local_expert_ids(ids, local)
        return softmax_topk(router_logits, self.top_k, self.renormalize, self.routed_scaling_factor, local)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """``reduce=False``: this rank's partial sums, for a caller that reduces them itself."""
        weights, ids = self.select_experts(router_logits)
        y = self.quant_method.apply(self, x, weights, ids)
        return all_reduce(y, self.tp_group) if reduce and self.tp_group is not None else y
