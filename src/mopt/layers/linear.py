"""Tensor-parallel-aware linear layers whose weights come from a quantization method.

A layer owns its shape and sharding (which output rows or input columns this rank holds, where
fused q/k/v or gate/up partitions sit); its method owns the parameters and the math. Weight
loading is ``layer.weight_loader(param, tensor, shard_id)``: the layer turns ``shard_id`` into
a :class:`ShardSpec` and the parameter slices, checks and copies. ``tp_rank``/``tp_size`` only
decide which slice a rank loads; no process group is needed to build or test a layer.
"""

from __future__ import annotations

import torch
from torch import nn

from mopt.layers.parameter import BaseParameter, ShardSpec, WeightLoadError
from mopt.quant.methods.linear import UnquantizedLinearMethod


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """Common constructor: resolve the method, let it create the parameters, name them."""

    quant_kind = "linear"

    def __init__(
        self,
        input_size: int,
        output_size: int,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        bias: bool = False,
        quant_config=None,
        prefix: str = "",
        params_dtype: torch.dtype | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"{prefix}: tp_rank {tp_rank} out of range for tp_size {tp_size}")
        self.prefix = prefix
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        self.quant_method = method if method is not None else UnquantizedLinearMethod()
        self.quant_method.create_weights(
            self,
            input_size_per_partition,
            list(output_partition_sizes),
            input_size,
            output_size,
            self.params_dtype,
            weight_loader=self.weight_loader,
        )
        if bias:
            self.bias = BiasParameter(
                torch.zeros(sum(output_partition_sizes), dtype=self.params_dtype),
                weight_loader=self.weight_loader,
            )
        else:
            self.register_parameter("bias", None)
        for name, param in self.named_parameters(recurse=False):
            if isinstance(param, BaseParameter):
                param.mopt_name = f"{prefix}.{name}" if prefix else name

    def weight_loader(self, param: BaseParameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.load(loaded, self.shard_spec(param, shard_id))

    def shard_spec(self, param: BaseParameter, shard_id) -> ShardSpec:
        if shard_id is not None:
            raise WeightLoadError(f"{param.mopt_name}: {type(self).__name__} has no fused shards, got {shard_id!r}")
        return ShardSpec()

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    @property
    def fp8_input_scale(self) -> torch.Tensor | None:
        """When this layer's kernel also takes E4M3 activations, the static scale they must be quantized
        under (the kernel before it can then write codes instead of its output); else None."""
        return self.quant_method.fp8_input_scale(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, tp={self.tp_rank}/{self.tp_size}, "
            f"method={type(self.quant_method).__name__}"
        )


class BiasParameter(BaseParameter):
    """A bias: sharded along outputs like the weight's rows."""

    def load(self, loaded: torch.Tensor, spec: ShardSpec = ShardSpec()) -> None:
        target, span = self.data, None
        size = spec.size if spec.size is not None else target.shape[0]
        if spec.split == "output" or spec.size is not None:
            target = target.narrow(0, spec.offset, size)
            span = (spec.offset, spec.offset + size)
        if spec.split == "output":
            if loaded.shape[0] != size * spec.num_slices:
                raise WeightLoadError(
                    f"{self.mopt_name}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                    f"expected ({size * spec.num_slices},)"
                )
            loaded = loaded.narrow(0, spec.slice_index * size, size)
        self.check_and_copy(target, loaded, span=span)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, quant_config=None,
                 prefix: str = "", params_dtype=None) -> None:
        super().__init__(input_size, output_size, input_size, [output_size], bias, quant_config,
                         prefix, params_dtype)


