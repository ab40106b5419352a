"""Mixture-of-experts methods: unquantized, ModelOpt FP8 (per-tensor) and ModelOpt NVFP4.

Each creates the stacked expert parameters in the checkpoint's dtypes (see ``layers.fused_moe``
for the layout), converts them once after loading, and runs the experts either through the
reference GEMMs of ``mopt.kernels.reference`` (any device: tokens grouped by expert, each expert's
gated MLP on its tokens, results added back weighted by the router) or, on CUDA for BF16 and FP8,
through the Triton fused-MoE GEMMs of ``mopt.kernels.triton_moe`` (BF16, FP8, and NVFP4 as exact
W4A4 on BF16 tensor cores).

ModelOpt stores per expert and projection: ``weight``, ``weight_scale``, ``input_scale`` and for
NVFP4 ``weight_scale_2``. FP8 merges w1/w3 weight scales by re-quantizing both to the larger
one (one w13 scale per expert, as fused kernels need) and reduces input scales to their maximum
over experts (one static activation scale per GEMM). NVFP4 keeps each row's global scale and warns
when w1's and w3's differ (ModelOpt's export unifies them), and reduces input scales per expert.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from mopt.kernels import reference
from mopt.layers.parameter import ExpertParameter
from mopt.quant.formats import fp8, nvfp4
from mopt.quant.methods.base import QuantizeMethodBase

logger = logging.getLogger(__name__)


def _param(layer, name: str, data: torch.Tensor, kind: str) -> None:
    layer.register_parameter(name, ExpertParameter(data, kind=kind, weight_loader=layer.weight_loader))


def run_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, expert_mlp) -> torch.Tensor:
    """Reference routing: ``expert_mlp(e, x_e) -> [n_e, H]`` for each expert with tokens."""
    x2 = x.reshape(-1, x.shape[-1])
    t, k = ids.shape
    out = torch.zeros(x2.shape, dtype=torch.float32, device=x.device)
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1).float()
    token = torch.arange(t, device=x.device).repeat_interleave(k)
    for e in flat_ids.unique().tolist():
        sel = flat_ids == e
        rows = token[sel]
        out.index_add_(0, rows, expert_mlp(e, x2[rows]).float() * flat_w[sel, None])
    return out.to(x.dtype).reshape(x.shape)


def _gated(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


def _triton_moe_available(x: torch.Tensor, need: tuple[int, int]) -> bool:
    """The Triton fused-MoE path runs on CUDA unless ``MOPT_BACKEND=reference`` asks otherwise."""
    if not x.is_cuda or os.environ.get("MOPT_BACKEND") == "reference":
        return False
    if torch.cuda.get_device_capability(x.device) < need:
        return False
    try:
        import mopt.kernels.triton_moe  # noqa: F401
    except ImportError:
        return False
    return True


class FusedMoEMethodBase(QuantizeMethodBase):
    gpu_capability: tuple[int, int]  # what the Triton fused path (``fused``) needs

    def fused(self, layer, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def gemm13(self, layer, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def gemm2(self, layer, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def apply(self, layer, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if _triton_moe_available(x, self.gpu_capability):
            return self.fused(layer, x.reshape(-1, x.shape[-1]), weights, ids).reshape(x.shape)
        return run_experts(x, weights, ids, lambda e, xe: self.gemm2(layer, e, _gated(self.gemm13(layer, e, xe))))

    def _check_loaded(self, layer) -> None:
        for name, p in layer.named_parameters(recurse=False):
            if isinstance(p, ExpertParameter) and not p.loaded:
                missing = p.missing()
                raise ValueError(f"{p.mopt_name}: checkpoint has no tensor for {', '.join(missing[:6])}"
                                 + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    gpu_capability = (8, 0)

    def fused(self, layer, x, weights, ids):
        from mopt.kernels.triton_moe import fused_moe

        return fused_moe(x, weights, ids, layer.w13_weight, layer.w2_weight)

    def create_weights(self, layer, num_experts, hidden, inter, params_dtype) -> None:
        _param(layer, "w13_weight", torch.empty(num_experts, 2 * inter, hidden, dtype=params_dtype), "w13")
        _param(layer, "w2_weight", torch.empty(num_experts, hidden, inter, dtype=params_dtype), "w2")

    def process_weights_after_loading(self, layer) -> None:
        self._check_loaded(layer)

    def gemm13(self, layer, e, x):
        return reference.unquantized_gemm(x, layer.w13_weight[e])

    def gemm2(self, layer, e, x):
        return reference.unquantized_gemm(x, layer.w2_weight[e])


class ModelOptFp8MoEMethod(FusedMoEMethodBase):
    gpu_capability = (8, 9)

    def __init__(self, quant_config, layer=None) -> None:
        self.quant_config = quant_config

    def fused(self, layer, x, weights, ids):
        from mopt.kernels.triton_moe import fused_moe

        return fused_moe(x, weights, ids, layer.w13_weight, layer.w2_weight, layer.a13_scale.reshape(1),
                         layer.w13_scale, layer.a2_scale.reshape(1), layer.w2_scale)

    def create_weights(self, layer, num_experts, hidden, inter, params_dtype) -> None:
        e = num_experts
        _param(layer, "w13_weight", torch.empty(e, 2 * inter, hidden, dtype=fp8.FP8_DTYPE), "w13")
        _param(layer, "w2_weight", torch.empty(e, hidden, inter, dtype=fp8.FP8_DTYPE), "w2")
        _param(layer, "w13_weight_scale", torch.full((e, 2), torch.finfo(torch.float32).min), "w13")
        _param(layer, "w2_weight_scale", torch.full((e,), torch.finfo(torch.float32).min), "w2")
        _param(layer, "w13_input_scale", torch.full((e, 2), torch.finfo(torch.float32).min), "w13")
        _param(layer, "w2_input_scale", torch.full((e,), torch.finfo(torch.float32).min), "w2")

    def process_weights_after_loading(self, layer) -> None:
        self._check_loaded(layer)
        inter = layer.intermediate_size
        w13, scales = layer.w13_weight.data, []
        for e in range(layer.num_experts):
            scale, w13[e] = fp8.requantize_with_max_scale(w13[e], layer.w13_weight_scale.data[e], [inter, inter])
            scales.append(scale)
        layer.w13_scale = torch.stack(scales)
        layer.w2_scale = layer.w2_weight_scale.data.float()
        layer.a13_scale = layer.w13_input_scale.data.float().max()
        layer.a2_scale = layer.w2_input_scale.data.float().max()

    def gemm13(self, layer, e, x):
        return reference.fp8_tensor_gemm(x, layer.w13_weight[e], layer.w13_scale[e], layer.a13_scale)

    def gemm2(self, layer, e, x):
        return reference.fp8_tensor_gemm(x, layer.w2_weight[e], layer.w2_scale[e], layer.a2_scale)


class ModelOptNvFp4FusedMoE(FusedMoEMethodBase):
    gpu_capability = (8, 0)

    def __init__(self, quant_config, layer=None) -> None:
        self.quant_config = quant_config
        self.group_size = getattr(quant_config, "group_size", nvfp4.BLOCK_SIZE)

    def fused(self, layer, x, weights, ids):
        from mopt.kernels.triton_moe import fused_moe_nvfp4

        return fused_moe_nvfp4(x, weights, ids, layer.w13_weight, layer.w13_weight_scale, layer.w13_global,
                               layer.a13_global, layer.w2_weight, layer.w2_weight_scale, layer.w2_global,
                               layer.a2_global)

    def create_weights(self, layer, num_experts, hidden, inter, params_dtype) -> None:
        e, g = num_experts, self.group_size
        for dim, name in ((hidden, "hidden_size"), (inter, "intermediate_size")):
            if dim % g:
                raise ValueError(f"{layer.prefix}: NVFP4 experts need {name} divisible by {g}, got {dim}")
        _param(layer, "w13_weight", torch.empty(e, 2 * inter, hidden // 2, dtype=torch.uint8), "w13")
        _param(layer, "w2_weight", torch.empty(e, hidden, inter // 2, dtype=torch.uint8), "w2")
        _param(layer, "w13_weight_scale", torch.empty(e, 2 * inter, hidden // g, dtype=fp8.FP8_DTYPE), "w13")
        _param(layer, "w2_weight_scale", torch.empty(e, hidden, inter // g, dtype=fp8.FP8_DTYPE), "w2")
        for name, shape, kind in (("w13_weight_scale_2", (e, 2), "w13"), ("w2_weight_scale_2", (e,), "w2"),
                                  ("w13_input_scale", (e, 2), "w13"), ("w2_input_scale", (e,), "w2")):
            _param(layer, name, torch.empty(shape, dtype=torch.float32), kind)

    def process_weights_after_loading(self, layer) -> None:
        self._check_loaded(layer)
        ws2 = layer.w13_weight_scale_2.data.float()
        if not torch.equal(ws2[:, 0], ws2[:, 1]):
            logger.warning("%s: w1_weight_scale_2 must match w3_weight_scale_2; accuracy may be affected "
                           "in kernels that take one (mopt keeps each row's own)", layer.prefix)
        layer.w13_global = ws2.repeat_interleave(layer.intermediate_size, dim=1)
        layer.w2_global = layer.w2_weight_scale_2.data.float()[:, None].expand(-1, layer.hidden_size).contiguous()
        layer.a13_global = layer.w13_input_scale.data.float().amax(dim=1)
        layer.a2_global = layer.w2_input_scale.data.float()

    def gemm13(self, layer, e, x):
        return reference.nvfp4_gemm(x, layer.w13_weight[e], layer.w13_weight_scale[e], layer.w13_global[e],
                                    layer.a13_global[e])

    def gemm2(self, layer, e, x):
        return reference.nvfp4_gemm(x, layer.w2_weight[e], layer.w2_weight_scale[e], layer.w2_global[e],
                                    layer.a2_global[e])
