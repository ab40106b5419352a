"""Experiment: does programmatic dependent launch (PDL) hide a decode GEMV's start-up?

A chain of (norm-like kernel -> BF16 GEMV) pairs in one CUDA graph, weights cycling beyond L2; microseconds
per pair. Mode 0: plain launches; mode 1: both kernels launched with PDL, each letting the next one launch
at its start and waiting for the previous one before reading its output; mode 2: mode 1 plus an L2
prefetch of the GEMV's weights before the wait.
Usage: PYTHONPATH=src python3 bench/pdl_probe.py [out.json] (an sm_90 GPU).
"""
import sys, json
import torch, triton, triton.language as tl

try:
    from triton.language.extra.cuda import gdc_wait, gdc_launch_dependents
    HAVE = True
except Exception as e:
    print("no gdc:", e); HAVE = False
    @triton.jit
    def gdc_wait(): pass
    @triton.jit
    def gdc_launch_dependents(): pass


@triton.jit
def _prefetch(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def gemv(a_ptr, b_ptr, c_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LINES: tl.constexpr,
         MODE: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    b_rows = b_ptr + offs_n[:, None].to(tl.int64) * K
    if MODE >= 1:
        gdc_launch_dependents()
    if MODE == 2:
        lines = tl.arange(0, LINES)
        lines = tl.where(lines * 64 < K, lines, 0)
        _prefetch(b_rows + lines[None, :] * 64)
    if MODE >= 1:
        gdc_wait()
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        b = tl.load(b_rows + offs_k[None, :], mask=n_ok[:, None], other=0.0)
        a = tl.load(a_ptr + offs_k).to(tl.float32)
        acc += tl.sum(b.to(tl.float32) * a[None, :], axis=1)
    tl.store(c_ptr + offs_n, acc.to(tl.bfloat16), mask=n_ok)


@triton.jit
def norm(x_ptr, y_ptr, K, BLOCK: tl.constexpr, MODE: tl.constexpr):
    if MODE >= 1:
        gdc_launch_dependents()
        gdc_wait()
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    r = tl.math.rsqrt(tl.sum(x * x, axis=0) / K + 1e-5)
    tl.store(y_ptr + cols, (x * r).to(tl.bfloat16), mask=cols < K)


def run(N, K, mode, copies, reps=20):
    dev = "cuda"
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(N, device=dev, dtype=torch.bfloat16)
    y = torch.empty(K, device=dev, dtype=torch.bfloat16)
    outs = [torch.empty(N, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
    pdl = dict(launch_pdl=True) if mode >= 1 else {}
    BN, BK = 8, 512

    def chain():
        src = x
        for i in range(copies):
            norm[(1,)](src, y, K, BLOCK=triton.next_power_of_2(K), MODE=mode, num_warps=8, **pdl)
            gemv[(triton.cdiv(N, BN),)](y, ws[i], outs[i], N, K, BLOCK_N=BN, BLOCK_K=BK,
                                        LINES=triton.next_power_of_2(triton.cdiv(K, 64)), MODE=mode, num_warps=8,
                                        num_stages=5, **pdl)
            src = outs[i]
    chain(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain()
    g.replay(); torch.cuda.synchronize()
    ref = outs[-1].clone()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(reps):
        g.replay()
    e.record(); torch.cuda.synchronize()
    us = s.elapsed_time(e) * 1000 / reps / copies
    return us, ref


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "gdc", HAVE)
    res = {}
    for N, K in [(4096, 2048), (3072, 4096), (4096, 4096), (4096, 7168), (14336, 4096), (6144, 4096)]:
        copies = max(8, min(64, (3 << 30) // (N * K * 2)))
        row = {}
        for mode in (0, 1, 2):
            try:
                us, _ = run(N, K, mode, copies)
                row[mode] = (round(us, 2),)
            except Exception as ex:
                row[mode] = repr(ex)[:200]
        gb = N * K * 2 / 1e9
        print(f"{N}x{K} bf16 ({gb*1000:.0f} MB): " + "  ".join(
            f"mode{m}: {v[0]} us ({gb/v[0]*1e6/1e3:.2f} TB/s)" if isinstance(v, tuple) else f"mode{m}: {v}"
            for m, v in row.items()), flush=True)
        res[f"{N}x{K}"] = row
    if len(sys.argv) > 1:
        json.dump(res, open(sys.argv[1], "w"), indent=1)
