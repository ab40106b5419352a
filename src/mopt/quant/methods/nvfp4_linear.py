"""ModelOpt NVFP4 linear method (W4A4).

Checkpoint tensors per linear layer (``W[N, K]``, K a multiple of 16): ``weight`` uint8
``[N, K/2]`` (two E2M1 codes a byte), ``weight_scale`` e4m3 ``[N, K/16]``, ``weight_scale_2``
fp32 ``[]`` and ``input_scale`` fp32 ``[]``. Fused layers load one set per shard. Activations are
quantized to NVFP4 at run time with the static global ``input_scale``;
``y = (x_values @ W_values^T) * input_scale * weight_scale_2`` where the values carry their
block scales.
"""

from __future__ import annotations

import logging

import torch

from mopt.errors import ModelConfigError
from mopt.kernels.linear import LinearScheme
from mopt.layers.parameter import ModelWeightParameter, WeightLoadError
from mopt.quant.formats import nvfp4
from mopt.quant.methods.base import ModelOptLinearMethodBase, replace_parameter, require_loaded
from mopt.quant.methods.fp8_linear import _check_partitions_loaded, _per_tensor, _record_shape

logger = logging.getLogger(__name__)


class ModelOptNvFp4LinearMethod(ModelOptLinearMethodBase):
    scheme = LinearScheme.NVFP4

    def __init__(self, quant_config) -> None:
        super().__init__(quant_config)
        self.group_size = getattr(quant_config, "group_size", nvfp4.BLOCK_SIZE)
        self.input_split_multiple = self.group_size
        self.input_split_reason = f"whole {self.group_size}-element blocks of packed values and block scales"

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
        params_dtype, **extra_weight_attrs,
    ) -> None:
        if not getattr(self.quant_config, "is_checkpoint_nvfp4_serialized", True):
            raise ValueError("NVFP4 needs an NVFP4-serialized checkpoint; dynamic quantization is not supported")
        if input_size_per_partition % self.group_size:
            raise ModelConfigError(
                f"{getattr(layer, 'prefix', '')}: NVFP4 needs in_features per partition to be a "
                f"multiple of {self.group_size}, got {input_size_per_partition}"
            )
        loader = extra_weight_attrs.get("weight_loader")
        _record_shape(layer, input_size_per_partition, output_partition_sizes)
        n, k = layer.output_size_per_partition, input_size_per_partition
        layer.register_parameter(
            "weight", ModelWeightParameter(torch.empty(n, k // 2, dtype=torch.uint8), weight_loader=loader)
        )
        layer.register_parameter(
            "weight_scale",
            ModelWeightParameter(
                torch.empty(n, k // self.group_size, dtype=torch.float8_e4m3fn), weight_loader=loader
            ),
        )
        _per_tensor(layer, "weight_scale_2", len(output_partition_sizes), loader)
        _per_tensor(layer, "input_scale", len(output_partition_sizes), loader)

    def process_weights_after_loading(self, layer) -> None:
        require_loaded(layer, "weight", "weight_scale")
        global_scales = _check_partitions_loaded(layer, "weight_scale_2")
        input_scales = _check_partitions_loaded(layer, "input_scale")
        if bool((input_scales <= 0).any()):
            raise WeightLoadError(f"{layer.input_scale.mopt_name}: input scales must be positive, got {input_scales.tolist()}")
        if not bool((input_scales == input_scales[0]).all()):
            logger.warning(
                "%s: fused shards have different input scales %s; using their maximum",
                layer.input_scale.mopt_name, input_scales.tolist(),
            )
        # Each shard keeps its own global scale (exact even when ModelOpt did not unify them).
        widths = torch.tensor(layer.logical_widths, device=global_scales.device)
        per_row = torch.repeat_interleave(global_scales, widths)
        replace_parameter(layer, "weight", layer.weight.data)
        replace_parameter(layer, "weight_scale", layer.weight_scale.data)
        replace_parameter(layer, "weight_scale_2", per_row.contiguous())
        replace_parameter(layer, "input_scale", input_scales.max().reshape(()).clone())
        self.select_kernel(layer)
