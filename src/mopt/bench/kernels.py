"""``mopt bench kernels``: every linear format's GPU kernel against cuBLAS, measured in one run.

Llama-3-8B-shaped layers (N x K) at several token counts M. For each: BF16 cuBLAS (``F.linear``),
``torch._scaled_mm`` FP8 per-tensor and rowwise where a format's activations are quantized that way
(GEMM only, activations already quantized), and one row per format of
``mopt.bench.kernel_formats.FORMATS``: a ``ReplicatedLinear`` loaded from that format's checkpoint
tensors, timed as the whole layer (smoothing, activation quantization and low-rank branch included)
through the kernel the selector picks, which each row names. Each measurement replays a CUDA graph of
``iters`` calls that cycle through enough weight copies to exceed the L2 cache, and takes the median of
``repeats`` replays. Effective TB/s counts the layer's bytes (weights and scales as the kernel holds
them), activation and output bytes once per call.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from mopt.bench import kernel_formats
from mopt.quant.formats import fp8

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
TOKENS = [1, 16, 128, 2048, 8192]
H100 = dict(hbm_tb_s=3.35, bf16_tflops=989.0, fp8_tflops=1979.0)
L2_BYTES = 50 << 20


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


def wall_time(fns: list, iters: int, repeats: int) -> float:
    """Median host seconds per call (CPU runs of the benchmark's code; not comparable to GPU timings)."""
    for f in fns:
        f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(iters):
            fns[i % len(fns)]()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def _baselines(x: torch.Tensor, weights: list[torch.Tensor], kinds: set[str], timer, iters: int,
               repeats: int) -> dict[str, float]:
    """Seconds per call of BF16 cuBLAS and of ``_scaled_mm`` per ``kinds`` ("tensor", "rowwise") on
    activations quantized beforehand."""
    times = {"bf16": timer([lambda w=w: torch.nn.functional.linear(x, w) for w in weights], iters, repeats)}
    if "tensor" in kinds:
        xq, xs = fp8.quantize_per_tensor(x.float())
        wq = [fp8.quantize_per_tensor(w.float()) for w in weights]
        times["tensor"] = timer([lambda q=q, s=s: torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s,
                                                                  out_dtype=torch.bfloat16) for q, s in wq],
                                iters, repeats)
    if "rowwise" in kinds:
        xr, xrs = fp8.quantize_per_token(x.float())
        wr = [fp8.quantize_per_channel(w.float()) for w in weights]
        wr = [(q, s.reshape(1, -1).contiguous()) for q, s in wr]
        times["rowwise"] = timer([lambda q=q, s=s: torch._scaled_mm(xr, q.t(), scale_a=xrs, scale_b=s,
                                                                   out_dtype=torch.bfloat16) for q, s in wr],
                                 iters, repeats)
    return times


def _format_rows(name: str, weights: list[torch.Tensor], xs: dict[int, torch.Tensor], base: dict[int, dict],
                 timer, iters: int, repeats: int) -> list[dict]:
    spec = kernel_formats.FORMATS[name]
    n, k = weights[0].shape
    layers = [kernel_formats.build_layer(name, w.float()) for w in weights]
    first = layers[0]
    layer_bytes = kernel_formats.layer_bytes(first)
    peak = H100["fp8_tflops"] if spec.fp8_mma else H100["bf16_tflops"]
    rows = []
    for m, x in xs.items():
        with torch.no_grad():
            t = timer([lambda l=l: l(x) for l in layers], iters, repeats)
        io_bytes = layer_bytes + m * k * 2 + m * n * 2
        smm = base[m].get(spec.scaled_mm) if spec.scaled_mm else None
        rows.append(dict(
            n=n, k=k, m=m, format=name, quant_algo=spec.quant_algo, scheme=first.linear_shape.scheme.value,
            kernel=first.quant_method.kernel.name, us=t * 1e6, bf16_us=base[m]["bf16"] * 1e6,
            scaled_mm=spec.scaled_mm, scaled_mm_us=None if smm is None else smm * 1e6, layer_bytes=layer_bytes,
            tb_s=io_bytes / t / 1e12, tflops=2 * m * n * k / t / 1e12,
            pct_hbm=100 * io_bytes / t / 1e12 / H100["hbm_tb_s"], pct_tensor=100 * 2 * m * n * k / t / 1e12 / peak,
            vs_bf16=base[m]["bf16"] / t, vs_scaled_mm=None if smm is None else smm / t,
        ))
    return rows


