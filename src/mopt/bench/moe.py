"""``mopt bench moe``: fused-MoE layers on the GPU, BF16, FP8 (per-tensor, and per-channel x per-token) and
NVFP4 in one run by default; ``--formats`` takes any format ModelOpt exports experts in (``ALL_FORMATS``:
their checkpoint tensors made as ``mopt bench kernels`` makes a linear layer's, ``bench.kernel_formats``).

Qwen3-30B-A3B-shaped (128 experts, top-8, H=2048, I=768) and Mixtral-8x7B-shaped (8 experts,
top-2, H=4096, I=14336) layers at several token counts, random router logits. Reported: time of
the expert computation (routing excluded), effective TB/s over the bytes of the experts actually
touched (plus activations), TFLOP/s, and the ratio to a dense GEMM pair of the same FLOPs in the
same format (BF16 ``torch.mm``, also for the weight-decoding formats / FP8 per-tensor ``_scaled_mm``, for both
FP8 formats / mopt's dense NVFP4 W4A4 linear path: activation
quantization plus ``triton_gemm.nvfp4_gemm``) measured in the same run. CUDA-graph timing.
"""

from __future__ import annotations

from typing import Callable

import torch

from mopt.bench import kernel_formats
from mopt.bench.kernels import H100, _time
from mopt.layers.fused_moe import FusedMoE
from mopt.quant.formats import fp8, nvfp4

CONFIGS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
TOKENS = [1, 16, 256, 4096]
FORMATS = ("bf16", "fp8", "fp8-pcpt", "nvfp4")  # the default run
# ModelOpt 0.47 exports experts in these (its AWQ, SVDQuant and FP8_PB_REAL expert exports fail).
ALL_FORMATS = FORMATS + ("fp8-pb-wo", "w4a16-nvfp4", "w4a8-nvfp4-fp8", "int8-wo", "int8-sq", "mxfp8", "mxfp4",
                         "mxfp4-wo", "w4a8-mxfp4-fp8")


def _layer(fmt: str, e: int, k: int, h: int, i: int, dev) -> FusedMoE:
    qc = kernel_formats.quant_config(fmt) if fmt != "bf16" else None
    with torch.device(dev):
        layer = FusedMoE(e, k, h, i, torch.bfloat16, quant_config=qc, prefix="bench.experts")
    for x in range(e):
        for name, rows, cols in (("w1", i, h), ("w3", i, h), ("w2", h, i)):
            w = torch.randn(rows, cols, device=dev) * 0.02
            tensors = kernel_formats.FORMATS[fmt].tensors(w) if fmt != "bf16" else {"weight": w.bfloat16()}
            for suffix, v in tensors.items():
                layer.weight_loader(getattr(layer, f"{'w2' if name == 'w2' else 'w13'}_{suffix}"), v, (name, x))
    layer.process_weights_after_loading()
    return layer


def _dense_nvfp4(m: int, n: int, k: int, dev) -> Callable[[], torch.Tensor]:
    """mopt's dense NVFP4 linear path at ``[m, k] x [n, k]``: activation quantization + W4A4 GEMM."""
    from mopt.kernels import triton_gemm, triton_quant

    w = torch.randn(n, k, device=dev) * 0.02
    g = nvfp4.global_scale_from_amax(w.abs().max())
    packed, scale = nvfp4.quantize(w, g)
    wg = g.expand(n).contiguous()
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ag = torch.tensor(4.0 / 2688, device=dev)
    alpha = triton_gemm.nvfp4_alpha(ag, wg)
    return lambda: triton_gemm.nvfp4_gemm(triton_quant.nvfp4_block_values(a, ag), packed, scale, ag, wg, None,
                                          torch.bfloat16, alpha)


def check_formats(formats) -> None:
    """A ``ValueError`` naming any format ``mopt bench moe`` does not know (before any GPU work)."""
    unknown = sorted(set(formats) - set(ALL_FORMATS))
    if unknown:
        raise ValueError(f"unknown MoE bench format(s) {unknown}; choose from {list(ALL_FORMATS)}")


