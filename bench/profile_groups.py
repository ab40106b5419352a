"""Kernel time per decode step by group, from two ``mopt bench generate --profile`` files (e.g. TP=1 and
TP=2 of the same model): ``python3 bench/profile_groups.py A.txt B.txt``. Groups: GEMV/GEMM, the
all-reduce/gather kernels (with the fused all-reduce + RMSNorm), attention + RoPE, RMSNorm, SiLU, NVFP4
activation quantization, other. Milliseconds per step, from the tables' self CUDA times."""

from __future__ import annotations

import re
import sys

GROUPS = [("all-reduce/gather", ("allreduce", "nccl", "one_shot", "symm")),
          ("GEMV/GEMM", ("gemv", "nvjet", "gemm", "splitk", "cutlass", "sm90_xmma")),
          ("attention+rope", ("decode", "rope", "prefill")), ("rms_norm", ("rms",)), ("silu", ("silu",)),
          ("nvfp4 quant/dequant", ("nvfp4",))]


def group_of(kernel: str) -> str:
    name = kernel.lower()
    return next((group for group, keys in GROUPS if any(k in name for k in keys)), "other")


def parse(path: str) -> dict[str, dict]:
    """``{section: {"head": line, "groups": {group: ms per step}}}`` of one profile file."""
    out, section, steps = {}, None, 1
    for line in open(path):
        if line.startswith("=== "):
            section = line[4:].strip()
            out[section] = {"head": "", "groups": {}}
        elif section and "GPU kernels" in line:
            out[section]["head"] = line.strip()
            steps = int(re.match(r"(\d+) decode steps", line).group(1))
        elif section:
            cols = re.split(r"\s{2,}", line.strip())
            if len(cols) >= 11 and cols[6].endswith(("us", "ms")):
                ms = float(cols[6][:-2]) / (1000 if cols[6].endswith("us") else 1) / steps
                groups = out[section]["groups"]
                groups[group_of(cols[0])] = groups.get(group_of(cols[0]), 0.0) + ms
    return out


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = parse(sys.argv[1]), parse(sys.argv[2])
    for section, left in a.items():
        right = b.get(section, {"head": "(missing)", "groups": {}})
        print(f"== {section}\n  A: {left['head']}\n  B: {right['head']}")
        for group in sorted(set(left["groups"]) | set(right["groups"]), key=lambda g: -left["groups"].get(g, 0)):
            print(f"   {group:20s} A {left['groups'].get(group, 0):6.3f} ms  B {right['groups'].get(group, 0):6.3f} ms")


if __name__ == "__main__":
    main()
