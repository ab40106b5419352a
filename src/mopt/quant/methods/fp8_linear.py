"""ModelOpt FP8 linear methods: per-tensor W8A8, per-channel/per-token, 128x128 weight blocks.

Checkpoint tensors per linear layer (``W[N, K]``):

* FP8: ``weight`` e4m3 ``[N, K]``, ``weight_scale`` fp32 ``[]``, ``input_scale`` fp32 ``[]``;
* FP8_PER_CHANNEL_PER_TOKEN: ``weight`` e4m3 ``[N, K]``, ``weight_scale`` fp32 ``[N]``;
* FP8_PB_WO: ``weight`` e4m3 ``[N, K]``, ``weight_scale`` fp32 ``[ceil(N/128), 1, ceil(K/128), 1]``
  (``[]`` when the weight is a single block); FP8_PB_REAL (``mtq.compress``): the same with
  ``weight_scale`` ``[ceil(N/128), ceil(K/128)]``. Both weight-only.

Fused layers (q/k/v, gate/up) load one such set per shard.
"""

from __future__ import annotations

import logging
import os

import torch

from mopt.kernels.linear import LinearScheme
from mopt.layers.parameter import (
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
    RowBlockScaleParameter,
    WeightLoadError,
)
from mopt.quant.formats import fp8
from mopt.quant.methods.base import ModelOptLinearMethodBase, replace_parameter, require_loaded

logger = logging.getLogger(__name__)

_UNSET = torch.finfo(torch.float32).min


def _record_shape(layer, input_size_per_partition, output_partition_sizes) -> None:
    layer.logical_widths = list(output_partition_sizes)
    layer.input_size_per_partition = input_size_per_partition
    layer.output_size_per_partition = sum(output_partition_sizes)


def _fp8_weight(layer, loader) -> None:
    weight = ModelWeightParameter(
        torch.empty(layer.output_size_per_partition, layer.input_size_per_partition, dtype=fp8.FP8_DTYPE),
        weight_loader=loader,
    )
    layer.register_parameter("weight", weight)


def _per_tensor(layer, name: str, partitions: int, loader) -> None:
    param = PerTensorScaleParameter(torch.full((partitions,), _UNSET), weight_loader=loader)
    layer.register_parameter(name, param)


def _check_partitions_loaded(layer, name: str) -> torch.Tensor:
    value = getattr(layer, name).data
    unset = (value == _UNSET).nonzero().flatten().tolist()
    if unset:
        raise WeightLoadError(
            f"{getattr(layer, name).mopt_name}: no checkpoint value for partition(s) {unset} "
            f"of {len(value)}"
        )
    return value


class ModelOptFp8LinearMethod(ModelOptLinearMethodBase):
    """Static per-tensor W8A8: ``y = (e4m3(x / s_x) @ W_q^T) * s_x * s_w``.

    ``s_w`` is a scalar, or one value per output row when fused shards were exported with
    different scales.
    """

    scheme = LinearScheme.FP8_TENSOR
    input_split_multiple, input_split_reason = 16, "the Hopper FP8 GEMV and torch._scaled_mm need K % 16 == 0"

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
        params_dtype, **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs.get("weight_loader")
        _record_shape(layer, input_size_per_partition, output_partition_sizes)
        _fp8_weight(layer, loader)
        _per_tensor(layer, "weight_scale", len(output_partition_sizes), loader)
        _per_tensor(layer, "input_scale", len(output_partition_sizes), loader)

    def process_weights_after_loading(self, layer) -> None:
        require_loaded(layer, "weight")
        w_scale = _check_partitions_loaded(layer, "weight_scale")
        in_scale = _check_partitions_loaded(layer, "input_scale")
        if bool((w_scale == w_scale[0]).all()):
            weight_scale = w_scale[0].reshape(()).clone()
        else:
            # Fused shards keep their own scales, one per output row: exact, unlike vLLM's
            # re-quantization to the largest scale (kernels needing one scale can still do that).
            widths = torch.tensor(layer.logical_widths, device=w_scale.device)
            weight_scale = torch.repeat_interleave(w_scale, widths).contiguous()
        if not bool((in_scale == in_scale[0]).all()):
            logger.warning(
                "%s: fused shards have different input scales %s; using their maximum",
                layer.input_scale.mopt_name, in_scale.tolist(),
            )
        replace_parameter(layer, "weight", layer.weight.data)
        replace_parameter(layer, "weight_scale", weight_scale)
        replace_parameter(layer, "input_scale", in_scale.max().reshape(()).clone())
        self.select_kernel(layer)


