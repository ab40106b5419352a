"""``mopt inspect``: what a checkpoint holds and how mopt would run each layer.

Reads only ``config.json``, the quant config and the safetensors headers (no tensor data), so
it is instant even for large checkpoints.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mopt.engine.checkpoint import (  # noqa: F401  (CheckpointError and the reader are public here too)
    DTYPE_BYTES,
    FLOAT_DTYPES,
    CheckpointError,
    checkpoint_files,
    read_checkpoint,
    read_safetensors_header,
)
from mopt.jsonio import read_json_object
from mopt.quant.config import load_quant_config

_SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale")


@dataclass
class Inspection:
    path: Path
    architecture: str
    quant: object
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    params_bf16_bytes: int = 0
    layers: list[tuple[str, str, str]] = field(default_factory=list)  # (module, method, weight dtype)
    warnings: list[str] = field(default_factory=list)
    # MoE blocks: experts prefix -> (method, number of experts, bytes per expert, weight dtype)
    experts: dict[str, tuple[str, int, int, str]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())


def _method_name(quant, module: str) -> str:
    if quant is None:
        return "UnquantizedLinearMethod"
    if quant.is_layer_excluded(module):
        return "UnquantizedLinearMethod (excluded)"
    return quant.linear_method_name(module)  # per layer for MIXED_PRECISION; imports no method (nor torch)


_EXPERT = re.compile(r"^(?P<block>.*\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)\.(?P<suffix>.+)$")
_GATED_PAIRS = (("gate_proj", "up_proj"), ("w1", "w3"))


def _moe_method_name(quant, prefix: str) -> str:
    if quant is None or quant.is_layer_excluded(prefix):
        return "UnquantizedFusedMoEMethod"
    name = quant.moe_method_name(prefix)
    return name if name is not None else f"unsupported ({quant.quant_method} experts)"


def _collect_experts(info: Inspection, tensors: dict[str, dict], root: Path) -> set[str]:
    """Group per-expert tensors by MoE block; returns the expert module names it accounted for."""
    sizes: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    dtypes: dict[str, str] = {}
    modules: set[str] = set()
    for name, t in tensors.items():
        m = _EXPERT.match(name)
        if not m:
            continue
        numel = 1
        for d in t["shape"]:
            numel *= d
        sizes[m["block"]][int(m["e"])] += numel * DTYPE_BYTES.get(t["dtype"], 0)
        if m["suffix"] == "weight":
            dtypes[m["block"]] = t["dtype"]
            modules.add(name[: -len(".weight")])
    for block, per_expert in sorted(sizes.items(), key=lambda item: natural_key(item[0])):
        info.experts[block] = (_moe_method_name(info.quant, block), len(per_expert),
                               max(per_expert.values()), dtypes.get(block, "?"))
    _check_gated_scales(info, tensors, root)
    return modules


def _check_gated_scales(info: Inspection, tensors: dict[str, dict], root: Path) -> None:
    """Warn where an expert's w1 and w3 (gate/up) global or per-tensor weight scales differ: fused
    kernels take one w13 scale, so such checkpoints are re-quantized (FP8) or lose accuracy there."""
    from safetensors import safe_open

    wanted = []
    for name in tensors:
        m = _EXPERT.match(name)
        if m and m["suffix"] in ("weight_scale_2", "weight_scale") and tensors[name]["shape"] in ([], [1]):
            for first, second in _GATED_PAIRS:
                if m["proj"] == first:
                    other = f"{m['block']}.{m['e']}.{second}.{m['suffix']}"
                    if other in tensors:
                        wanted.append((m["block"], name, other))
    if not wanted:
        return
    values: dict[str, float] = {}
    for f in checkpoint_files(root):
        with safe_open(f, framework="pt") as reader:
            keys = set(reader.keys())
            for _, a, b in wanted:
                for k in (a, b):
                    if k in keys:
                        values[k] = float(reader.get_tensor(k).float().reshape(-1)[0])
    mismatched: dict[str, int] = defaultdict(int)
    for block, a, b in wanted:
        if a in values and b in values and values[a] != values[b]:
            mismatched[block] += 1
    for block, n in sorted(mismatched.items()):
        info.warnings.append(f"{block}: {n} expert(s) with different w1/w3 weight scales "
                             "(merged into one w13 scale when loaded)")


def natural_key(name: str) -> tuple:
    """Sort key that orders numbered parts by value: ``layers.2`` before ``layers.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def inspect_checkpoint(path: str | Path) -> Inspection:
    root = Path(path)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{root}: no config.json")
    config = read_json_object(config_path, CheckpointError)
    architectures = config.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures else "?"
    info = Inspection(root, str(architecture), load_quant_config(root))
    _, tensors = read_checkpoint(root)
    by_dtype: dict[str, int] = defaultdict(int)
    for name, t in tensors.items():
        numel = 1
        for d in t["shape"]:
            numel *= d
        by_dtype[t["dtype"]] += numel * DTYPE_BYTES.get(t["dtype"], 0)
        if name.endswith(_SCALE_SUFFIXES):
            continue
        logical = numel * (2 if t["dtype"] == "U8" else 1)  # packed FP4: two values per byte
        info.params_bf16_bytes += logical * 2
    info.bytes_by_dtype = dict(sorted(by_dtype.items()))
    expert_modules = _collect_experts(info, tensors, root)
    for name, t in sorted(tensors.items(), key=lambda item: natural_key(item[0])):
        if not name.endswith(".weight") or len(t["shape"]) != 2 or "norm" in name or "embed" in name:
            continue
        if name[: -len(".weight")] in expert_modules:
            continue
        module = name[: -len(".weight")]
        info.layers.append((module, _method_name(info.quant, module), t["dtype"]))
    _check_layer_scales(info, tensors, root)
    return info


