"""Tensor-parallel-aware linear layers whose weights come from a quantization method.

A layer owns its shape and sharding (which output rows or input columns this rank holds, where
fused q/k/v or gate/up partitions sit); its method owns the parameters and the math. Weight
loading is ``layer.weight_loader(param, tensor, shard_id)``: the layer turns ``shard_id`` into
a :class:`ShardSpec` and the parameter slices, checks and copies. ``tp_rank``/``tp_size`` only
decide which slice a rank loads; no process group is needed to build or test a layer. Left out,
they come from :func:`mopt.engine.distributed.current_parallel_state` (rank 0 of 1 unless a
tensor-parallel model is being built), which also gives row-parallel layers the group their
all-reduce runs on.
"""

from __future__ import annotations

import torch
from torch import nn

from mopt.engine.distributed import all_reduce, current_parallel_state, divide, group_for, split_problem
from mopt.layers.parameter import BaseParameter, ShardSpec, WeightLoadError
from mopt.quant.methods.linear import UnquantizedLinearMethod


def _tp(tp_rank: int | None, tp_size: int | None) -> tuple[int, int]:
    """Explicit rank and size, or the current parallel state's."""
    state = current_parallel_state()
    return (state.tp_rank if tp_rank is None else tp_rank), (state.tp_size if tp_size is None else tp_size)


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
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ) -> None:
        super().__init__()
        tp_rank, tp_size = _tp(tp_rank, tp_size)
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
        if input_size_per_partition != input_size:
            input_size_per_partition = self._check_input_split(input_size_per_partition)
        if sum(output_partition_sizes) != output_size:
            output_partition_sizes = self._check_output_split(output_partition_sizes)
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

    def _check_input_split(self, per_rank: int) -> int:
        """The per-rank input size, if the method's split rule allows it (see ``LinearMethodBase``)."""
        multiple = getattr(self.quant_method, "input_split_multiple", 1)
        if per_rank % multiple:
            if self.input_size % self.tp_size == 0:  # (an uneven split was reported already)
                why = getattr(self.quant_method, "input_split_reason", "")
                split_problem(f"{self.prefix}: input size {self.input_size} splits into {per_rank} per rank over "
                              f"tensor_parallel_size {self.tp_size}; {type(self.quant_method).__name__} needs a "
                              f"multiple of {multiple} per rank" + (f" ({why})" if why else ""))
            per_rank = -(-per_rank // multiple) * multiple
        return per_rank

    def _check_output_split(self, partitions: list[int]) -> list[int]:
        """Per-rank output sizes of a column-parallel layer, if the method's rule allows them (INT4 packs
        rows in pairs)."""
        multiple = getattr(self.quant_method, "output_split_multiple", 1)
        if any(p % multiple for p in partitions):
            split_problem(f"{self.prefix}: output sizes split into {list(partitions)} per rank over "
                          f"tensor_parallel_size {self.tp_size}; {type(self.quant_method).__name__} needs multiples "
                          f"of {multiple} ({getattr(self.quant_method, 'output_split_reason', '')})")
            partitions = [-(-p // multiple) * multiple for p in partitions]
        return partitions

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

    @property
    def nvfp4_input_scale(self) -> torch.Tensor | None:
        """When this layer's kernel also takes NVFP4 block values, the global scale they must be quantized
        under (the kernel before it then writes them, ``kernels.quantized_input``); else None."""
        return self.quant_method.nvfp4_input_scale(self)

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
                         prefix, params_dtype, tp_rank=0, tp_size=1)


class ColumnParallelLinear(LinearBase):
    """Output rows split across ranks: ``Y_r = X W_r^T``."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, quant_config=None,
                 prefix: str = "", params_dtype=None, tp_rank: int | None = None, tp_size: int | None = None,
                 output_sizes: list[int] | None = None) -> None:
        tp_rank, tp_size = _tp(tp_rank, tp_size)
        self.output_sizes = list(output_sizes) if output_sizes is not None else [output_size]
        partitions = [divide(s, tp_size, f"{prefix}: output size") for s in self.output_sizes]
        super().__init__(input_size, output_size, input_size, partitions, bias, quant_config,
                         prefix, params_dtype, tp_rank, tp_size)

    def shard_spec(self, param, shard_id) -> ShardSpec:
        if shard_id is not None:
            return super().shard_spec(param, shard_id)
        return ShardSpec(split="output", slice_index=self.tp_rank, num_slices=self.tp_size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel weights fused on rows (gate/up); ``shard_id`` is their index."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_config=None, prefix: str = "", params_dtype=None, tp_rank: int | None = None,
                 tp_size: int | None = None) -> None:
        super().__init__(input_size, sum(output_sizes), bias, quant_config, prefix, params_dtype,
                         tp_rank, tp_size, output_sizes=output_sizes)

    def silu_gated(self, x: torch.Tensor, fp8_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """A gate/up pair's ``silu(gate) * up`` in one kernel where the layer's kernel fuses it (decode
        GEMVs), as ``kernels.glue.silu_mul(self(x), fp8_scale)`` computes it; else None."""
        if len(self.output_sizes) != 2 or self.output_sizes[0] != self.output_sizes[1]:
            return None
        return self.quant_method.apply_silu_gated(self, x, self.bias, fp8_scale)

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
                 prefix: str = "", params_dtype=None, tp_rank: int | None = None,
                 tp_size: int | None = None) -> None:
        tp_rank, tp_size = _tp(tp_rank, tp_size)
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, f"{prefix}: number of attention heads")
        if tp_size >= total_num_kv_heads:
            # Fewer KV heads than ranks: each rank holds one, replicated on tp_size / kv_heads ranks.
            self.num_kv_heads = 1
            if tp_size % total_num_kv_heads:
                split_problem(f"{prefix}: tensor_parallel_size {tp_size} is not a multiple of the "
                              f"{total_num_kv_heads} KV heads (each KV head must be replicated equally)")
            self.num_kv_head_replicas = max(1, tp_size // total_num_kv_heads)
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, f"{prefix}: number of KV heads")
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
    """Input columns split across ranks: ``Y = sum_r X_r W_r^T``, all-reduced over the tensor-parallel
    group when the layer was built in one (``reduce_results``).

    Formats that scale activations per token at run time (FP8_PER_CHANNEL_PER_TOKEN) take each
    token's amax over its whole input row, not the rank's slice: the layer's
    ``reduce_token_amax`` (a MAX all-reduce) lets the kernels quantize exactly as one rank would;
    on one node's GPUs ``token_fp8_over_peers`` does it in one kernel instead (``kernels.linear.layer_per_token_fp8``).
    """

    partials_to = None  # during forward(reduce=False): the fused all-reduce + norm its output goes to

    def __init__(self, input_size: int, output_size: int, bias: bool = False, quant_config=None,
                 prefix: str = "", params_dtype=None, tp_rank: int | None = None, tp_size: int | None = None,
                 reduce_results: bool = True) -> None:
        tp_rank, tp_size = _tp(tp_rank, tp_size)
        self.reduce_results = reduce_results
        super().__init__(input_size, output_size, divide(input_size, tp_size, f"{prefix}: input size"),
                         [output_size], bias, quant_config, prefix, params_dtype, tp_rank, tp_size)
        self.tp_group = group_for(tp_size)
        if self.tp_group is not None:
            self.reduce_token_amax = lambda amax: all_reduce(amax, self.tp_group, op="max")
            self.token_fp8_over_peers = lambda x2: self.tp_group.per_token_fp8(x2)

    def shard_spec(self, param, shard_id) -> ShardSpec:
        if shard_id is not None:
            return super().shard_spec(param, shard_id)
        if param is self.bias:
            return ShardSpec()
        return ShardSpec(split="input", slice_index=self.tp_rank, num_slices=self.tp_size)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """``reduce=False``: this rank's partial sums, for the next RMSNorm, which all-reduces them (in
        its own kernel on one node's GPUs). That kernel may then receive the peers' rows straight from
        their GEMVs: the layer names it to its kernel as ``partials_to`` for the call."""
        # The bias is added once, by rank 0, so that the all-reduce sums it once.
        bias = self.bias if self.tp_rank == 0 else None
        norm = None
        if not reduce and self.tp_group is not None and getattr(self.quant_method, "returns_kernel_output", False):
            norm = self.tp_group.partial_sums_norm()
        if norm is None:
            y = self.quant_method.apply(self, x, bias)
        else:
            self.partials_to = norm
            try:
                y = self.quant_method.apply(self, x, bias)
            finally:
                self.partials_to = None
        if reduce and self.reduce_results and self.tp_group is not None:
            y = all_reduce(y, self.tp_group)
        return y


class ParallelLMHead(ColumnParallelLinear):
    """The output projection onto the vocabulary, vocabulary-parallel under tensor parallelism: rank
    ``r`` holds the rows ``[r * R, (r + 1) * R)`` with ``R = ceil(vocab / tp)`` (the rows
    :class:`~mopt.layers.basic.VocabEmbedding` holds), and ``forward`` all-gathers the ranks' logits into
    the full vocabulary on every rank. A vocabulary that does not divide evenly is padded with zero
    rows, which only an unquantized head can take (quantized rows carry scales per shard)."""

    def __init__(self, hidden_size: int, vocab_size: int, quant_config=None, prefix: str = "lm_head",
                 params_dtype=None) -> None:
        from mopt.layers.basic import vocab_rows_per_rank

        _, tp_size = _tp(None, None)
        self.vocab_size = vocab_size
        padded = vocab_rows_per_rank(vocab_size, tp_size) * tp_size
        super().__init__(hidden_size, padded, quant_config=quant_config, prefix=prefix, params_dtype=params_dtype)
        if padded != vocab_size and not isinstance(self.quant_method, UnquantizedLinearMethod):
            split_problem(f"{prefix}: vocabulary size {vocab_size} is not divisible by tensor_parallel_size {tp_size} "
                          f"and a {type(self.quant_method).__name__} head cannot be padded (only an unquantized one)")
        self.tp_group = group_for(tp_size)

    def shard_spec(self, param, shard_id) -> ShardSpec:
        if self.tp_size == 1 and shard_id is None:
            return ShardSpec()  # the whole tensor, as a replicated layer loads it
        return super().shard_spec(param, shard_id)

    def weight_loader(self, param: BaseParameter, loaded: torch.Tensor, shard_id=None) -> None:
        if self.output_size == self.vocab_size or shard_id is not None:
            return super().weight_loader(param, loaded, shard_id)
        from mopt.layers.basic import load_vocab_rows

        load_vocab_rows(param, loaded, self.vocab_size, self.tp_rank)

    def tie_to(self, embedding: nn.Module) -> None:
        """Use ``embedding``'s weight (tied word embeddings); both hold the same vocabulary rows."""
        if self.tp_size == 1:
            self.weight_loader(self.weight, embedding.weight.data)
        else:
            self.weight.load(embedding.weight.data, ShardSpec())

    def forward(self, x: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Logits over the whole vocabulary; ``gather=False``: this rank's :meth:`shard_columns` of them
        alone (``gather`` makes them whole later)."""
        y = super().forward(x)
        if self.tp_group is None:
            return y
        return self.gather(y) if gather else y[..., : self.shard_columns()[1]]

    def shard_columns(self) -> tuple[int, int]:
        """``(first, count)``: this rank's logits are those of the ids ``first .. first + count - 1`` (the
        padding rows of an uneven split are not among them)."""
        first = self.tp_rank * self.output_size_per_partition
        return first, max(0, min(self.output_size_per_partition, self.vocab_size - first))

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The whole vocabulary's logits from every rank's ``forward(x, gather=False)`` (a collective)."""
        from mopt.engine.distributed import all_gather_last_dim

        rows = self.output_size_per_partition
        if shard.shape[-1] != rows:  # the last rank of an uneven split: its padding columns back, as zeros
            shard = torch.nn.functional.pad(shard, (0, rows - shard.shape[-1]))
        logits = all_gather_last_dim(shard, self.tp_group, self.tp_size)
        return logits if self.output_size == self.vocab_size else logits[..., : self.vocab_size].contiguous()
