"""The unquantized linear method (excluded layers and unquantized checkpoints)."""

from __future__ import annotations

import torch

from mopt.layers.parameter import ModelWeightParameter
from mopt.quant.methods.base import LinearMethodBase, require_loaded


class UnquantizedLinearMethod(LinearMethodBase):
    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
        params_dtype, **extra_weight_attrs,
    ) -> None:
        layer.logical_widths = list(output_partition_sizes)
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = sum(output_partition_sizes)
        weight = ModelWeightParameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            weight_loader=extra_weight_attrs.get("weight_loader"),
        )
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer) -> None:
        require_loaded(layer, "weight")
        self.select_kernel(layer)
