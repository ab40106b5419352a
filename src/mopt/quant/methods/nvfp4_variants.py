"""The NVFP4 weight encoding's other ModelOpt algorithms (facts in ``mopt.quant.formats.nvfp4``).

* W4A16_NVFP4: ``weight`` uint8 ``[N, K/2]``, ``weight_scale`` e4m3 ``[N, K/16]``, ``weight_scale_2``
  fp32 ``[]``; unquantized activations. Runs as ``NVFP4_WO``.
* W4A8_NVFP4_FP8: ``weight_scale`` e4m3 ``[N, K/32]`` (group 32), ``weight_scale_2`` fp32 ``[]``
  (``amax / 448``), ``input_scale`` fp32 ``[]``; static FP8 activations. Runs as ``W4A8_NVFP4``.
* NVFP4_AWQ: NVFP4 (W4A4) with an optional ``pre_quant_scale``.
* NVFP4_SVD: NVFP4 with ``pre_quant_scale`` and the low-rank branch ``svdquant_lora_a/b``.

Each shard keeps its own ``weight_scale_2`` (one per output row), as the NVFP4 method does.
"""

from __future__ import annotations

import math

import torch

from mopt.kernels.linear import LinearScheme
from mopt.layers.parameter import ModelWeightParameter
from mopt.quant.formats import fp8, nvfp4
from mopt.quant.methods.base import ModelOptLinearMethodBase, replace_parameter, require_loaded
from mopt.quant.methods.fp8_linear import _check_partitions_loaded, _per_tensor, _record_shape
from mopt.quant.methods.int_linear import static_input_scale
from mopt.quant.methods.nvfp4_linear import ModelOptNvFp4LinearMethod
from mopt.quant.methods.smoothing import PreQuantScaleMixin, SvdQuantLoraMixin


class _Fp4WeightsBase(ModelOptLinearMethodBase):
    """Packed E2M1 weights with E4M3 block scales of ``group_size`` and a global scale per shard."""

    default_group_size = nvfp4.BLOCK_SIZE
    static_fp8_input = False

    def __init__(self, quant_config) -> None:
        super().__init__(quant_config)
        self.group_size = getattr(quant_config, "group_size", None) or self.default_group_size
        self.input_split_multiple = math.lcm(self.group_size, 32)
        self.input_split_reason = f"whole {self.group_size}-element blocks; the Triton weight-decoding GEMM needs K % 32 == 0"

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        g = self.group_size
        if input_size_per_partition % g:
            raise ValueError(f"{getattr(layer, 'prefix', '')}: FP4 blocks of {g} need in_features per partition "
                             f"divisible by {g}, got {input_size_per_partition}")
        loader = extra_weight_attrs.get("weight_loader")
        _record_shape(layer, input_size_per_partition, output_partition_sizes)
        n, k = layer.output_size_per_partition, input_size_per_partition
        layer.register_parameter("weight", ModelWeightParameter(torch.empty(n, k // 2, dtype=torch.uint8),
                                                                weight_loader=loader))
        layer.register_parameter("weight_scale", ModelWeightParameter(
            torch.empty(n, k // g, dtype=fp8.FP8_DTYPE), weight_loader=loader))
        _per_tensor(layer, "weight_scale_2", len(output_partition_sizes), loader)
        if self.static_fp8_input:
            _per_tensor(layer, "input_scale", len(output_partition_sizes), loader)

    def process_weights_after_loading(self, layer) -> None:
        require_loaded(layer, "weight", "weight_scale")
        global_scales = _check_partitions_loaded(layer, "weight_scale_2")
        widths = torch.tensor(layer.logical_widths, device=global_scales.device)
        if self.static_fp8_input:
            replace_parameter(layer, "input_scale", static_input_scale(layer))
        replace_parameter(layer, "weight", layer.weight.data)
        replace_parameter(layer, "weight_scale", layer.weight_scale.data)
        replace_parameter(layer, "weight_scale_2", torch.repeat_interleave(global_scales, widths).contiguous())
        self.select_kernel(layer)


class ModelOptNvFp4W4A16LinearMethod(_Fp4WeightsBase):
    """W4A16_NVFP4: NVFP4 weights, unquantized activations."""

    scheme = LinearScheme.NVFP4_WO


class ModelOptNvFp4W4A8LinearMethod(_Fp4WeightsBase):
    """W4A8_NVFP4_FP8: NVFP4 weights in 32-element blocks, static FP8 activations."""

    scheme = LinearScheme.W4A8_NVFP4
    default_group_size = 32
    static_fp8_input = True


class ModelOptNvFp4AwqLinearMethod(PreQuantScaleMixin, ModelOptNvFp4LinearMethod):
    """NVFP4_AWQ: NVFP4 W4A4 on AWQ-smoothed inputs."""


class ModelOptNvFp4SvdQuantLinearMethod(PreQuantScaleMixin, SvdQuantLoraMixin, ModelOptNvFp4LinearMethod):
    """NVFP4_SVD: NVFP4 W4A4 on smoothed inputs plus a BF16 low-rank branch."""