class ColumnParallelLinear(LinearBase):
    """Output rows split across ranks: ``Y_r = X W_r^T``."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, quant_config=None,
                 prefix: str = "", params_dtype=None, tp_rank: int = 0, tp_size: int = 1,
                 output_sizes: list[int] | None = None) -> None:
        self.output_sizes = list(output_sizes) if output_sizes is not None else [output_size]
        partitions = [_divide(s, tp_size, f"{prefix} output size") for s in self.output_sizes]
        super().__init__(input_size, output_size, input_size, partitions, bias, quant_config,
                         prefix, params_dtype, tp_rank, tp_size)

    def shard_spec(self, param, shard_id) -> ShardSpec:
        if shard_id is not None:
            return super().shard_spec(param, shard_id)
        return ShardSpec(split="output", slice_index=self.tp_rank, num_slices=self.tp_size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel weights fused on rows (gate/up); ``shard_id`` is their index."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_config=None, prefix: str = "", params_dtype=None, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        super().__init__(input_size, sum(output_sizes), bias, quant_config, prefix, params_dtype,
                         tp_rank, tp_size, output_sizes=output_sizes)

    def shard_spec(self, param, shard_id) -> ShardSpec:
        if shard_id is None:
            raise WeightLoadError(
                f"{param.mopt_name}: fused layer needs a shard id in 0..{len(self.output_sizes) - 1}"
            )
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise WeightLoadError(
                f"{param.mopt_name}: shard id {shard_id!r} out of range 0..{len(self.output_sizes) - 1}"
            )
        sizes = [s // self.tp_size for s in self.output_sizes]
        return ShardSpec(partition=shard_id, offset=sum(sizes[:shard_id]), size=sizes[shard_id],
                         split="output", slice_index=self.tp_rank, num_slices=self.tp_size)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; K/V heads are replicated when there are fewer than ranks."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = False, quant_config=None,
                 prefix: str = "", params_dtype=None, tp_rank: int = 0, tp_size: int = 1) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, f"{prefix} number of heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = _divide(tp_size, total_num_kv_heads, f"{prefix} tp size / kv heads")
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, f"{prefix} number of kv heads")
            self.num_kv_head_replicas = 1
        q, kv = self.num_heads * head_size, self.num_kv_heads * head_size
        self.partition_sizes = {"q": q, "k": kv, "v": kv}
        output_sizes = [q * tp_size, kv * tp_size, kv * tp_size]
        super().__init__(hidden_size, sum(output_sizes), bias, quant_config, prefix, params_dtype,
                         tp_rank, tp_size, output_sizes=output_sizes)

    def shard_spec(self, param, shard_id) -> ShardSpec:
        if shard_id not in self.partition_sizes:
            raise WeightLoadError(f"{param.mopt_name}: QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        order = ["q", "k", "v"]
        index = order.index(shard_id)
        offset = sum(self.partition_sizes[s] for s in order[:index])
        if shard_id == "q":
            slice_index, num_slices = self.tp_rank, self.tp_size
        else:
            slice_index = self.tp_rank // self.num_kv_head_replicas
            num_slices = self.tp_size // self.num_kv_head_replicas
        return ShardSpec(partition=index, offset=offset, size=self.partition_sizes[shard_id],
                         split="output", slice_index=slice_index, num_slices=num_slices)


class RowParallelLinear(LinearBase):
    """Input columns split across ranks: ``Y = sum_r X_r W_r^T`` (the caller all-reduces)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, quant_config=None,
                 prefix: str = "", params_dtype=None, tp_rank: int = 0, tp_size: int = 1,
                 reduce_results: bool = True) -> None:
        self.reduce_results = reduce_results
        super().__init__(input_size, output_size, _divide(input_size, tp_size, f"{prefix} input size"),
                         [output_size], bias, quant_config, prefix, params_dtype, tp_rank, tp_size)

    def shard_spec(self, param, shard_id) -> ShardSpec:
        if shard_id is not None:
            return super().shard_spec(param, shard_id)
        if param is self.bias:
            return ShardSpec()
        return ShardSpec(split="input", slice_index=self.tp_rank, num_slices=self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, by rank 0, so that the all-reduce sums it once.
        bias = self.bias if self.tp_rank == 0 else None
        y = self.quant_method.apply(self, x, bias)
        if self.tp_size > 1 and self.reduce_results and torch.distributed.is_initialized():
            torch.distributed.all_reduce(y)
        return y