def bench_kernels(shapes=SHAPES, tokens=TOKENS, formats: list[str] | None = None, iters: int = 20,
                  repeats: int = 5, device: str | torch.device = "cuda", timer: Callable = _time,
                  on_rows: Callable[[list[dict]], None] | None = None, l2_bytes: int = L2_BYTES) -> list[dict]:
    """Rows of every (shape, format, M). A format that fails (building its layer, compiling, capturing
    its calls in a CUDA graph) gets one row with ``error`` and the run goes on. ``on_rows(rows so far)``
    after each format of each shape (to save partial results). Calls cycle through enough weight copies
    (2 to 8) to exceed ``l2_bytes``. ``device="cpu", timer=wall_time`` runs the same code on a CPU (tests)."""
    formats = list(kernel_formats.FORMATS) if formats is None else formats
    dev = torch.device(device)
    kinds = {kernel_formats.FORMATS[f].scaled_mm for f in formats} - {None}
    rows: list[dict] = []
    for n, k in shapes:
        copies = max(2, min(8, math.ceil(2 * l2_bytes / (n * k))))  # FP8 bytes; BF16 copies are twice that
        torch.manual_seed(0)
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for m in tokens}
        base = {m: _baselines(xs[m], weights, kinds, timer, iters, repeats) for m in tokens}
        for name in formats:
            try:
                rows.extend(_format_rows(name, weights, xs, base, timer, iters, repeats))
            except Exception as e:  # one format's failure must not cost the other rows of a GPU run
                rows.append(dict(n=n, k=k, m=None, format=name, error=f"{type(e).__name__}: {str(e)[:500]}"))
            if on_rows is not None:
                on_rows(rows)
    return rows


def format_rows(rows: list[dict], device: str) -> str:
    """The full table, then one line per format: its ratio to BF16 cuBLAS per M (range over shapes)."""
    head = (f"{'N x K':>12} {'M':>5} {'format':>15} {'kernel':>18} {'ours us':>8} {'bf16 us':>8} {'smm us':>8} "
            f"{'TB/s':>6} {'TFLOP/s':>8} {'%HBM':>5} {'%TC':>5} {'x bf16':>7} {'x smm':>6}")
    lines = [f"mopt bench kernels on {device} (smm: _scaled_mm with the format's activation scales, "
             "per tensor or rowwise; - where no FP8 GEMM computes the format)", head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['n']:>6}x{r['k']:<5} {'-':>5} {r['format']:>15} error: {r['error']}")
            continue
        smm_us = f"{r['scaled_mm_us']:>8.1f}" if r["scaled_mm_us"] is not None else f"{'-':>8}"
        x_smm = f"{r['vs_scaled_mm']:>6.2f}" if r["vs_scaled_mm"] is not None else f"{'-':>6}"
        lines.append(f"{r['n']:>6}x{r['k']:<5} {r['m']:>5} {r['format']:>15} {r['kernel']:>18} {r['us']:>8.1f} "
                     f"{r['bf16_us']:>8.1f} {smm_us} {r['tb_s']:>6.2f} {r['tflops']:>8.1f} {r['pct_hbm']:>5.0f} "
                     f"{r['pct_tensor']:>5.0f} {r['vs_bf16']:>7.2f} {x_smm}")
    return "\n".join(lines + ["", summary(rows)])


def summary(rows: list[dict]) -> str:
    """Per format, the ratio to BF16 cuBLAS at each M: min-max over the shapes."""
    tokens = sorted({r["m"] for r in rows if "error" not in r})
    lines = [f"{'x BF16 cuBLAS':>15} {'kernel':>18} " + " ".join(f"{f'M={m}':>11}" for m in tokens)]
    timed = [r for r in rows if "error" not in r]
    for name in dict.fromkeys(r["format"] for r in timed):
        mine = [r for r in timed if r["format"] == name]
        cells = []
        for m in tokens:
            v = [r["vs_bf16"] for r in mine if r["m"] == m]
            cells.append(f"{min(v):.2f}-{max(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}" if v else "-")
        lines.append(f"{name:>15} {mine[0]['kernel']:>18} " + " ".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)
