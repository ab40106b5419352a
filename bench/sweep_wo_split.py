"""How many ways ``triton_weight_prefill.wo_mma`` should split K at decode batch sizes: NVFP4 (W4A4 block
values) on Llama-3-8B layer shapes, whole and per rank of two, at each split count against the one
``split_k`` picks. Microseconds per call in a CUDA graph that cycles through enough copies of the weights
(over 256 MB) that each call reads them from HBM, as a decode step does, not from L2.

Usage: python3 bench/sweep_wo_split.py [--tokens 16,64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),  # whole layers
          (3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168)]  # per rank of two
SPLITS = [1, 2, 3, 4, 5, 6, 8, 12]
COLD_BYTES = 256 << 20


def main() -> None:
    import triton
    import triton.testing

    from mopt.kernels import triton_quant
    from mopt.kernels import triton_weight_prefill as twp
    from mopt.kernels.triton_weight_decode import NVFP4

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="16,64")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    chosen = twp.split_k
    rows = []
    print(f"{torch.cuda.get_device_name(device)}; us per call (CUDA graph, weights cold); * = split_k's choice")
    for n, k in SHAPES:
        copies = max(1, COLD_BYTES // (n * k // 2 + n * k // 16))
        g = torch.Generator().manual_seed(n + k)
        weights = [(torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(device),
                    (torch.rand(n, k // 16, generator=g) * 2 + 0.25).to(torch.float8_e4m3fn).to(device))
                   for _ in range(copies)]
        row_alpha = torch.full((n,), 6e-5, device=device)
        for m in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            values = triton_quant.nvfp4_block_values(x, torch.tensor(0.02, device=device))
            t = twp.mma_tiles(NVFP4, m, 0, values.dtype)
            programs = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
            k_tiles = triton.cdiv(k, t.block_k)
            default = chosen(programs, k_tiles, device, t.block_m)
            line, times = [], {}
            for split in sorted(set(SPLITS + [default])):
                if split > k_tiles:
                    continue
                twp.split_k = lambda *_, s=split: s

                def calls():
                    for packed, scale in weights:
                        twp.wo_mma(values, NVFP4, packed, scale, row_alpha, None, n, k, 0, 16, None, torch.bfloat16,
                                   False)

                calls()
                times[split] = triton.testing.do_bench_cudagraph(calls, rep=40) * 1000 / copies
                line.append(f"{split}{'*' if split == default else ''}:{times[split]:.1f}")
            twp.split_k = chosen
            best = min(times, key=times.get)
            rows.append(dict(n=n, k=k, m=m, programs=programs, default=default, us=times, best=best))
            print(f"{n:>6}x{k:<6} M={m:<3} tiles {programs:<4} best {best} ({times[best]:.1f} us, "
                  f"{times[default] / times[best]:.2f}x faster than {default}) | {' '.join(line)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