class ModelOptFp8PcPtLinearMethod(ModelOptLinearMethodBase):
    """Per-channel weights, dynamic per-token activations."""

    scheme = LinearScheme.FP8_CHANNEL_TOKEN
    input_split_multiple, input_split_reason = 16, "the Hopper FP8 GEMV and torch._scaled_mm need K % 16 == 0"

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
        params_dtype, **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs.get("weight_loader")
        _record_shape(layer, input_size_per_partition, output_partition_sizes)
        _fp8_weight(layer, loader)
        scale = ChannelQuantScaleParameter(
            torch.full((layer.output_size_per_partition,), _UNSET), weight_loader=loader
        )
        layer.register_parameter("weight_scale", scale)

    def process_weights_after_loading(self, layer) -> None:
        require_loaded(layer, "weight", "weight_scale")
        if bool((layer.weight_scale.data == _UNSET).any()):
            raise WeightLoadError(f"{layer.weight_scale.mopt_name}: some channels were never loaded")
        replace_parameter(layer, "weight", layer.weight.data)
        replace_parameter(layer, "weight_scale", layer.weight_scale.data.clone())
        self.select_kernel(layer)


FP8_PB_WO_ACTIVATIONS_ENV = "MOPT_FP8_PB_WO_ACTIVATIONS"


class ModelOptFp8PbWoLinearMethod(ModelOptLinearMethodBase):
    """128x128 weight blocks (partial edge blocks allowed); FP8_PB_WO and FP8_PB_REAL.

    Weight-only, as ModelOpt defines both (``FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG``: activations stay in
    the model dtype): ``FP8_BLOCK_WO``. ``MOPT_FP8_PB_WO_ACTIVATIONS=fp8`` (or the config's
    ``fp8_pb_wo_activations = "fp8"``) also quantizes activations in dynamic 1x128 groups, as vLLM's
    block-FP8 kernels do (``FP8_BLOCK``, W8A8): faster on FP8 tensor cores, but a different function
    from the checkpoint's (about 2.6% relative error per layer against ModelOpt's model).
    """

    block = fp8.BLOCK_SHAPE
    input_split_multiple, input_split_reason = fp8.BLOCK_SHAPE[1], "whole 128x128 weight blocks and 1x128 activation groups"

    def __init__(self, quant_config) -> None:
        super().__init__(quant_config)
        acts = getattr(quant_config, "fp8_pb_wo_activations", None) or os.environ.get(FP8_PB_WO_ACTIVATIONS_ENV, "none")
        if acts not in ("none", "fp8"):
            raise ValueError(f"{FP8_PB_WO_ACTIVATIONS_ENV} must be 'none' or 'fp8', got {acts!r}")
        self.scheme = LinearScheme.FP8_BLOCK if acts == "fp8" else LinearScheme.FP8_BLOCK_WO

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
        params_dtype, **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs.get("weight_loader")
        block_n, block_k = self.block
        if input_size_per_partition != input_size and input_size_per_partition % block_k:
            raise ValueError(
                f"{getattr(layer, 'prefix', '')}: FP8_PB_WO with tensor parallelism needs the "
                f"per-rank input size ({input_size_per_partition}) to be a multiple of {block_k}"
            )
        _record_shape(layer, input_size_per_partition, output_partition_sizes)
        layer.weight_block_size = [block_n, block_k]
        _fp8_weight(layer, loader)
        k_blocks = -(-input_size_per_partition // block_k)
        scale = RowBlockScaleParameter(
            torch.full((layer.output_size_per_partition, k_blocks), _UNSET),
            block_n=block_n, weight_loader=loader,
        )
        layer.register_parameter("weight_scale", scale)

    def process_weights_after_loading(self, layer) -> None:
        require_loaded(layer, "weight", "weight_scale")
        if bool((layer.weight_scale.data == _UNSET).any()):
            raise WeightLoadError(f"{layer.weight_scale.mopt_name}: some blocks were never loaded")
        replace_parameter(layer, "weight", layer.weight.data)
        replace_parameter(layer, "weight_scale", layer.weight_scale.data.clone())
        self.select_kernel(layer)
