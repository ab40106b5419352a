"""Mixture-of-experts methods: unquantized, ModelOpt FP8 (per-tensor) and ModelOpt NVFP4.

Each creates the stacked expert parameters in the checkpoint's dtypes (see ``layers.fused_moe``
for the layout), converts them once after loading into the canonical form of its
``mopt.kernels.moe.MoEScheme``, and runs the experts through the kernel ``kernels.moe`` selects
for the device (the reference expert loop anywhere, the Triton fused MoE on CUDA).

ModelOpt stores per expert and projection: ``weight``, ``weight_scale``, ``input_scale`` and for
NVFP4 ``weight_scale_2``. FP8 merges w1/w3 weight scales by re-quantizing both to the larger
one (one w13 scale per expert, as fused kernels need) and reduces input scales to their maximum
over experts (one static activation scale per GEMM). NVFP4 keeps each row's global scale and warns
when w1's and w3's differ (ModelOpt's export unifies them), and reduces input scales per expert.
"""

from __future__ import annotations

import logging

import torch

from mopt.errors import ModelConfigError
from mopt.kernels.moe import MoEKernel, MoEScheme, select_moe_kernel
from mopt.layers.expert_parameter import ExpertParameter
from mopt.layers.parameter import WeightLoadError
from mopt.quant.formats import fp8, nvfp4
from mopt.quant.methods.base import QuantizeMethodBase

logger = logging.getLogger(__name__)


def _param(layer, name: str, data: torch.Tensor, kind: str) -> None:
    layer.register_parameter(name, ExpertParameter(data, kind=kind, weight_loader=layer.weight_loader))


class FusedMoEMethodBase(QuantizeMethodBase):
    """Creates the experts' parameters, brings them to the canonical form of ``scheme`` (see
    ``mopt.kernels.moe``) and runs them through the kernel selected for the layer's device."""

    scheme: MoEScheme = MoEScheme.UNQUANTIZED

    def __init__(self) -> None:
        self.kernel: MoEKernel | None = None

    def select_kernel(self, layer, override: str | None = None) -> None:
        self.kernel = select_moe_kernel(self.scheme, layer.w13_weight.device, override)

    def apply(self, layer, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError(f"{layer.prefix}: weights were not processed after loading "
                               "(call process_weights_after_loading)")
        return self.kernel.apply(layer, self.scheme, x.reshape(-1, x.shape[-1]), weights, ids).reshape(x.shape)

    def _check_loaded(self, layer) -> None:
        for name, p in layer.named_parameters(recurse=False):
            if isinstance(p, ExpertParameter) and not p.loaded:
                missing = p.missing()
                raise WeightLoadError(f"{p.mopt_name}: checkpoint has no tensor for {', '.join(missing[:6])}"
                                 + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    def create_weights(self, layer, num_experts, hidden, inter, params_dtype) -> None:
        _param(layer, "w13_weight", torch.empty(num_experts, 2 * inter, hidden, dtype=params_dtype), "w13")
        _param(layer, "w2_weight", torch.empty(num_experts, hidden, inter, dtype=params_dtype), "w2")

    def process_weights_after_loading(self, layer) -> None:
        self._check_loaded(layer)
        self.select_kernel(layer)


class ModelOptFp8MoEMethod(FusedMoEMethodBase):
    scheme = MoEScheme.FP8_TENSOR
    # Tensor parallelism splits each expert's intermediate dimension (w2's K) into parts of this size.
    intermediate_split_multiple, intermediate_split_reason = 16, "FP8 GEMMs need K % 16 == 0"

    def __init__(self, quant_config, layer=None) -> None:
        super().__init__()
        self.quant_config = quant_config

    def create_weights(self, layer, num_experts, hidden, inter, params_dtype) -> None:
        e = num_experts
        _param(layer, "w13_weight", torch.empty(e, 2 * inter, hidden, dtype=fp8.FP8_DTYPE), "w13")
        _param(layer, "w2_weight", torch.empty(e, hidden, inter, dtype=fp8.FP8_DTYPE), "w2")
        _param(layer, "w13_weight_scale", torch.full((e, 2), torch.finfo(torch.float32).min), "w13")
        _param(layer, "w2_weight_scale", torch.full((e,), torch.finfo(torch.float32).min), "w2")
        # One activation scale per GEMM, the maximum over *all* experts: under expert parallelism every rank
        # reads every expert's input scales (scalars), so its activations quantize as one rank's would.
        total = getattr(layer, "total_num_experts", e)
        _param(layer, "w13_input_scale", torch.full((total, 2), torch.finfo(torch.float32).min), "w13")
        _param(layer, "w2_input_scale", torch.full((total,), torch.finfo(torch.float32).min), "w2")
        layer.w13_input_scale.global_experts = layer.w2_input_scale.global_experts = True

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
        self.select_kernel(layer)


class ModelOptNvFp4FusedMoE(FusedMoEMethodBase):
    scheme = MoEScheme.NVFP4

    def __init__(self, quant_config, layer=None) -> None:
        super().__init__()
        self.quant_config = quant_config
        self.group_size = getattr(quant_config, "group_size", nvfp4.BLOCK_SIZE)
        self.intermediate_split_multiple = self.group_size
        self.intermediate_split_reason = f"whole {self.group_size}-element blocks of w2's packed values and scales"

    def create_weights(self, layer, num_experts, hidden, inter, params_dtype) -> None:
        e, g = num_experts, self.group_size
        for dim, name in ((hidden, "hidden_size"), (inter, "intermediate_size")):
            if dim % g:
                raise ModelConfigError(f"{layer.prefix}: NVFP4 experts need {name} divisible by {g}, got {dim}")
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
        self.select_kernel(layer)