def _check_layer_scales(info: Inspection, tensors: dict[str, dict], root: Path) -> None:
    """Warn where a layer's quantized weight has no scale (it would not load)."""
    for module, method, dtype in info.layers:
        if dtype in ("F8_E4M3", "U8") and f"{module}.weight_scale" not in tensors:
            info.warnings.append(f"{module}: {dtype} weight without weight_scale")
        if dtype in FLOAT_DTYPES and "excluded" not in method and info.quant is not None:
            info.warnings.append(f"{module}: stored as {dtype} although not excluded; runs unquantized")


def format_inspection(info: Inspection, max_layers: int = 40) -> str:
    q = info.quant
    lines = [f"checkpoint   {info.path}", f"architecture {info.architecture}"]
    if q is None:
        lines.append("quantization none (unquantized checkpoint)")
    else:
        per_layer = f" ({', '.join(q.algos)})" if hasattr(q, "algos") else ""  # MIXED_PRECISION
        lines += [f"quantization {q.get_name()} quant_algo={q.quant_method}{per_layer} "
                  f"kv_cache={q.kv_cache_quant_algo or 'model dtype'}",
                  f"excluded     {', '.join(q.exclude_modules) or '-'}"]
    lines.append("bytes by dtype:")
    for dtype, n in info.bytes_by_dtype.items():
        lines.append(f"  {dtype:8s} {n / 2**20:10.2f} MiB")
    total = info.total_bytes
    ratio = info.params_bf16_bytes / total if total else 0.0
    lines.append(f"  total    {total / 2**20:10.2f} MiB   (bf16 would be {info.params_bf16_bytes / 2**20:.2f} MiB: "
                 f"{ratio:.2f}x compression)")
    lines.append("layers (module, method, stored dtype):")
    for module, method, dtype in info.layers[:max_layers]:
        lines.append(f"  {module:50s} {method:36s} {dtype}")
    if len(info.layers) > max_layers:
        lines.append(f"  ... {len(info.layers) - max_layers} more")
    if info.experts:
        lines.append("mixture-of-experts blocks (experts, method, bytes per expert, weight dtype):")
        for block, (method, count, per_expert, dtype) in list(info.experts.items())[:max_layers]:
            lines.append(f"  {block:50s} {count} x {per_expert / 2**10:.1f} KiB  {method}  {dtype}")
    for w in info.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
