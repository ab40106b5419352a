"""FP8 per-tensor GEMMs at 32 and 64 tokens (batch-32/64 decode) on Llama-3-8B's layers, whole and as one rank
of two holds them: cuBLASLt's ``_scaled_mm`` against ``triton_gemm.fp8_gemm`` (which promotes its FP8 MMA sums
to float32 every 128 products, as cuBLASLt does) over 54 tile / split-K configs, each timed like
``mopt bench kernels`` (CUDA graph, weight copies larger than L2). Prints the best config per shape and its
error against a float32 ``_scaled_mm``. Usage: PYTHONPATH=src python3 bench/sweep_fp8_gemm_m64.py OUT.json"""
import itertools, math, sys, json
import torch
from mopt.bench.kernels import L2_BYTES, _time
from mopt.kernels import triton_gemm
from mopt.quant.formats import fp8

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168)]
dev = torch.device("cuda")
out = []
for n, k in SHAPES:
    copies = max(2, min(8, math.ceil(2 * L2_BYTES / (n * k))))
    ws = [fp8.quantize_per_tensor(torch.randn(n, k, device=dev) * 0.02) for _ in range(copies)]
    for m in (32, 64):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, xs = fp8.quantize_per_tensor(x.float())
        xs1 = xs.reshape(1)
        sm = 1e6 * _time([lambda q=q, s=s: torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s, out_dtype=torch.bfloat16)
                          for q, s in ws], 20, 5)
        ref = torch._scaled_mm(xq, ws[0][0].t(), scale_a=xs, scale_b=ws[0][1], out_dtype=torch.float32)
        best = None
        for bn, bk, st, sk in itertools.product((32, 64, 128), (128, 256), (3, 4, 6), (1, 2, 4)):
            cfg = dict(BLOCK_M=64 if m > 32 else 32, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, GROUP_M=8, num_warps=4,
                       num_stages=st)
            try:
                f = [lambda q=q, s=s: triton_gemm.fp8_gemm(xq, q, xs1, s.reshape(1), None, torch.bfloat16, config=cfg)
                     for q, s in ws]
                us = 1e6 * _time(f, 20, 5)
                got = triton_gemm.fp8_gemm(xq, ws[0][0], xs1, ws[0][1].reshape(1), None, torch.float32, config=cfg)
                rel = ((got - ref).norm() / ref.norm()).item()
            except Exception:  # out of resources for a config: skip it
                continue
            row = dict(n=n, k=k, m=m, cfg=cfg, us=us, scaled_mm_us=sm, rel=rel)
            out.append(row)
            if best is None or us < best["us"]:
                best = row
        tb = n * k / best["us"] / 1e6
        print(f"{n}x{k} M={m}: scaled_mm {sm:.1f} us ({n*k/sm/1e6:.2f} TB/s) | best triton {best['us']:.1f} us "
              f"({tb:.2f} TB/s, {sm / best['us']:.2f}x) {best['cfg']} rel {best['rel']:.1e}", flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
