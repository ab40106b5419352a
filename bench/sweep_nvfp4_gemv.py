"""Sweep the one-token NVFP4 kernel's tiles and split-K on the GPU (Llama-3-8B layers, whole and per rank of two).

Times whole ``triton_gemm.nvfp4_gemm`` calls (with split-K: the zeroed float32 buffer, the kernel and the
cast to BF16), like ``mopt bench kernels`` (a CUDA graph of calls cycling through weight copies beyond L2;
median of replays). Prints each shape's best config next to the current one.
Usage: PYTHONPATH=src python3 bench/sweep_nvfp4_gemv.py [--json OUT] [--wide]
(Before 93c98eb the kernel also took up to 16 tokens, in 16-row tiles, and ``--tokens`` swept those; 2 to 128
tokens now run on ``triton_weight_prefill.wo_mma``: see ``bench/sweep_nvfp4_mma.py``.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch

from mopt.bench.kernels import L2_BYTES, _time
from mopt.kernels import triton_gemm
from mopt.quant.formats import nvfp4

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
          (3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--wide", action="store_true",
                        help="one token, no split-K: wider rows (512-4096 elements, at most 16384 a program)")
    args = parser.parse_args()
    dev = torch.device("cuda")
    rows = []
    for n, k in SHAPES:
        copies = max(2, min(8, math.ceil(2 * L2_BYTES / (n * k // 2))))
        ws = []
        for _ in range(copies):
            w = torch.randn(n, k, device=dev) * 0.02
            g = nvfp4.global_scale_from_amax(w.abs().amax())
            packed, scale = nvfp4.quantize(w, g)
            ws.append((packed, scale, g.reshape(1).expand(n).contiguous()))
        for m in (1,):
            a = torch.randn(m, k, device=dev).to(torch.bfloat16)
            a_global = torch.tensor(0.02, device=dev)
            results = {}
            configs = [None] + ([c for c in itertools.product((4, 8, 16), (512, 1024, 2048, 4096), (4, 8), (4,), (1,))
                                 if c[0] * c[1] <= 16384] if args.wide else
                                [c for c in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (3, 4), (1, 2, 4))])
            for cfg in configs:
                try:
                    fns = [lambda p=p, s=s, g=g, c=cfg: triton_gemm.nvfp4_gemm(a, p, s, a_global, g, None, torch.bfloat16,
                                                                                config=c) for p, s, g in ws]
                    results[cfg] = 1e6 * _time(fns, 20, 5)
                except Exception as e:  # out of resources: skip
                    print(f"skip {cfg}: {type(e).__name__}")
            best = min((c for c in results if c is not None), key=results.get)
            print(f"{n}x{k} M={m}: current {results[None]:.1f} us, best {best} {results[best]:.1f} us "
                  f"({n * k * 0.5625 / results[best] / 1e6:.2f} TB/s); best without split-K: "
                  f"{min((r, c) for c, r in results.items() if c is not None and c[4] == 1)}", flush=True)
            rows.append(dict(n=n, k=k, m=m, current_us=results[None],
                             configs=[dict(config=c, us=u) for c, u in results.items() if c is not None]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
