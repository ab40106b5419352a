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
        self.optional = False  # a checkpoint may leave it out (e.g. AWQ's pre_quant_scale where folded)

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


def take_slice(loaded: torch.Tensor, dim: int, spec: ShardSpec, size: int, name: str) -> torch.Tensor:
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
            loaded = take_slice(loaded, self.input_dim, spec, target.shape[self.input_dim], self.mopt_name)
        elif spec.split == "output" or spec.size is not None:
            size = spec.size if spec.size is not None else target.shape[self.output_dim]
            target = target.narrow(self.output_dim, spec.offset, size)
            span = (spec.offset, spec.offset + size)
            if spec.split == "output":
                loaded = take_slice(loaded, self.output_dim, spec, size, self.mopt_name)
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
        if loaded.dim() == 0:  # ModelOpt squeezes the scale of a weight that is a single block
            loaded = loaded.reshape(1, 1)
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
            expanded = take_slice(expanded, 1, spec, self.data.shape[1], self.mopt_name)
        self.check_and_copy(self.data.narrow(0, spec.offset, rows), expanded, span=(spec.offset, spec.offset + rows))


class PackedRowsWeightParameter(ModelWeightParameter):
    """A weight packed two rows per byte along the output dim, ``[N / 2, K]`` (ModelOpt's INT4).

    Shard offsets and sizes are in unpacked rows; they must be even.
    """

    def load(self, loaded: torch.Tensor, spec: ShardSpec = ShardSpec()) -> None:
        size = spec.size if spec.size is not None else 2 * self.data.shape[0]
        if spec.offset % 2 or size % 2:
            raise WeightLoadError(f"{self.mopt_name}: rows packed in pairs need even shard offsets and sizes, "
                                  f"got offset {spec.offset}, size {size}")
        packed = ShardSpec(partition=spec.partition, offset=spec.offset // 2,
                           size=None if spec.size is None else spec.size // 2, split=spec.split,
                           slice_index=spec.slice_index, num_slices=spec.num_slices)
        super().load(loaded, packed)


class PartitionInputParameter(BaseParameter):
    """One tensor per fused partition whose last dim is the layer's input, ``[P, ..., K]``.

    AWQ/SmoothQuant ``pre_quant_scale`` (``[K]`` per shard) and SVDQuant's ``lora_a`` (``[r, K]``) are
    such tensors: column-parallel ranks hold all of K, row-parallel ranks their slice of K. Fused
    shards must agree (they multiply the same input); ``value()`` checks that and returns one.
    """

    def __init__(self, data: torch.Tensor, weight_loader=None) -> None:
        super().__init__(data, weight_loader)
        self.loaded_partitions = torch.zeros(data.shape[0], dtype=torch.bool)

    def load(self, loaded: torch.Tensor, spec: ShardSpec = ShardSpec()) -> None:
        index = spec.partition or 0
        if index >= self.data.shape[0]:
            raise WeightLoadError(f"{self.mopt_name}: partition {index} out of range for {self.data.shape[0]}")
        if spec.split == "input":
            loaded = take_slice(loaded, loaded.dim() - 1, spec, self.data.shape[-1], self.mopt_name)
        self.check_and_copy(self.data[index], loaded, span=(index, index + 1))
        self.loaded_partitions[index] = True

    def value(self) -> torch.Tensor | None:
        """The shared tensor ``[..., K]``, or None when no partition was loaded."""
        if not bool(self.loaded_partitions.any()):
            return None
        if not bool(self.loaded_partitions.all()):
            missing = (~self.loaded_partitions).nonzero().flatten().tolist()
            raise WeightLoadError(f"{self.mopt_name}: no checkpoint value for partition(s) {missing}")
        if not all(torch.equal(self.data[0], self.data[i]) for i in range(1, self.data.shape[0])):
            raise WeightLoadError(f"{self.mopt_name}: fused shards have different values; they multiply "
                                  "the same input, so they must be equal")
        return self.data[0].clone()


class ShardCollectingParameter(BaseParameter):
    """Checkpoint tensors whose size along one dim only the checkpoint knows (SVDQuant's rank), kept per
    fused partition and assembled after loading. ``output_dim`` / ``input_dim`` say which dim a
    column- or row-parallel rank slices (None: not sliced)."""

    def __init__(self, num_partitions: int, dtype: torch.dtype, output_dim: int | None, input_dim: int | None,
                 weight_loader=None) -> None:
        super().__init__(torch.empty(0, dtype=dtype), weight_loader)
        self.num_partitions, self.output_dim, self.input_dim = num_partitions, output_dim, input_dim
        self.shards: dict[int, torch.Tensor] = {}

    def __new__(cls, num_partitions: int, dtype: torch.dtype, *args, **kwargs):
        return super().__new__(cls, torch.empty(0, dtype=dtype))

    def load(self, loaded: torch.Tensor, spec: ShardSpec = ShardSpec()) -> None:
        index = spec.partition or 0
        if index >= self.num_partitions:
            raise WeightLoadError(f"{self.mopt_name}: partition {index} out of range for {self.num_partitions}")
        dim = {"output": self.output_dim, "input": self.input_dim}.get(spec.split or "")
        if dim is not None and spec.num_slices > 1:
            if loaded.shape[dim] % spec.num_slices:
                raise WeightLoadError(f"{self.mopt_name}: dim {dim} of shape {tuple(loaded.shape)} does not split "
                                      f"into {spec.num_slices}")
            size = loaded.shape[dim] // spec.num_slices
            loaded = loaded.narrow(dim, spec.slice_index * size, size)
        self.check_dtype(loaded)
        self.shards[index] = loaded.to(self.data.dtype).clone()
        self.loaded_spans.append((index, index + 1))

    @property
    def tracked_extent(self) -> int:
        return self.num_partitions

    def partitions(self) -> list[torch.Tensor]:
        missing = [i for i in range(self.num_partitions) if i not in self.shards]
        if missing:
            raise WeightLoadError(f"{self.mopt_name}: no checkpoint tensor for partition(s) {missing}")
        return [self.shards[i] for i in range(self.num_partitions)]
