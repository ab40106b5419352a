"""``mopt bench kernels``: mopt's GPU linear kernels against cuBLAS, measured in one run.

Llama-3-8B-shaped layers (N x K) at several token counts M. For each: BF16 cuBLAS
(``F.linear``), ``torch._scaled_mm`` FP8 per-tensor and rowwise (GEMM only, activations already
quantized), and mopt's kernels for FP8 per-tensor, FP8 per-channel x per-token, FP8 128x128
blocks and NVFP4, timed as the whole layer (activation quantization included). Each measurement
replays a CUDA graph of ``iters`` calls that cycle through enough weight copies to exceed the L2
cache, and takes the median of ``repeats`` replays. Effective TB/s counts weight, activation and
output bytes once per call.
"""

from __future__ import annotations

import math
import statistics

import torch

from mopt.kernels.linear import LinearScheme, LinearShape
from mopt.quant.formats import fp8, nvfp4

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
TOKENS = [1, 16, 128, 2048, 8192]
H100 = dict(hbm_tb_s=3.35, bf16_tflops=989.0, fp8_tflops=1979.0)
L2_BYTES = 50 << 20


def _layer(scheme: LinearScheme, w: torch.Tensor) -> torch.nn.Module:
    n, k = w.shape
    layer = torch.nn.Module()
    if scheme is LinearScheme.NVFP4:
        ws2 = nvfp4.global_scale_from_amax(w.abs().amax())
        layer.weight, layer.weight_scale = nvfp4.quantize(w, ws2)
        layer.weight_scale_2 = ws2.expand(n).contiguous()
        layer.input_scale = torch.tensor(4.0 / (6 * 448), device=w.device)
    elif scheme is LinearScheme.FP8_BLOCK:
        q, scale = fp8.quantize_blocks(w)
        layer.weight = q
        layer.weight_scale = scale.repeat_interleave(128, dim=0)[:n].contiguous()
    elif scheme is LinearScheme.FP8_TENSOR:
        layer.weight, layer.weight_scale = fp8.quantize_per_tensor(w)
        layer.input_scale = torch.tensor(4.0 / 448, device=w.device)
    else:
        layer.weight, layer.weight_scale = fp8.quantize_per_channel(w)
    layer.linear_shape = LinearShape(scheme, k, n)
    return layer


def _weight_bytes(scheme: LinearScheme | None, n: int, k: int) -> float:
    if scheme is None:
        return 2.0 * n * k
    if scheme is LinearScheme.NVFP4:
        return n * k * (0.5 + 1 / 16)
    return float(n * k)


def _time(fns: list, iters: int, repeats: int) -> float:
    """Median seconds per call of a CUDA graph replaying ``iters`` calls cycling through ``fns``."""
    torch.cuda.synchronize()
    for f in fns:
        f()  # compile / warm up outside the graph
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def bench_kernels(shapes=SHAPES, tokens=TOKENS, iters: int = 20, repeats: int = 5) -> list[dict]:
    from mopt.kernels import triton_linear as tlin

    dev = torch.device("cuda")
    ours = {
        "fp8_tensor": (LinearScheme.FP8_TENSOR, tlin.HopperFp8Kernel),
        "fp8_channel_token": (LinearScheme.FP8_CHANNEL_TOKEN, tlin.HopperFp8Kernel),
        "fp8_block": (LinearScheme.FP8_BLOCK, tlin.TritonFp8BlockKernel),
        "nvfp4": (LinearScheme.NVFP4, tlin.TritonNvfp4Kernel),
    }
    rows = []
    for n, k in shapes:
        copies = max(2, min(8, math.ceil(2 * L2_BYTES / (n * k))))  # FP8 bytes; BF16 copies are twice that
        torch.manual_seed(0)
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        layers = {name: [_layer(s, w.float()) for w in weights] for name, (s, _) in ours.items()}
        wq = [fp8.quantize_per_tensor(w.float()) for w in weights]
        wrow = [fp8.quantize_per_channel(w.float()) for w in weights]
        for m in tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = fp8.quantize_per_tensor(x.float())
            xr, xrs = fp8.quantize_per_token(x.float())
            row_b = [s.reshape(1, -1).contiguous() for _, s in wrow]
            base = {
                "bf16": _time([lambda w=w: torch.nn.functional.linear(x, w) for w in weights], iters, repeats),
                "scaled_mm_tensor": _time([lambda q=q, s=s: torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s,
                                                                             out_dtype=torch.bfloat16)
                                           for q, s in wq], iters, repeats),
                "scaled_mm_rowwise": _time([lambda q=q, b=b: torch._scaled_mm(xr, q.t(), scale_a=xrs, scale_b=b,
                                                                              out_dtype=torch.bfloat16)
                                            for (q, _), b in zip(wrow, row_b)], iters, repeats),
            }
            for name, (scheme, cls) in ours.items():
                kernel = cls()
                for layer in layers[name]:
                    kernel.process_weights(layer)
                t = _time([lambda l=l: kernel.apply(l, x, None) for l in layers[name]], iters, repeats)
                baseline = base["scaled_mm_rowwise" if name == "fp8_channel_token" else "scaled_mm_tensor"]
                wbytes = _weight_bytes(scheme, n, k)
                io_bytes = wbytes + m * k * 2 + m * n * 2
                peak = H100["bf16_tflops"] if scheme is LinearScheme.NVFP4 else H100["fp8_tflops"]
                rows.append(dict(
                    n=n, k=k, m=m, format=name, us=t * 1e6, bf16_us=base["bf16"] * 1e6,
                    scaled_mm_us=baseline * 1e6, scaled_mm_tensor_us=base["scaled_mm_tensor"] * 1e6,
                    scaled_mm_rowwise_us=base["scaled_mm_rowwise"] * 1e6,
                    tb_s=io_bytes / t / 1e12, tflops=2 * m * n * k / t / 1e12,
                    pct_hbm=100 * io_bytes / t / 1e12 / H100["hbm_tb_s"],
                    pct_tensor=100 * 2 * m * n * k / t / 1e12 / peak,
                    vs_bf16=base["bf16"] / t, vs_scaled_mm=baseline / t,
                ))
    return rows


def format_rows(rows: list[dict], device: str) -> str:
    head = (f"{'N x K':>12} {'M':>5} {'format':>17} {'ours us':>8} {'bf16 us':>8} {'smm us':>8} "
            f"{'TB/s':>6} {'TFLOP/s':>8} {'%HBM':>5} {'%TC':>5} {'x bf16':>7} {'x smm':>6}")
    lines = [f"mopt bench kernels on {device} (smm: _scaled_mm per-tensor; rowwise for fp8_channel_token)", head]
    for r in rows:
        lines.append(f"{r['n']:>6}x{r['k']:<5} {r['m']:>5} {r['format']:>17} {r['us']:>8.1f} {r['bf16_us']:>8.1f} "
                     f"{r['scaled_mm_us']:>8.1f} {r['tb_s']:>6.2f} {r['tflops']:>8.1f} {r['pct_hbm']:>5.0f} "
                     f"{r['pct_tensor']:>5.0f} {r['vs_bf16']:>7.2f} {r['vs_scaled_mm']:>6.2f}")
    return "\n".join(lines)
