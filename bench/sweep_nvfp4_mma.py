"""NVFP4 (W4A4) GEMMs of a few tokens: the weight-decoding MMA kernel (``triton_weight_prefill.wo_mma`` on
the activations' block values, both global scales as one row scale) against ``triton_gemm.nvfp4_gemm``
on Llama-3-8B layer shapes, whole and per rank of two. Microseconds per call in a CUDA graph, and the
relative L2 difference of the two outputs. When this chose the MMA kernel (93c98eb, results in
``bench/results/sweep-nvfp4-mma-h200-2026-11-26.txt``), ``nvfp4_gemm`` ran 16-row tiles of its
packed-weight kernel up to 16 tokens and expanded the weights to BF16 for cuBLAS above; it now expands
from 2 tokens.

Usage: python3 bench/sweep_nvfp4_mma.py [--json out.json]
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
TOKENS = [2, 8, 16, 32, 64, 128, 256]


def _weights(n: int, k: int, device):
    g = torch.Generator().manual_seed(n + k)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(device)
    scale = (torch.rand(n, k // 16, generator=g) * 2 + 0.25).to(torch.float8_e4m3fn).to(device)
    return packed, scale, torch.tensor(0.02, device=device), torch.full((n,), 0.003, device=device)


def main() -> None:
    import triton.testing

    from mopt.kernels import triton_gemm, triton_quant
    from mopt.kernels.triton_weight_decode import NVFP4
    from mopt.kernels.triton_weight_prefill import wo_mma

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    print(f"{torch.cuda.get_device_name(device)}; us per call (CUDA graph); mma / gemm")
    for n, k in SHAPES:
        packed, scale, a_global, b_global = _weights(n, k, device)
        alpha = triton_gemm.nvfp4_alpha(a_global, b_global)
        row_alpha = (a_global.float() * b_global.float()).contiguous()
        for m in TOKENS:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            values = triton_quant.nvfp4_block_values(x, a_global)

            def gemm():
                return triton_gemm.nvfp4_gemm(values, packed, scale, a_global, b_global, None, torch.bfloat16, alpha)

            def mma():
                return wo_mma(values, NVFP4, packed, scale, row_alpha, None, n, k, 0, 16, None, torch.bfloat16, False)

            a, b = gemm().float(), mma().float()
            rel = ((a - b).norm() / a.norm()).item()
            t_gemm = triton.testing.do_bench_cudagraph(gemm, rep=50) * 1000
            t_mma = triton.testing.do_bench_cudagraph(mma, rep=50) * 1000
            rows.append(dict(n=n, k=k, m=m, gemm_us=t_gemm, mma_us=t_mma, rel=rel))
            print(f"{n:>6}x{k:<6} M={m:<4} gemm {t_gemm:7.1f}  mma {t_mma:7.1f}  x{t_gemm / t_mma:5.2f}  rel {rel:.1e}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
