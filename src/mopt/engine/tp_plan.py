"""What tensor parallelism makes of a model, worked out without any weights.

The model is built on the meta device once per rank, inside that rank's parallel state in collect
mode (``mopt.engine.distributed``): the layers apply their own split rules, so this reports exactly
what loading would do: each rank's parameter bytes and KV-cache bytes per token, and every layer
that cannot be split, with the reason. ``check_split`` raises on those problems; the engine calls it
before it starts any process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from mopt.engine.distributed import ParallelState, TensorParallelSplitError, parallel_state


@dataclass
class ShardPlan:
    tp_size: int
    expert_parallel: bool
    rank_bytes: list[int] = field(default_factory=list)  # parameters as loaded, before kernel conversion
    kv_bytes_per_token: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each names a layer, its sizes and the tp size
    total_bytes: int = 0  # the same model unsharded


def _params_dtype(config) -> torch.dtype:
    """The checkpoint's float dtype (unquantized tensors are held in it)."""
    dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def _build(config, quant, state: ParallelState, dtype: torch.dtype, kv_cache_dtype: str) -> torch.nn.Module:
    from mopt.engine.loader import build_model

    with parallel_state(state):
        return build_model(config, quant, torch.device("meta"), dtype, kv_cache_dtype)


def group_by_layer(problems: list[str]) -> list[str]:
    """Problems that repeat in every decoder layer, said once: ``model.layers.*.o_proj: ... (32 layers)``."""
    layers: dict[str, list[str]] = {}
    for p in problems:
        layers.setdefault(re.sub(r"\.layers\.\d+\.", ".layers.*.", p), []).append(p)
    return [group[0] if len(group) == 1 else f"{key} ({len(group)} layers)" for key, group in layers.items()]


def _bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def shard_plan(config, quant, tp_size: int, expert_parallel: bool = False, kv_cache_dtype: str = "auto") -> ShardPlan:
    from mopt.engine.loader import resolve_kv_cache_dtype
    from mopt.engine.runner import kv_bytes_per_token

    dtype = _params_dtype(config)
    kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, quant)
    plan = ShardPlan(tp_size, expert_parallel)
    plan.total_bytes = _bytes(_build(config, quant, ParallelState(), dtype, kv_cache_dtype))
    for rank in range(tp_size):
        problems: list[str] = []
        model = _build(config, quant, ParallelState(rank, tp_size, None, expert_parallel, problems), dtype,
                       kv_cache_dtype)
        plan.rank_bytes.append(_bytes(model))
        plan.kv_bytes_per_token.append(kv_bytes_per_token(model, dtype))
        plan.problems += [p for p in group_by_layer(problems) if p not in plan.problems]
    return plan


def check_split(config, quant, tp_size: int, expert_parallel: bool = False) -> None:
    """Raise :class:`TensorParallelSplitError` listing the layers that cannot be split over ``tp_size``."""
    problems: list[str] = []
    _build(config, quant, ParallelState(0, tp_size, None, expert_parallel, problems), _params_dtype(config), "auto")
    problems = group_by_layer(problems)
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise TensorParallelSplitError(f"cannot split the model over tensor_parallel_size {tp_size}: "
                                       + "; ".join(problems[:8]) + more)


def format_plan(plan: ShardPlan, max_problems: int = 40) -> str:
    mode = "expert parallel" if plan.expert_parallel else "experts split along their intermediate size"
    lines = [f"tensor parallel {plan.tp_size} ranks (mixture-of-experts: {mode}); parameter bytes as loaded:",
             f"  unsharded  {plan.total_bytes / 2**20:10.2f} MiB"]
    for rank, (n, kv) in enumerate(zip(plan.rank_bytes, plan.kv_bytes_per_token)):
        lines.append(f"  rank {rank:<5} {n / 2**20:10.2f} MiB   KV cache {kv} bytes/token")
    if plan.problems:
        lines.append(f"cannot split ({len(plan.problems)}):")
        lines += [f"  {p}" for p in plan.problems[:max_problems]]
        if len(plan.problems) > max_problems:
            lines.append(f"  ... {len(plan.problems) - max_problems} more")
    else:
        lines.append("every layer splits")
    return "\n".join(lines)
