"""ModelOpt integer linear methods: W4A16_AWQ, W4A8_AWQ (INT4 groups), W8A16 and W8A8_SQ_PER_CHANNEL (INT8).

Checkpoint tensors per linear layer (``W[N, K]``; formats in ``mopt.quant.formats.int4`` / ``int8``):

* W4A16_AWQ: ``weight`` uint8 ``[N/2, K]`` (rows packed in pairs), ``weight_scale`` fp32 ``[N, K/g]``,
  optional ``pre_quant_scale`` fp32 ``[K]``. Runs as ``INT4_WO`` (repacked along K once).
* W4A8_AWQ: as W4A16_AWQ plus ``weight_scale_2`` fp32 ``[]`` and ``input_scale`` fp32 ``[]``. The
  weights are widened once to their effective FP8 codes (``int4.w4a8_fp8_weight``) and run as the
  per-tensor ``FP8_TENSOR`` scheme: 1 byte per weight at run time instead of 0.5 (a kernel that
  widens INT4 to FP8 in registers would keep 0.5).
* W8A16: ``weight`` int8 ``[N, K]``, ``weight_scale`` fp32 ``[N]``. Runs as ``INT8_WO``.
* W8A8_SQ_PER_CHANNEL: as W8A16 plus ``input_scale`` fp32 ``[]`` and ``pre_quant_scale`` fp32
  ``[K]``. Runs as ``INT8_SQ``.

Fused layers (q/k/v, gate/up) load one set per shard; per-tensor scales of shards are kept per
row (weights) or reduced to their maximum (static activation scales; ModelOpt's export already
unifies them).
"""

from __future__ import annotations

import torch

from mopt.kernels.linear import LinearScheme
from mopt.layers.parameter import (ChannelQuantScaleParameter, ModelWeightParameter, PackedRowsWeightParameter,
                                   WeightLoadError)
from mopt.quant.formats import int4
from mopt.quant.methods.base import ModelOptLinearMethodBase, replace_parameter, require_loaded
from mopt.quant.methods.fp8_linear import _check_partitions_loaded, _per_tensor, _record_shape
from mopt.quant.methods.smoothing import PreQuantScaleMixin

INT4_GROUP_SIZE = 128


def per_row(layer, values: torch.Tensor) -> torch.Tensor:
    """One value per shard -> one per output row (a scalar when all shards agree)."""
    if bool((values == values[0]).all()):
        return values[0].reshape(()).clone()
    widths = torch.tensor(layer.logical_widths, device=values.device)
    return torch.repeat_interleave(values, widths).contiguous()


def static_input_scale(layer) -> torch.Tensor:
    scales = _check_partitions_loaded(layer, "input_scale")
    if bool((scales <= 0).any()):
        raise WeightLoadError(f"{layer.input_scale.mopt_name}: input scales must be positive, got {scales.tolist()}")
    return scales.max().reshape(()).clone()


