"""Sweep the weight-decoding family's tiles on the GPU (Llama-3-8B layer shapes): the one-token GEMV
(``triton_weight_gemv``) at M=1 and the MMA kernel (``triton_weight_prefill.wo_mma``) at a few
tokens, next to BF16 cuBLAS on the same activations.

Timed like ``mopt bench kernels`` (a CUDA graph of calls cycling through weight copies larger than L2;
median of replays). Prints the best config per (format, shape, M) and the ratio to BF16;
``--json`` keeps all rows.
Usage: PYTHONPATH=src:tests python3 bench/sweep_weight_only.py [--json OUT] [--what gemv,mma]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch

from mopt.bench.kernels import L2_BYTES, _time
from mopt.kernels.linear import LinearScheme as S
from mopt.kernels.triton_weight_gemv import GemvTiles, weight_gemv
from mopt.kernels.triton_weight_only import SCHEMES, TritonWeightOnlyKernel
from mopt.kernels.triton_weight_prefill import MmaTiles, wo_mma

GEMV_SHAPES = [(4096, 4096), (28672, 4096)]
MMA_SHAPES = [(4096, 4096), (28672, 4096)]
MMA_TOKENS = [16, 128]
GEMV_SCHEMES = [S.INT4_WO, S.NVFP4_WO]
MMA_SCHEMES = [S.INT4_WO, S.NVFP4_WO, S.INT8_WO, S.FP8_BLOCK_WO]


def _layers(scheme, n, k, copies):
    from kernels.test_triton_weight_only import canonical_layer

    out = []
    for _ in range(copies):
        layer = canonical_layer(scheme, n, k, "cuda")
        TritonWeightOnlyKernel().process_weights(layer)
        out.append(layer)
    return out


def gemv_configs():
    for bn, row_bytes in ((8, 512), (16, 256), (16, 512), (16, 128), (32, 128), (32, 256), (64, 64)):
        yield GemvTiles(bn, row_bytes, 4, 2, True)
        yield GemvTiles(bn, row_bytes, 8, 2, False)


def mma_configs(scheme, m):
    bks = (128,) if scheme in (S.INT4_WO, S.FP8_BLOCK_WO) else (128, 256)
    shapes = [(16, 64, 4), (16, 128, 4), (16, 128, 8)] if m <= 16 else \
        [(64, 64, 4), (64, 128, 8), (128, 64, 4), (128, 128, 8)] if m <= 256 else [(128, 128, 8), (128, 256, 8)]
    for (bm, bn, warps), bk in itertools.product(shapes, bks):
        yield MmaTiles(bm, bn, bk, warps, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--what", default="gemv,mma")
    args = parser.parse_args()
    what = args.what.split(",")
    dev = torch.device("cuda")
    rows = []
    plans = []
    if "gemv" in what:
        plans += [(s, n, k, 1, list(gemv_configs())) for s in GEMV_SCHEMES for n, k in GEMV_SHAPES]
    if "mma" in what:
        plans += [(s, n, k, m, list(mma_configs(s, m))) for s in MMA_SCHEMES for n, k in MMA_SHAPES
                  for m in MMA_TOKENS]
    for scheme, n, k, m, configs in plans:
        copies = max(2, min(8, math.ceil(2 * L2_BYTES / (n * k))))
        layers = _layers(scheme, n, k, copies)
        wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        bf16 = _time([lambda w=w: torch.nn.functional.linear(x, w) for w in wb], 20, 5)
        spec = SCHEMES[scheme]
        best = None
        for t in configs:
            try:
                if m == 1:
                    fns = [lambda l=l: weight_gemv(x, spec.fmt, l.weight, l.wo_scale, l.wo_rows, None, n, k, l.wo_group,
                                                   spec.fp4_group, None, torch.bfloat16, t) for l in layers]
                else:
                    fns = [lambda l=l: wo_mma(x, spec.fmt, l.weight, l.wo_scale, l.wo_rows, None, n, k, l.wo_group,
                                              spec.fp4_group, None, torch.bfloat16, False, t)
                           for l in layers]
                us = 1e6 * _time(fns, 20, 5)
            except Exception as e:  # out of resources for a config: skip it
                print(f"skip {t}: {type(e).__name__}: {str(e)[:120]}")
                continue
            row = dict(scheme=scheme.value, n=n, k=k, m=m, tiles=str(t), us=us, bf16_us=bf16 * 1e6,
                       vs_bf16=bf16 * 1e6 / us)
            rows.append(row)
            if best is None or us < best["us"]:
                best = row
        if best:
            print(f"{scheme.value:>24} {n}x{k} M={m}: best {best['tiles']} {best['us']:.1f} us, bf16 "
                  f"{best['bf16_us']:.1f} us, x{best['vs_bf16']:.2f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    # the config that is best on average (geometric mean of its time / the best time of each case)
    for m in sorted({r["m"] for r in rows}):
        cases = {}
        for r in rows:
            if r["m"] == m:
                cases.setdefault((r["scheme"], r["n"], r["k"]), []).append(r)
        score = {}
        for case in cases.values():
            top = min(r["us"] for r in case)
            for r in case:
                score.setdefault(r["tiles"], []).append(math.log(r["us"] / top))
        ranked = sorted((sum(v) / len(v), t) for t, v in score.items() if len(v) == len(cases))
        for s, t in ranked[:3]:
            print(f"M={m}: {t} within {100 * (math.exp(s) - 1):.1f}% of each case's best on average")


if __name__ == "__main__":
    main()
