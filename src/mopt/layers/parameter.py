"""Parameters that know how to load checkpoint tensors into themselves.

A layer's ``weight_loader`` describes *where* a checkpoint tensor goes with a :class:`ShardSpec`
(which fused partition, which rows, which tensor-parallel slice); the parameter class knows its
own layout (which dim is output, which is input, how the input dim is packed or blocked) and
does the slicing, the shape and dtype checks and the copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mopt.errors import MoptError


class WeightLoadError(MoptError):
    """A checkpoint tensor that does not fit its parameter; the message names both."""


@dataclass(frozen=True)
class ShardSpec:
    """Where one checkpoint tensor lands in a parameter.

    ``partition``: index of the fused partition (q/k/v = 0/1/2, gate/up = 0/1), or None.
    ``offset``/``size``: output rows of that partition in this rank's parameter (None: all).
    ``split``: ``"output"`` (column parallel), ``"input"`` (row parallel) or None (replicated).
    ``slice_index``/``num_slices``: which of the equal slices of the checkpoint tensor this
    rank takes along ``split`` (tensor parallelism; K/V heads may be replicated, so this is
    not always the TP rank and size).
    """

    partition: int | None = None
    offset: int = 0
    size: int | None = None
    split: str | None = None
    slice_index: int = 0
    num_slices: int = 1


_QUANTIZED_STORAGE = (torch.float8_e4m3fn, torch.uint8, torch.int8)


class BaseParameter(torch.nn.Parameter):
    """A frozen parameter with a ``weight_loader`` and a name for error messages.

    Loads are tracked per span of the first (output / partition) axis, so a fused parameter is
    ``loaded`` only when every shard was: q, k and v of a q/k/v weight, each partition's scale.
    The memory behind a span never loaded is uninitialised and must not be read.
    """

    def __new__(cls, data: torch.Tensor, **kwargs):
        return super().__new__(cls, data=data, requires_grad=False)

    def __init__(self, data: torch.Tensor, weight_loader: Callable | None = None) -> None:
        self._weight_loader = weight_loader
        self.mopt_name = "<unnamed parameter>"
        self.loaded_spans: list[tuple[int, int]] = []

    @property
    def weight_loader(self) -> Callable | None:
        return self._weight_loader

    @property
    def tracked_extent(self) -> int:
        """Length of the axis loads are tracked along (output rows, or partitions of a scale)."""
        return self.data.shape[0] if self.data.dim() else 1

    def unloaded_spans(self) -> list[tuple[int, int]]:
        """``[start, end)`` ranges of the tracked axis that no checkpoint tensor filled."""
        gaps, position = [], 0
        for start, end in sorted(self.loaded_spans):
            if start > position:
                gaps.append((position, start))
            position = max(position, end)
        if position < self.tracked_extent:
            gaps.append((position, self.tracked_extent))
        return gaps

    @property
    def loaded(self) -> bool:
        return not self.unloaded_spans()

    def check_and_copy(self, target: torch.Tensor, loaded: torch.Tensor, expected_full=None,
                       span: tuple[int, int] | None = None) -> None:
        """Copy ``loaded`` into ``target`` after checking shape and dtype; ``span`` is the range of
        the tracked axis that ``target`` covers (default: all of it)."""
        if target.shape != loaded.shape:
            full = f" (the full tensor should be {tuple(expected_full)})" if expected_full else ""
            raise WeightLoadError(
                f"{self.mopt_name}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                f"expected {tuple(target.shape)}{full}"
            )
        self.check_dtype(loaded)
        target.copy_(loaded.to(target.dtype))
        self.loaded_spans.append(span if span is not None else (0, self.tracked_extent))

    def check_dtype(self, loaded: torch.Tensor) -> None:
        want = self.data.dtype
        if want in _QUANTIZED_STORAGE or loaded.dtype in _QUANTIZED_STORAGE:
            ok = loaded.dtype == want
        else:
            ok = loaded.dtype.is_floating_point
        if not ok:
            raise WeightLoadError(
                f"{self.mopt_name}: checkpoint tensor has dtype {loaded.dtype}, expected {want}"
            )

    def load(self, loaded: torch.Tensor, spec: ShardSpec = ShardSpec()) -> None:
        raise NotImplementedError  # abstract: each layout slices differently


def _take_slice(loaded: torch.Tensor, dim: int, spec: ShardSpec, size: int, name: str) -> torch.Tensor:
    full = size * spec.num_slices
    if loaded.dim() <= dim or loaded.shape[dim] != full:
        raise WeightLoadError(
            f"{name}: checkpoint tensor has shape {tuple(loaded.shape)}, expected size {full} "
            f"along dim {dim} ({spec.num_slices} slice(s) of {size})"
        )
    return loaded.narrow(dim, spec.slice_index * size, size)


class ModelWeightParameter(BaseParameter):
    """A 2-D (or stacked 3-D) weight-like tensor with an output and an input dim.

    Also used for tensors laid out like the weight: NVFP4's packed bytes (``[N, K/2]``) and
    block scales (``[N, K/16]``), whose input dim is in units of bytes or blocks.
    """

    def __init__(self, data, output_dim: int = 0, input_dim: int = 1, weight_loader=None):
        super().__init__(data, weight_loader)
        self.output_dim = output_dim
        self.input_dim = input_dim

    @property
    def tracked_extent(self) -> int:
        return self.data.shape[self.output_dim] if self.data.dim() else 1

    def load(self, loaded: torch.Tensor, spec: ShardSpec = ShardSpec()) -> None:
        target, span = self.data, None
        if spec.split == "input":
            loaded = _take_slice(loaded, self.input_dim, spec, target.shape[self.input_dim], self.mopt_name)
        elif spec.split == "output" or spec.size is not None:
            size = spec.size if spec.size is not None else target.shape[self.output_dim]
            target = target.narrow(self.output_dim, spec.offset, size)
            span = (spec.offset, spec.offset + size)
            if spec.split == "output":
                loaded = _take_slice(loaded, self.output_dim, spec, size, self.mopt_name)
        self.check_and_copy(target, loaded, span=span)


class ChannelQuantScaleParameter(ModelWeightParameter):
    """One value per output channel, ``[N]``; replicated across input splits."""

    def __init__(self, data, weight_loader=None):
        super().__init__(data, output_dim=0, input_dim=-1, weight_loader=weight_loader)

    def load(self, loaded: torch.Tensor, spec: ShardSpec = ShardSpec()) -> None:
        if spec.split == "input":
            spec = ShardSpec(partition=spec.partition, offset=spec.offset, size=spec.size)
        super().load(loaded, spec)


class PerTensorScaleParameter(BaseParameter):
    """One scalar per fused partition, ``[num_partitions]``; ModelOpt stores 0-dim tensors."""

    @property
    def tracked_extent(self) -> int:
        return self.data.numel()

    def load(self, loaded: torch.Tensor, spec: ShardSpec = ShardSpec()) -> None:
        if loaded.numel() != 1:
            raise WeightLoadError(
                f"{self.mopt_name}: expected a scalar (per-tensor) scale, got shape {tuple(loaded.shape)}"
            )
        index = spec.partition or 0
        if index >= self.data.numel():
            raise WeightLoadError(
                f"{self.mopt_name}: partition {index} out of range for {self.data.numel()} partitions"
            )
        self.check_and_copy(self.data[index : index + 1], loaded.reshape(1), span=(index, index + 1))


class RowBlockScaleParameter(BaseParameter):
    """128x128 weight-block scales stored one row per output channel, ``[N, ceil(K/bk)]``.

    The checkpoint holds ``[ceil(n/bn), 1, ceil(K/bk), 1]`` (ModelOpt) or ``[ceil(n/bn),
    ceil(K/bk)]`` per shard of ``n`` rows; each block row is repeated over its ``bn`` output
    rows, so fused shards whose sizes are not multiples of ``bn`` (hidden size 576) still fit.
    Input splits must fall on block boundaries.
    """

    def __init__(self, data, block_n: int = 128, weight_loader=None):
        super().__init__(data, weight_loader)
        self.block_n = block_n

    def load(self, loaded: torch.Tensor, spec: ShardSpec = ShardSpec()) -> None:
        if loaded.dim() == 4 and loaded.shape[1] == 1 and loaded.shape[3] == 1:
            loaded = loaded[:, 0, :, 0]
        if loaded.dim() != 2:
            raise WeightLoadError(
                f"{self.mopt_name}: block scale must be [out_blocks, 1, in_blocks, 1] or "
                f"[out_blocks, in_blocks], got shape {tuple(loaded.shape)}"
            )
        rows = spec.size if spec.size is not None else self.data.shape[0]
        rows_full = rows * spec.num_slices if spec.split == "output" else rows
        want_blocks = -(-rows_full // self.block_n)
        if loaded.shape[0] != want_blocks:
            raise WeightLoadError(
                f"{self.mopt_name}: checkpoint block scale has {loaded.shape[0]} row blocks, "
                f"expected {want_blocks} for {rows_full} rows (shape {tuple(loaded.shape)})"
            )
        expanded = loaded.repeat_interleave(self.block_n, dim=0)[:rows_full]
        if spec.split == "output":
            expanded = expanded.narrow(0, spec.slice_index * rows, rows)
        elif spec.split == "input":
            expanded = _take_slice(expanded, 1, spec, self.data.shape[1], self.mopt_name)
        self.check_and_copy(self.data.narrow(0, spec.offset, rows), expanded, span=(spec.offset, spec.offset + rows))


class ExpertParameter(BaseParameter):
    """A tensor stacked over experts, ``[E, ...]``, loaded one expert and projection at a time.

    ``kind="w13"``: the fused gate/up projection; a weight-like slot holds w1's rows then w3's
    (``[E, 2I, ...]``), a scalar slot one value per projection (``[E, 2]``). ``kind="w2"``: the down
    projection, one slot per expert (``[E, ...]`` or ``[E]``). Missing experts are reported by name.
    """

    # Tensor parallelism over the intermediate dimension (set by the layer): w13 takes this rank's rows
    # of each projection, w2 its columns (in the tensor's own units: values, packed bytes or blocks).
    tp_rank: int = 0
    tp_size: int = 1
    expert_offset: int = 0  # expert parallelism: global id of local expert 0 (for messages)
    # Expert parallelism: a small tensor every rank holds for all experts (FP8 input scales, reduced over
    # the experts after loading), indexed by global expert id.
    global_experts: bool = False

    def __init__(self, data: torch.Tensor, kind: str, weight_loader=None) -> None:
        super().__init__(data, weight_loader)
        self.kind = kind
        self.loaded_mask = torch.zeros(data.shape[0], 2 if kind == "w13" else 1, dtype=torch.bool)

    @property
    def is_scalar(self) -> bool:
        return self.data.dim() == (2 if self.kind == "w13" else 1)

    def load_expert(self, loaded: torch.Tensor, shard: str, expert: int) -> None:
        num_experts = self.data.shape[0]
        if not 0 <= expert < num_experts:
            raise WeightLoadError(f"{self.mopt_name}: expert {expert} out of range (the layer has {num_experts})")
        if (shard == "w2") != (self.kind == "w2"):
            raise WeightLoadError(f"{self.mopt_name}: cannot load projection {shard} into {self.kind}")
        half = 1 if shard == "w3" else 0
        if self.is_scalar:
            if loaded.numel() != 1:
                raise WeightLoadError(f"{self.mopt_name}: expert {expert + self.expert_offset} {shard}: expected a scalar, got shape "
                                      f"{tuple(loaded.shape)}")
            target = self.data[expert, half] if self.kind == "w13" else self.data[expert]
            loaded = loaded.reshape(())
        elif self.kind == "w13":
            rows = self.data.shape[1] // 2
            target = self.data[expert, half * rows:(half + 1) * rows]
        else:
            target = self.data[expert]
        if self.tp_size > 1 and not self.is_scalar:
            split = ShardSpec(split="output" if self.kind == "w13" else "input", slice_index=self.tp_rank,
                              num_slices=self.tp_size)
            dim = 0 if self.kind == "w13" else target.dim() - 1
            loaded = _take_slice(loaded, dim, split, target.shape[dim],
                                 f"{self.mopt_name} (expert {expert + self.expert_offset} {shard})")
        self.check_and_copy(target, loaded)
        self.loaded_mask[expert, half] = True

    @property
    def loaded(self) -> bool:
        return bool(self.loaded_mask.all())

    def missing(self) -> list[str]:
        names = ("w1", "w3") if self.kind == "w13" else ("w2",)
        return [f"expert {e + self.expert_offset} {names[h]}" for e, h in (~self.loaded_mask).nonzero().tolist()]
