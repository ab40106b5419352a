"""Per-input-channel smoothing (AWQ / SmoothQuant ``pre_quant_scale``) and SVDQuant's low-rank branch.

Mixins for linear methods, listed before the method's class (``class M(PreQuantScaleMixin,
SvdQuantLoraMixin, Method)``): they add the checkpoint tensors, check that fused shards agree, and
wrap ``apply``; the kernel underneath never sees them.

* :class:`PreQuantScaleMixin`: an optional ``pre_quant_scale`` ``[K]`` per shard (ModelOpt exports it
  only where it could not fold it into the preceding layer); ``x' = x * pre_quant_scale`` in ``x``'s
  dtype, as ModelOpt's input quantizer computes it. Such a layer never takes input quantized by the
  kernel before it (``takes_quantized_input`` is False): W4A8_AWQ's smoothed o_proj/down_proj run FP8
  kernels that could.
* :class:`SvdQuantLoraMixin`: ``lora_a`` ``[r, K]`` (one for all fused shards) and ``lora_b`` ``[N, r]``
  (rows per shard); ``y += (x' @ lora_a^T) @ lora_b^T`` in ``x``'s dtype, on the smoothed input.
"""

from __future__ import annotations

import torch

from mopt.layers.parameter import PartitionInputParameter, ShardCollectingParameter, WeightLoadError


def _settle(layer, name: str, value: torch.Tensor | None) -> None:
    """Swap a loader parameter for a plain buffer holding its processed value (or None)."""
    layer._parameters.pop(name, None)
    layer.register_buffer(name, value)


class PreQuantScaleMixin:
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)
        param = PartitionInputParameter(torch.ones(len(output_partition_sizes), input_size_per_partition),
                                        weight_loader=extra_weight_attrs.get("weight_loader"))
        param.optional = True
        layer.register_parameter("pre_quant_scale", param)

    def process_weights_after_loading(self, layer) -> None:
        scale = layer.pre_quant_scale.value()
        if scale is not None and not bool((scale > 0).all()):
            raise WeightLoadError(f"{layer.pre_quant_scale.mopt_name}: pre_quant_scale must be positive")
        _settle(layer, "pre_quant_scale", scale)
        super().process_weights_after_loading(layer)

    def takes_quantized_input(self, layer) -> bool:
        # input quantized by the layer before could not be smoothed: take the unquantized input
        return layer.pre_quant_scale is None and super().takes_quantized_input(layer)

    @staticmethod
    def _smoothed(layer, x: torch.Tensor) -> torch.Tensor:
        return x if layer.pre_quant_scale is None else x * layer.pre_quant_scale.to(x.dtype)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return super().apply(layer, self._smoothed(layer, x), bias)

    def apply_silu_gated(self, layer, x, bias, fp8_scale) -> torch.Tensor | None:
        if not self.fuses_silu(layer, x):
            return None  # no smoothing pass for nothing: apply smooths
        return super().apply_silu_gated(layer, self._smoothed(layer, x), bias, fp8_scale)


class SvdQuantLoraMixin:
    returns_kernel_output = False  # the low-rank branch is added to the kernel's output

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)
        loader, parts = extra_weight_attrs.get("weight_loader"), len(output_partition_sizes)
        layer.register_parameter("svdquant_lora_a", ShardCollectingParameter(parts, params_dtype, None, 1, loader))
        layer.register_parameter("svdquant_lora_b", ShardCollectingParameter(parts, params_dtype, 0, None, loader))

    def process_weights_after_loading(self, layer) -> None:
        a_parts, b_parts = layer.svdquant_lora_a.partitions(), layer.svdquant_lora_b.partitions()
        name = layer.svdquant_lora_a.mopt_name
        if any(a.shape != a_parts[0].shape or not torch.equal(a, a_parts[0]) for a in a_parts[1:]):
            raise WeightLoadError(f"{name}: fused shards have different lora_a; SVDQuant's export shares one")
        rank, k = a_parts[0].shape
        if k != layer.input_size_per_partition:
            raise WeightLoadError(f"{name}: lora_a has shape {tuple(a_parts[0].shape)}, expected [rank, "
                                  f"{layer.input_size_per_partition}]")
        for b, width in zip(b_parts, layer.logical_widths):
            if tuple(b.shape) != (width, rank):
                raise WeightLoadError(f"{layer.svdquant_lora_b.mopt_name}: lora_b has shape {tuple(b.shape)}, "
                                      f"expected ({width}, {rank})")
        _settle(layer, "svdquant_lora_a", a_parts[0])
        _settle(layer, "svdquant_lora_b", torch.cat(b_parts, dim=0))
        super().process_weights_after_loading(layer)

    def takes_quantized_input(self, layer) -> bool:
        return False  # the low-rank branch multiplies the unquantized input

    def apply_silu_gated(self, layer, x, bias, fp8_scale) -> None:
        return None  # the low-rank branch joins before the SiLU

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        a, b = layer.svdquant_lora_a.to(x.dtype), layer.svdquant_lora_b.to(x.dtype)
        low_rank = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
        return super().apply(layer, x, bias) + low_rank