def bench_moe(configs=CONFIGS, tokens=TOKENS, iters: int = 10, repeats: int = 5, formats=FORMATS,
              on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Rows of timings (see the module docstring); ``on_rows(rows so far)`` after each layer's token counts."""
    check_formats(formats)
    dev = torch.device("cuda")
    rows = []
    for name, (e, k, h, i) in configs.items():
        for fmt in formats:
            layer = _layer(fmt, e, k, h, i, dev)
            expert_bytes = kernel_formats.layer_bytes(layer) / e
            fp8_mma = fmt != "bf16" and kernel_formats.FORMATS[fmt].fp8_mma
            for t in tokens:
                g = torch.Generator(device=dev).manual_seed(t)
                x = torch.randn(t, h, device=dev, dtype=torch.bfloat16, generator=g)
                weights, ids = layer.select_experts(torch.randn(t, e, device=dev, generator=g))
                touched = int(ids.unique().numel())
                sec = _time([lambda: layer.quant_method.apply(layer, x, weights, ids)], iters, repeats)
                flops = 2 * t * k * 3 * h * i
                moved = touched * expert_bytes + t * h * 4
                m = t * k
                a = torch.randn(m, h, device=dev, dtype=torch.bfloat16)
                b13 = torch.randn(2 * i, h, device=dev, dtype=torch.bfloat16)
                a2 = torch.randn(m, i, device=dev, dtype=torch.bfloat16)
                b2 = torch.randn(h, i, device=dev, dtype=torch.bfloat16)
                if fmt in ("fp8", "fp8-pcpt"):
                    one = torch.tensor(1.0, device=dev)
                    q = [v.to(fp8.FP8_DTYPE) for v in (a, b13, a2, b2)]
                    dense = _time([lambda: (torch._scaled_mm(q[0], q[1].t(), scale_a=one, scale_b=one,
                                                             out_dtype=torch.bfloat16),
                                            torch._scaled_mm(q[2], q[3].t(), scale_a=one, scale_b=one,
                                                             out_dtype=torch.bfloat16))], iters, repeats)
                elif fmt == "nvfp4":
                    d13, d2 = _dense_nvfp4(m, 2 * i, h, dev), _dense_nvfp4(m, h, i, dev)
                    dense = _time([lambda: (d13(), d2())], iters, repeats)
                else:
                    dense = _time([lambda: (a @ b13.t(), a2 @ b2.t())], iters, repeats)
                peak = H100["fp8_tflops"] if fp8_mma else H100["bf16_tflops"]  # NVFP4 and decoded weights: BF16 MMAs
                rows.append(dict(config=name, format=fmt, tokens=t, experts_touched=touched, us=sec * 1e6,
                                 tb_s=moved / sec / 1e12, pct_hbm=100 * moved / sec / 1e12 / H100["hbm_tb_s"],
                                 tflops=flops / sec / 1e12, pct_tensor=100 * flops / sec / 1e12 / peak,
                                 dense_us=dense * 1e6, vs_dense=dense / sec))
            if on_rows is not None:
                on_rows(rows)
            layer = None  # frees the experts before the next format (a del confuses pyflakes about the lambdas)
            torch.cuda.empty_cache()
    return rows


def format_rows(rows: list[dict], device: str) -> str:
    lines = [f"mopt bench moe on {device} (TB/s over touched experts' bytes; x dense: same-FLOP dense GEMMs)",
             f"{'config':>14} {'fmt':>14} {'T':>5} {'touched':>7} {'us':>9} {'TB/s':>6} {'%HBM':>5} "
             f"{'TFLOP/s':>8} {'%TC':>5} {'dense us':>9} {'x dense':>7}"]
    for r in rows:
        lines.append(f"{r['config']:>14} {r['format']:>14} {r['tokens']:>5} {r['experts_touched']:>7} {r['us']:>9.1f} "
                     f"{r['tb_s']:>6.2f} {r['pct_hbm']:>5.0f} {r['tflops']:>8.1f} {r['pct_tensor']:>5.0f} "
                     f"{r['dense_us']:>9.1f} {r['vs_dense']:>7.2f}")
    return "\n".join(lines)
