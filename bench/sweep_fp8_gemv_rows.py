"""FP8 layers at 17-64 tokens (batch-32/64 decode): the decode GEMV, whose 64-row E4M3 dots now promote their
sums into float32 every 128 products, against cuBLASLt's ``_scaled_mm`` as ``triton_linear`` calls it (one
scale: per-tensor; rowwise: fused shards keeping their own weight scales, the per-row GEMM that costs more).
Llama-3-8B's layers whole and as one rank of two holds them. At 64 rows a tile grid, K split over programs
(``GemvTiles.split_k``) included; gate/up also as the SiLU-gated GEMV over the unsplit grid, against
``_scaled_mm`` + ``silu_mul``; every config's time goes to the JSON. Each timed like ``mopt bench kernels``
(CUDA graph, weight copies larger than L2); the error is against float64 sums of the same codes.
Usage: PYTHONPATH=src python3 bench/sweep_fp8_gemv_rows.py [OUT.json]"""
import itertools
import json
import math
import sys

import torch

from mopt.bench.kernels import L2_BYTES, _time
from mopt.kernels import triton_glue, triton_gemv
from mopt.quant.formats import fp8

# (n, k, role): whole layers, then one rank of two
SHAPES = [(6144, 4096, "qkv"), (4096, 4096, "o"), (28672, 4096, "gate_up"), (4096, 14336, "down"),
          (3072, 4096, "qkv"), (4096, 2048, "o"), (14336, 4096, "gate_up"), (4096, 7168, "down")]
TILES = [triton_gemv.GemvTiles(bn, bk, w, st, dot=True, block_m=64)
         for bn, bk, w, st in itertools.product((16, 32, 64, 128), (128, 256), (4,), (3, 4, 5))]
TILES += [triton_gemv.GemvTiles(bn, bk, 4, 5, dot=True, block_m=64, split_k=sk)  # K split over programs
          for bn, bk, sk in itertools.product((32, 64), (128, 256), (2, 4))]
dev = torch.device("cuda")
rows = []


def rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def scaled_mm(xq, xs, wq, ws, rowwise):
    if not rowwise:
        return torch._scaled_mm(xq, wq.t(), scale_a=xs.reshape(()), scale_b=ws.reshape(()), out_dtype=torch.bfloat16)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs.reshape(-1, 1).expand(xq.shape[0], 1).contiguous(),
                            scale_b=ws.reshape(1, -1), out_dtype=torch.bfloat16)


for n, k, role in SHAPES:
    copies = max(2, min(8, math.ceil(2 * L2_BYTES / (n * k))))
    g = torch.Generator(device=dev).manual_seed(n + k)
    ws = []
    for _ in range(copies):
        w = torch.randn(n, k, device=dev, generator=g) * 0.02
        wq, s = fp8.quantize_per_channel(w)
        ws.append((wq, s.reshape(-1).float(), s.reshape(-1).amax().reshape(1).float()))
    for m in (32, 64):
        x = torch.randn(m, k, device=dev, generator=g)
        xq, xs = fp8.quantize_per_tensor(x)
        xs = xs.reshape(1).float()
        want = (fp8.to_float32(xq).double() @ fp8.to_float32(ws[0][0]).double().t()) * xs.double() \
            * ws[0][1].double()[None, :]
        for rowwise in (False, True):
            pick = (lambda c: c[1]) if rowwise else (lambda c: c[2])
            cublas = 1e6 * _time([lambda c=c: scaled_mm(xq, xs, c[0], pick(c), rowwise) for c in ws], 20, 5)
            row = dict(n=n, k=k, role=role, m=m, rowwise=rowwise, cublas_us=cublas)
            default = triton_gemv.gemv_tiles(m, n, k, 1)
            grid = TILES if (m == 64 and rowwise) else [default]  # (64-row tiles: any M of 17-64 costs the same)
            best = None
            row["configs"] = []
            for t in grid:
                try:
                    us = 1e6 * _time([lambda c=c: triton_gemv.fp8_gemv(xq, c[0], xs, pick(c), None, torch.bfloat16, t)
                                      for c in ws], 20, 5)
                except Exception as e:  # out of shared memory for a config
                    print(f"  skip {t}: {type(e).__name__}", file=sys.stderr)
                    continue
                row["configs"].append(dict(t.__dict__, us=us))
                if t == default:
                    row["gemv_us"] = us
                if best is None or us < best[0]:
                    best = (us, t)
            row["best_us"], row["best_tiles"] = best[0], best[1].__dict__
            if rowwise:
                got = triton_gemv.fp8_gemv(xq, ws[0][0], xs, ws[0][1], None, torch.float32, default)
                row["gemv_rel"] = rel(got, want)
                got = scaled_mm(xq, xs, ws[0][0], ws[0][1], True).float()
                row["cublas_rel"] = rel(got, want)
            if role == "gate_up":
                half = n // 2
                two = 1e6 * _time([lambda c=c: triton_glue.silu_mul(scaled_mm(xq, xs, c[0], pick(c), rowwise))
                                   for c in ws], 20, 5)
                gated = 1e6 * _time([lambda c=c: triton_gemv.silu_gated_gemv(xq, c[0], xs, pick(c), None,
                                                                            torch.bfloat16) for c in ws], 20, 5)
                row.update(cublas_silu_us=two, gated_gemv_us=gated, gated_configs=[])
                for t in (t for t in grid if t.split_k == 1) if len(grid) > 1 else []:
                    try:
                        us = 1e6 * _time([lambda c=c: triton_gemv.silu_gated_gemv(xq, c[0], xs, pick(c), None,
                                                                                 torch.bfloat16, tiles=t)
                                          for c in ws], 20, 5)
                    except Exception:  # out of shared memory: two weight tiles a stage
                        continue
                    row["gated_configs"].append(dict(t.__dict__, us=us))
                if row["gated_configs"]:
                    g_best = min(row["gated_configs"], key=lambda c: c["us"])
                    row["gated_best_us"] = g_best["us"]
                    print(f"  gated best {g_best['us']:.1f} us {g_best['block_n']}x{g_best['block_k']} "
                          f"s{g_best['num_stages']}; plain GEMV best + SiLU kernel ~{best[0] + two - row['cublas_us']:.1f}")
            rows.append(row)
            print(f"{n}x{k} {role:7s} M={m} {'rowwise' if rowwise else 'one-scale'}: cuBLAS {cublas:6.1f} us"
                  f" ({n * k / cublas / 1e6:.2f} TB/s) | GEMV {row.get('gemv_us', float('nan')):6.1f}"
                  f" best {best[0]:6.1f} {best[1].block_n}x{best[1].block_k} s{best[1].num_stages} split{best[1].split_k}"
                  + (f" | rel gemv {row['gemv_rel']:.1e} cublas {row['cublas_rel']:.1e}" if rowwise else "")
                  + (f" | +silu: cuBLAS {row['cublas_silu_us']:.1f} gated GEMV {row['gated_gemv_us']:.1f}"
                     if role == "gate_up" else ""), flush=True)

for m in (32, 64):
    for rowwise in (False, True):
        sel = [r for r in rows if r["m"] == m and r["rowwise"] == rowwise]
        print(f"M={m} {'rowwise' if rowwise else 'one-scale'}: sum over shapes cuBLAS {sum(r['cublas_us'] for r in sel):.1f}"
              f" us, GEMV {sum(r.get('gemv_us', r['best_us']) for r in sel):.1f} us")
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f, indent=1)
