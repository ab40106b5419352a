"""Mixture-of-experts methods for the ModelOpt formats whose experts run as a linear scheme, stacked.

ModelOpt 0.47 exports experts (Qwen3-MoE, Mixtral) in FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO (only
projections that are one 128x128 block: larger ones fail in its export), W8A16, W8A8_SQ, MXFP8,
MXFP4, W4A8_MXFP4_FP8, W4A16_NVFP4 and W4A8_NVFP4_FP8, one checkpoint tensor per expert and
projection with the dense layer's names, shapes and dtypes. (Its AWQ, SVDQuant and FP8_PB_REAL
exports of these models fail; see the README.) Each method here declares those tensors as data
(:class:`ExpertTensor`), loads them stacked over experts (gate rows then up rows for ``w13``), and
brings them to the canonical form of ``mopt.kernels.moe.LINEAR_SCHEME_OF``: per-tensor weight
scales become one per row, per-tensor input scales one per expert (the larger of gate's and up's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from mopt.kernels.moe import MoEScheme
from mopt.layers.expert_parameter import ExpertBlockScaleParameter, ExpertParameter
from mopt.layers.parameter import WeightLoadError
from mopt.quant.formats import fp8, mx, nvfp4
from mopt.quant.methods.moe import FusedMoEMethodBase
from mopt.quant.methods.mx_linear import MXFP4_ACTIVATIONS_ENV

Shape = Callable[[int, int], tuple[int, ...]]  # (rows, cols) of one projection -> tensor shape per expert


@dataclass(frozen=True)
class ExpertTensor:
    """One checkpoint tensor per expert and projection: ``<name>`` -> ``w13_<name>`` / ``w2_<name>``.

    ``layout``: ``"weight"`` (rows, ...), ``"row"`` (one value per output row), ``"input"`` (one per
    input column), ``"scalar"`` (per tensor) or ``"block"`` (128x128-block scales)."""

    name: str
    dtype: torch.dtype
    layout: str = "weight"
    shape: Shape | None = None
    optional: bool = False


def _cols(div: int) -> Shape:
    return lambda rows, cols: (rows, cols // div)


class StackedExpertsMethod(FusedMoEMethodBase):
    """Creates, checks and converts the declared tensors; subclasses set ``scheme`` and ``tensors``."""

    tensors: tuple[ExpertTensor, ...] = ()
    divisor = 1  # hidden and intermediate sizes must be multiples of it (block / packing)

    @property
    def intermediate_split_multiple(self) -> int:
        """Tensor parallelism splits w2's K (the intermediate size) into parts of this size."""
        return fp8.BLOCK_SHAPE[1] if any(t.layout == "block" for t in self.tensors) else self.divisor

    @property
    def intermediate_split_reason(self) -> str:
        if any(t.layout == "block" for t in self.tensors):
            return "whole 128x128 weight blocks"
        return f"whole {self.divisor}-element blocks" if self.divisor > 1 else ""

    def __init__(self, quant_config, layer=None) -> None:
        super().__init__()
        self.quant_config = quant_config

    def create_weights(self, layer, num_experts, hidden, inter, params_dtype) -> None:
        for dim, what in ((hidden, "hidden_size"), (inter, "intermediate_size")):
            if dim % self.divisor:
                raise ValueError(f"{layer.prefix}: {self.scheme.value} experts need {what} divisible by "
                                 f"{self.divisor}, got {dim}")
        for proj, rows, cols in (("w13", 2 * inter, hidden), ("w2", hidden, inter)):
            for t in self.tensors:
                param = self._make(t, num_experts, proj, rows, cols, layer.weight_loader)
                param.optional = t.optional
                layer.register_parameter(f"{proj}_{t.name}", param)

    @staticmethod
    def _make(t: ExpertTensor, e: int, proj: str, rows: int, cols: int, loader) -> ExpertParameter:
        halves = 2 if proj == "w13" else 1
        if t.layout == "scalar":
            data = torch.zeros((e, 2) if proj == "w13" else (e,), dtype=t.dtype)
            return ExpertParameter(data, kind=proj, weight_loader=loader)
        if t.layout == "block":
            data = torch.zeros(e, rows, -(-cols // fp8.BLOCK_SHAPE[1]), dtype=t.dtype)
            return ExpertBlockScaleParameter(data, kind=proj, weight_loader=loader, block_n=fp8.BLOCK_SHAPE[0])
        if t.layout in ("row", "input"):
            width = rows if t.layout == "row" else halves * cols
            return ExpertParameter(torch.zeros(e, width, dtype=t.dtype), kind=proj, weight_loader=loader,
                                   per_row=t.layout == "row", per_input=t.layout == "input")
        return ExpertParameter(torch.zeros(e, *t.shape(rows, cols), dtype=t.dtype), kind=proj, weight_loader=loader)

    def _check_loaded(self, layer) -> None:
        for name, p in layer.named_parameters(recurse=False):
            if isinstance(p, ExpertParameter) and p.optional and not bool(p.loaded_mask.any()):
                continue
            if isinstance(p, ExpertParameter) and not p.loaded:
                missing = p.missing()
                raise WeightLoadError(f"{p.mopt_name}: checkpoint has no tensor for {', '.join(missing[:6])}"
                                      + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))

    def process_weights_after_loading(self, layer) -> None:
        self._check_loaded(layer)
        sizes = {"w13": layer.intermediate_size, "w2": layer.hidden_size}
        for t in self.tensors:
            for proj in ("w13", "w2"):
                name = f"{proj}_{t.name}"
                param = getattr(layer, name)
                value = param.data if bool(param.loaded_mask.any()) else None
                if value is not None and t.layout == "scalar" and t.name == "input_scale":
                    value = value.float().reshape(value.shape[0], -1).amax(dim=1)
                    if bool((value <= 0).any()):
                        raise WeightLoadError(f"{param.mopt_name}: input scales must be positive")
                elif value is not None and t.layout == "scalar":  # a global weight scale: one per row
                    value = value.float().reshape(value.shape[0], -1).repeat_interleave(sizes[proj], dim=1)
                elif value is not None and t.layout == "input" and proj == "w13":
                    gate, up = value.chunk(2, dim=1)
                    if not torch.equal(gate, up):
                        raise WeightLoadError(f"{param.mopt_name}: gate and up have different {t.name}; they "
                                              "multiply the same input")
                    value = gate
                layer._parameters.pop(name)
                layer.register_buffer(name, None if value is None else value.contiguous())
        self.select_kernel(layer)


_FP8_WEIGHT = ExpertTensor("weight", fp8.FP8_DTYPE, shape=_cols(1))
_FP4_WEIGHT = ExpertTensor("weight", torch.uint8, shape=_cols(2))
_E8M0_SCALE = ExpertTensor("weight_scale", torch.uint8, shape=_cols(mx.BLOCK_SIZE))


class ModelOptFp8PcPtMoEMethod(StackedExpertsMethod):
    scheme = MoEScheme.FP8_CHANNEL_TOKEN
    tensors = (_FP8_WEIGHT, ExpertTensor("weight_scale", torch.float32, "row"))


class ModelOptFp8PbWoMoEMethod(StackedExpertsMethod):
    """Weight-only 128x128 blocks (FP8_PB_WO's own semantics; the dense method's W8A8 option is not offered)."""

    scheme = MoEScheme.FP8_BLOCK_WO
    tensors = (_FP8_WEIGHT, ExpertTensor("weight_scale", torch.float32, "block"))


class ModelOptInt8WeightOnlyMoEMethod(StackedExpertsMethod):
    scheme = MoEScheme.INT8_WO
    tensors = (ExpertTensor("weight", torch.int8, shape=_cols(1)), ExpertTensor("weight_scale", torch.float32, "row"))


class ModelOptInt8SmoothQuantMoEMethod(StackedExpertsMethod):
    scheme = MoEScheme.INT8_SQ
    tensors = ModelOptInt8WeightOnlyMoEMethod.tensors + (
        ExpertTensor("input_scale", torch.float32, "scalar"),
        ExpertTensor("pre_quant_scale", torch.float32, "input", optional=True))


class ModelOptMxFp8MoEMethod(StackedExpertsMethod):
    scheme = MoEScheme.MXFP8
    divisor = mx.BLOCK_SIZE
    tensors = (_FP8_WEIGHT, _E8M0_SCALE)


class ModelOptMxFp4MoEMethod(StackedExpertsMethod):
    """MXFP4 W4A4, or weight-only under ``MOPT_MXFP4_ACTIVATIONS=none`` (as the linear method)."""

    divisor = mx.BLOCK_SIZE
    tensors = (_FP4_WEIGHT, _E8M0_SCALE)

    def __init__(self, quant_config, layer=None) -> None:
        super().__init__(quant_config, layer)
        acts = getattr(quant_config, "mxfp4_activations", None) or os.environ.get(MXFP4_ACTIVATIONS_ENV, "mxfp4")
        self.scheme = MoEScheme.MXFP4 if acts == "mxfp4" else MoEScheme.MXFP4_WO


class ModelOptW4A8MxFp4Fp8MoEMethod(StackedExpertsMethod):
    scheme = MoEScheme.W4A8_MXFP4
    divisor = mx.BLOCK_SIZE
    tensors = (_FP4_WEIGHT, _E8M0_SCALE, ExpertTensor("input_scale", torch.float32, "scalar", optional=True))


class ModelOptNvFp4W4A16MoEMethod(StackedExpertsMethod):
    scheme = MoEScheme.NVFP4_WO
    divisor = nvfp4.BLOCK_SIZE
    tensors = (_FP4_WEIGHT, ExpertTensor("weight_scale", fp8.FP8_DTYPE, shape=_cols(nvfp4.BLOCK_SIZE)),
               ExpertTensor("weight_scale_2", torch.float32, "scalar"))


class ModelOptNvFp4W4A8MoEMethod(StackedExpertsMethod):
    scheme = MoEScheme.W4A8_NVFP4
    divisor = 32
    tensors = (_FP4_WEIGHT, ExpertTensor("weight_scale", fp8.FP8_DTYPE, shape=_cols(32)),
               ExpertTensor("weight_scale_2", torch.float32, "scalar"),
               ExpertTensor("input_scale", torch.float32, "scalar"))
