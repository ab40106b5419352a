"""Sweep the FP8 (or BF16) decode GEMV's tiles on the GPU (Llama-3-8B layer shapes, M = 1 to 64).

Each config is timed like ``mopt bench kernels`` (a CUDA graph of calls cycling through weight copies
larger than L2; median of replays) next to BF16 cuBLAS, ``_scaled_mm`` and the split-K Triton GEMM
on the same pre-quantized activations. Prints the best configs per shape; ``--json`` keeps all rows.
Usage: PYTHONPATH=src python3 bench/sweep_gemv.py [--weights fp8|bf16] [--tokens 1,16] [--shapes NxK,...] [--json OUT]
(``--shapes tp2`` takes the Llama-3-8B layers as one rank of two holds them; ``all`` both sets.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch

from mopt.bench.kernels import L2_BYTES, _time
from mopt.kernels import triton_gemm
from mopt.kernels.triton_gemv import GemvTiles, fp8_gemv, gemv, gemv_tiles
from mopt.quant.formats import fp8

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
TP2_SHAPES = [(3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168)]


def configs(m: int, itemsize: int):
    if m == 1:  # the FMA loop (stages do not apply to it), tiles by bytes
        for bn, row_bytes, w in itertools.product((4, 8, 16), (512, 1024, 2048, 4096), (4, 8)):
            if bn * row_bytes <= min(32768, 256 * 32 * w):  # at most 256 bytes of weights a thread
                yield GemvTiles(bn, row_bytes // itemsize, w, 3, dot=False)
        return  # padded 16-row dots were never ahead of it by more than 3% (sweeps of 2026-11-26)
    if m > 16:  # 32-64 rows: fewer configs, the compile per BLOCK_M dominates the sweep
        for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256), (4, 8), (3, 5)):
            yield GemvTiles(bn, bk, w, s, dot=True)
        return
    for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 5)):
        if itemsize == 1 or bk <= 256:
            yield GemvTiles(bn, bk, w, s, dot=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--tokens", default="1,16")
    parser.add_argument("--weights", default="fp8", choices=["fp8", "bf16"])
    parser.add_argument("--shapes", default="", help="NxK,... or tp2 (default: the Llama-3-8B layers)")
    args = parser.parse_args()
    shapes = (TP2_SHAPES if args.shapes == "tp2" else SHAPES + TP2_SHAPES if args.shapes == "all" else
              [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES)
    dev = torch.device("cuda")
    rows = []
    for n, k in shapes:
        copies = max(2, min(8, math.ceil(2 * L2_BYTES / (n * k))))
        ws = [fp8.quantize_per_tensor(torch.randn(n, k, device=dev) * 0.02) for _ in range(copies)]
        wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        for m in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = fp8.quantize_per_tensor(x.float())
            xs1 = xs.reshape(1)
            base = {
                "bf16": _time([lambda w=w: torch.nn.functional.linear(x, w) for w in wb], 20, 5),
                "scaled_mm": _time([lambda q=q, s=s: torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s,
                                                                      out_dtype=torch.bfloat16) for q, s in ws], 20, 5),
                "splitk": _time([lambda q=q, s=s: triton_gemm.fp8_gemm(xq, q, xs1, s.reshape(1), None, torch.bfloat16)
                                 for q, s in ws], 20, 5),
            }
            best = None
            for t in configs(m, 1 if args.weights == "fp8" else 2):
                try:
                    if args.weights == "fp8":
                        fns = [lambda q=q, s=s: fp8_gemv(xq, q, xs1, s.reshape(1), None, torch.bfloat16, t) for q, s in ws]
                    else:
                        fns = [lambda w=w: gemv(x, w, None, t) for w in wb]
                    us = 1e6 * _time(fns, 20, 5)
                except Exception as e:  # out of resources for a config: skip it
                    print(f"skip {t}: {type(e).__name__}")
                    continue
                tb = (n * k * (1 if args.weights == "fp8" else 2) + m * k + 2 * m * n) / us / 1e6
                row = dict(n=n, k=k, m=m, tiles=t.__dict__, us=us, tb_s=tb, **{f"{b}_us": 1e6 * v for b, v in base.items()})
                rows.append(row)
                if best is None or us < best["us"]:
                    best = row
            current = gemv_tiles(m, n, k, 1 if args.weights == "fp8" else 2)
            now = next((r["us"] for r in rows if r["n"] == n and r["k"] == k and r["m"] == m
                        and r["tiles"] == current.__dict__), float("nan"))
            print(f"{n}x{k} M={m}: best {best['tiles']} {best['us']:.1f} us {best['tb_s']:.2f} TB/s (current tiles "
                  f"{now:.1f} us) | bf16 {best['bf16_us']:.1f} scaled_mm {best['scaled_mm_us']:.1f} splitk "
                  f"{best['splitk_us']:.1f}", flush=True)
    ranked = {}
    for r in rows:
        key = tuple(sorted(r["tiles"].items()))
        ranked.setdefault((r["m"], key), []).append(r["us"] / min(x["us"] for x in rows
                                                                    if x["n"] == r["n"] and x["k"] == r["k"] and x["m"] == r["m"]))
    for m in sorted({r["m"] for r in rows}):
        scored = sorted((sum(v) / len(v), key) for (mm, key), v in ranked.items() if mm == m and len(v) == len(shapes))
        print(f"M={m}: best single configs (mean slowdown vs per-shape best):")
        for score, key in scored[:5]:
            print(f"  {score:.3f} {dict(key)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
