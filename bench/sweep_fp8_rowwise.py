"""FP8 GEMMs of fused layers whose shards keep their own weight scales (one per output row), at decode
batch sizes: cuBLASLt's rowwise ``_scaled_mm`` (what ``hopper-fp8`` runs above 16 rows) against other
ways to the same product, next to the single-scale GEMM of the same shape as the floor.

* ``rowwise``: ``_scaled_mm`` with ``[M, 1]`` activation and ``[1, N]`` weight scales (BF16 out);
* ``tensor``: ``_scaled_mm`` with one scale each (the floor: what one-scale layers run);
* ``f32_then_scale``: one-scale ``_scaled_mm`` to float32 with the weight scale 1, then
  ``(y * w_scale).to(bf16)`` (two launches, exact products, one rounding);
* ``shards``: one single-scale ``_scaled_mm`` per shard, then ``torch.cat``.

Timed like ``mopt bench kernels`` (CUDA graph of calls cycling through weight copies beyond L2).
Usage: PYTHONPATH=src python3 bench/sweep_fp8_rowwise.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from mopt.bench.kernels import L2_BYTES, _time
from mopt.quant.formats import fp8

# (name, shard output sizes, K): Llama-3-8B's fused layers, whole and per rank of two
LAYERS = [("qkv", (4096, 1024, 1024), 4096), ("gate_up", (14336, 14336), 4096),
          ("qkv tp2", (2048, 512, 512), 4096), ("gate_up tp2", (7168, 7168), 4096)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--tokens", default="17,32,64")
    args = parser.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name, shards, k in LAYERS:
        n = sum(shards)
        copies = max(2, min(8, math.ceil(2 * L2_BYTES / (n * k))))
        weights = []
        for _ in range(copies):
            parts = [fp8.quantize_per_tensor(torch.randn(s, k, device=dev) * 0.02 * (i + 1)) for i, s in enumerate(shards)]
            w = torch.cat([q for q, _ in parts])
            scales = [s.reshape(()) for _, s in parts]
            rowwise = torch.cat([s.reshape(1).expand(size) for s, size in zip(scales, shards)]).reshape(1, n).contiguous()
            weights.append((w, scales, rowwise))
        one = torch.ones((), device=dev)
        for m in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(m, k, device=dev)
            xq, xs = fp8.quantize_per_tensor(x)
            xs = xs.reshape(())

            def rowwise(w, scales, rw):
                return torch._scaled_mm(xq, w.t(), scale_a=xs.reshape(1, 1).expand(m, 1).contiguous(), scale_b=rw,
                                        out_dtype=torch.bfloat16)

            def tensor(w, scales, rw):
                return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=scales[0], out_dtype=torch.bfloat16)

            def f32_then_scale(w, scales, rw):
                y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=one, out_dtype=torch.float32)
                return (y * rw).to(torch.bfloat16)

            def by_shard(w, scales, rw):
                outs, start = [], 0
                for s, size in zip(scales, shards):
                    outs.append(torch._scaled_mm(xq, w[start:start + size].t(), scale_a=xs, scale_b=s,
                                                 out_dtype=torch.bfloat16))
                    start += size
                return torch.cat(outs, dim=1)

            ref = rowwise(*weights[0]).float()
            row = {"layer": name, "n": n, "k": k, "m": m}
            for label, fn in (("rowwise", rowwise), ("tensor", tensor), ("f32_then_scale", f32_then_scale),
                              ("shards", by_shard)):
                row[f"{label}_us"] = 1e6 * _time([lambda c=c, fn=fn: fn(*c) for c in weights], 20, 5)
                if label != "tensor":
                    got = fn(*weights[0]).float()
                    row[f"{label}_max_rel"] = float((got - ref).abs().max() / ref.abs().max())
            rows.append(row)
            print(f"{name:>12} {n}x{k} M={m}: " + " ".join(
                f"{label} {row[f'{label}_us']:.1f} us" for label in ("rowwise", "tensor", "f32_then_scale", "shards"))
                + f" | rel. diff vs rowwise: f32 {row['f32_then_scale_max_rel']:.1e} shards {row['shards_max_rel']:.1e}",
                flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