class _Int4AwqBase(ModelOptLinearMethodBase):
    output_split_multiple, output_split_reason = 2, "INT4 rows are packed in pairs"

    def __init__(self, quant_config) -> None:
        super().__init__(quant_config)
        self.group_size = getattr(quant_config, "group_size", None) or INT4_GROUP_SIZE
        self.input_split_multiple = self.group_size
        self.input_split_reason = f"whole {self.group_size}-element INT4 groups"

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        prefix, g = getattr(layer, "prefix", ""), self.group_size
        if input_size_per_partition % g:
            raise ValueError(f"{prefix}: INT4 groups of {g} need in_features per partition divisible by {g}, "
                             f"got {input_size_per_partition}")
        if any(size % 2 for size in output_partition_sizes):
            raise ValueError(f"{prefix}: INT4 rows are packed in pairs; shard sizes {output_partition_sizes} must "
                             "be even")
        loader = extra_weight_attrs.get("weight_loader")
        _record_shape(layer, input_size_per_partition, output_partition_sizes)
        n, k = layer.output_size_per_partition, input_size_per_partition
        layer.register_parameter("weight", PackedRowsWeightParameter(torch.empty(n // 2, k, dtype=torch.uint8),
                                                                     weight_loader=loader))
        layer.register_parameter("weight_scale", ModelWeightParameter(torch.empty(n, k // g), weight_loader=loader))


class _W4A16(_Int4AwqBase):
    scheme = LinearScheme.INT4_WO

    def process_weights_after_loading(self, layer) -> None:
        require_loaded(layer, "weight", "weight_scale")
        replace_parameter(layer, "weight", int4.rows_to_k(layer.weight.data))
        replace_parameter(layer, "weight_scale", layer.weight_scale.data.float().contiguous())
        self.select_kernel(layer)


class _W4A8(_Int4AwqBase):
    scheme = LinearScheme.FP8_TENSOR

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)
        loader = extra_weight_attrs.get("weight_loader")
        _per_tensor(layer, "weight_scale_2", len(output_partition_sizes), loader)
        _per_tensor(layer, "input_scale", len(output_partition_sizes), loader)

    def process_weights_after_loading(self, layer) -> None:
        require_loaded(layer, "weight", "weight_scale")
        fp8_scales = _check_partitions_loaded(layer, "weight_scale_2")
        q, group_scale = int4.unpack_rows(layer.weight.data), layer.weight_scale.data.float()
        codes, start = [], 0
        for width, scale2 in zip(layer.logical_widths, fp8_scales):
            rows = slice(start, start + width)
            codes.append(int4.w4a8_fp8_weight(q[rows], group_scale[rows], scale2))
            start += width
        replace_parameter(layer, "weight", torch.cat(codes))
        replace_parameter(layer, "weight_scale", per_row(layer, fp8_scales))
        replace_parameter(layer, "input_scale", static_input_scale(layer))
        del layer.weight_scale_2
        self.select_kernel(layer)


class _Int8Base(ModelOptLinearMethodBase):
    input_split_multiple, input_split_reason = 32, "the Triton weight-decoding GEMM needs K % 32 == 0"

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        loader = extra_weight_attrs.get("weight_loader")
        _record_shape(layer, input_size_per_partition, output_partition_sizes)
        n, k = layer.output_size_per_partition, input_size_per_partition
        layer.register_parameter("weight", ModelWeightParameter(torch.empty(n, k, dtype=torch.int8),
                                                                weight_loader=loader))
        layer.register_parameter("weight_scale", ChannelQuantScaleParameter(torch.empty(n), weight_loader=loader))

    def process_weights_after_loading(self, layer) -> None:
        require_loaded(layer, "weight", "weight_scale")
        replace_parameter(layer, "weight", layer.weight.data)
        replace_parameter(layer, "weight_scale", layer.weight_scale.data.float().clone())
        self.select_kernel(layer)


class ModelOptInt8WeightOnlyLinearMethod(_Int8Base):
    """W8A16: INT8 per-channel weights, unquantized activations."""

    scheme = LinearScheme.INT8_WO


class _W8A8Sq(_Int8Base):
    scheme = LinearScheme.INT8_SQ

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)
        _per_tensor(layer, "input_scale", len(output_partition_sizes), extra_weight_attrs.get("weight_loader"))

    def process_weights_after_loading(self, layer) -> None:
        replace_parameter(layer, "input_scale", static_input_scale(layer))
        super().process_weights_after_loading(layer)


# Mixins first: their create/process/apply wrap the format's own.
class ModelOptInt4AwqLinearMethod(PreQuantScaleMixin, _W4A16):
    """W4A16_AWQ: INT4 weights in groups along K, unquantized activations (smoothed where exported)."""


class ModelOptW4A8AwqLinearMethod(PreQuantScaleMixin, _W4A8):
    """W4A8_AWQ: INT4 weights widened to FP8 per tensor, static FP8 activations (smoothed where exported)."""


class ModelOptInt8SmoothQuantLinearMethod(PreQuantScaleMixin, _W8A8Sq):
    """W8A8_SQ_PER_CHANNEL: INT8 per-channel weights, static per-tensor INT8 activations after smoothing."""
