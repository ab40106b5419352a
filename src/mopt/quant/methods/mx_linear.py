"""ModelOpt microscaling linear methods: MXFP8, MXFP4 and W4A8_MXFP4_FP8 (formats in ``mopt.quant.formats.mx``).

Checkpoint tensors per linear layer (``W[N, K]``, K a multiple of 32):

* MXFP8: ``weight`` e4m3 ``[N, K]``, ``weight_scale`` uint8 E8M0 ``[N, K/32]``; activations MXFP8.
* MXFP4 (``quant_algo: mxfp4``): ``weight`` uint8 ``[N, K/2]``, ``weight_scale`` uint8 ``[N, K/32]``.
  The export does not record whether activations were quantized: ModelOpt's MXFP4 algorithm
  (``MXFP4_DEFAULT_CFG``) quantizes them to MXFP4, its weight-only configs do not. mopt follows the
  algorithm (W4A4); ``MOPT_MXFP4_ACTIVATIONS=none`` (or the config's ``mxfp4_activations = "none"``)
  runs weight-only.
* W4A8_MXFP4_FP8: MXFP4 weights, FP8 activations per tensor. ModelOpt's config calibrates nothing,
  so its export has no ``input_scale`` and its fake quantization takes each call's whole-tensor
  amax, which makes a token's output depend on the rest of the batch. mopt quantizes per token
  instead (the same for one token; batch-invariant), and uses a static ``input_scale`` when the
  checkpoint has one.
"""

from __future__ import annotations

import os

import torch

from mopt.kernels.linear import LinearScheme
from mopt.layers.parameter import ModelWeightParameter
from mopt.quant.formats import fp8, mx
from mopt.quant.methods.base import ModelOptLinearMethodBase, replace_parameter, require_loaded
from mopt.quant.methods.fp8_linear import _per_tensor, _record_shape, _UNSET
from mopt.quant.methods.int_linear import static_input_scale

MXFP4_ACTIVATIONS_ENV = "MOPT_MXFP4_ACTIVATIONS"


class _MxLinearBase(ModelOptLinearMethodBase):
    weight_dtype: torch.dtype = torch.uint8
    values_per_byte = 2
    input_split_multiple, input_split_reason = mx.BLOCK_SIZE, f"whole {mx.BLOCK_SIZE}-element MX blocks"

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        if input_size_per_partition % mx.BLOCK_SIZE:
            raise ValueError(f"{getattr(layer, 'prefix', '')}: MX formats need in_features per partition divisible "
                             f"by {mx.BLOCK_SIZE}, got {input_size_per_partition}")
        loader = extra_weight_attrs.get("weight_loader")
        _record_shape(layer, input_size_per_partition, output_partition_sizes)
        n, k = layer.output_size_per_partition, input_size_per_partition
        weight = torch.empty(n, k // self.values_per_byte, dtype=self.weight_dtype)
        layer.register_parameter("weight", ModelWeightParameter(weight, weight_loader=loader))
        scale = torch.empty(n, k // mx.BLOCK_SIZE, dtype=torch.uint8)
        layer.register_parameter("weight_scale", ModelWeightParameter(scale, weight_loader=loader))

    def process_weights_after_loading(self, layer) -> None:
        require_loaded(layer, "weight", "weight_scale")
        replace_parameter(layer, "weight", layer.weight.data)
        replace_parameter(layer, "weight_scale", layer.weight_scale.data)
        self.select_kernel(layer)


class ModelOptMxFp8LinearMethod(_MxLinearBase):
    """MXFP8 W8A8: E4M3 weights and activations with E8M0 scales per 32 elements."""

    scheme = LinearScheme.MXFP8
    weight_dtype, values_per_byte = fp8.FP8_DTYPE, 1


class ModelOptMxFp4LinearMethod(_MxLinearBase):
    """MXFP4 W4A4 (or weight-only, see the module docstring)."""

    def __init__(self, quant_config) -> None:
        super().__init__(quant_config)
        acts = getattr(quant_config, "mxfp4_activations", None) or os.environ.get(MXFP4_ACTIVATIONS_ENV, "mxfp4")
        if acts not in ("mxfp4", "none"):
            raise ValueError(f"{MXFP4_ACTIVATIONS_ENV} must be 'mxfp4' or 'none', got {acts!r}")
        self.scheme = LinearScheme.MXFP4 if acts == "mxfp4" else LinearScheme.MXFP4_WO


class ModelOptW4A8MxFp4Fp8LinearMethod(_MxLinearBase):
    """MXFP4 weights, FP8 activations (static per tensor, else per token)."""

    scheme = LinearScheme.W4A8_MXFP4

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)
        _per_tensor(layer, "input_scale", len(output_partition_sizes), extra_weight_attrs.get("weight_loader"))
        layer.input_scale.optional = True

    def process_weights_after_loading(self, layer) -> None:
        if bool((layer.input_scale.data == _UNSET).all()):
            del layer.input_scale
            layer.input_scale = None
        else:
            replace_parameter(layer, "input_scale", static_input_scale(layer))
        super().process_weights_after_loading(layer)
