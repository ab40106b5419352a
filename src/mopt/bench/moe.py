"""``mopt bench moe``: fused-MoE layers on the GPU, BF16, FP8 (per-tensor, and per-channel x per-token) and
NVFP4 in one run.

Qwen3-30B-A3B-shaped (128 experts, top-8, H=2048, I=768) and Mixtral-8x7B-shaped (8 experts,
top-2, H=4096, I=14336) layers at several token counts, random router logits. Reported: time of
the expert computation (routing excluded), effective TB/s over the bytes of the experts actually
touched (plus activations), TFLOP/s, and the ratio to a dense GEMM pair of the same FLOPs in the
same format (BF16 ``torch.mm`` / FP8 per-tensor ``_scaled_mm``, for both FP8 formats / mopt's dense NVFP4 W4A4 linear path: activation
quantization plus ``triton_gemm.nvfp4_gemm``) measured in the same run. CUDA-graph timing.
"""

from __future__ import annotations

from typing import Callable

import torch

from mopt.bench.kernels import H100, _time
from mopt.layers.fused_moe import FusedMoE
from mopt.quant.config import ModelOptFp8Config, ModelOptNvFp4Config
from mopt.quant.formats import fp8, nvfp4

CONFIGS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
TOKENS = [1, 16, 256, 4096]
FORMATS = ("bf16", "fp8", "fp8-pcpt", "nvfp4")
BYTES_PER_WEIGHT = {"bf16": 2.0, "fp8": 1.0, "fp8-pcpt": 1.0, "nvfp4": 0.5625}  # NVFP4: 4-bit codes + an E4M3 scale per 16


def _layer(fmt: str, e: int, k: int, h: int, i: int, dev) -> FusedMoE:
    qc = {"fp8": ModelOptFp8Config("FP8"), "fp8-pcpt": ModelOptFp8Config("FP8_PER_CHANNEL_PER_TOKEN"),
          "nvfp4": ModelOptNvFp4Config()}.get(fmt)
    with torch.device(dev):
        layer = FusedMoE(e, k, h, i, torch.bfloat16, quant_config=qc, prefix="bench.experts")
    for x in range(e):
        ws = {"w1": torch.randn(i, h, device=dev) * 0.02, "w3": torch.randn(i, h, device=dev) * 0.02,
              "w2": torch.randn(h, i, device=dev) * 0.02}
        for name, w in ws.items():
            stacked = "w2" if name == "w2" else "w13"
            if fmt == "fp8":
                q, s = fp8.quantize_per_tensor(w)
                layer.weight_loader(getattr(layer, f"{stacked}_weight"), q, (name, x))
                layer.weight_loader(getattr(layer, f"{stacked}_weight_scale"), s, (name, x))
                layer.weight_loader(getattr(layer, f"{stacked}_input_scale"), torch.tensor(0.01, device=dev),
                                    (name, x))
            elif fmt == "fp8-pcpt":
                q, s = fp8.quantize_per_channel(w)
                layer.weight_loader(getattr(layer, f"{stacked}_weight"), q, (name, x))
                layer.weight_loader(getattr(layer, f"{stacked}_weight_scale"), s, (name, x))
            elif fmt == "nvfp4":
                g2 = nvfp4.global_scale_from_amax(w.abs().max())
                q, s = nvfp4.quantize(w, g2)
                for suffix, v in (("weight", q), ("weight_scale", s), ("weight_scale_2", g2),
                                  ("input_scale", torch.tensor(4.0 / 2688, device=dev))):
                    layer.weight_loader(getattr(layer, f"{stacked}_{suffix}"), v, (name, x))
            else:
                layer.weight_loader(getattr(layer, f"{stacked}_weight"), w.bfloat16(), (name, x))
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


def bench_moe(configs=CONFIGS, tokens=TOKENS, iters: int = 10, repeats: int = 5,
              formats=FORMATS) -> list[dict]:
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown MoE bench format(s) {unknown}; choose from {list(FORMATS)}")
    dev = torch.device("cuda")
    rows = []
    for name, (e, k, h, i) in configs.items():
        for fmt in formats:
            layer = _layer(fmt, e, k, h, i, dev)
            expert_bytes = 3 * h * i * BYTES_PER_WEIGHT[fmt]
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
                if fmt.startswith("fp8"):
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
                peak = H100["fp8_tflops"] if fmt.startswith("fp8") else H100["bf16_tflops"]  # NVFP4 runs on BF16 MMAs
                rows.append(dict(config=name, format=fmt, tokens=t, experts_touched=touched, us=sec * 1e6,
                                 tb_s=moved / sec / 1e12, pct_hbm=100 * moved / sec / 1e12 / H100["hbm_tb_s"],
                                 tflops=flops / sec / 1e12, pct_tensor=100 * flops / sec / 1e12 / peak,
                                 dense_us=dense * 1e6, vs_dense=dense / sec))
            del layer
            torch.cuda.empty_cache()
    return rows


def format_rows(rows: list[dict], device: str) -> str:
    lines = [f"mopt bench moe on {device} (TB/s over touched experts' bytes; x dense: same-FLOP dense GEMMs)",
             f"{'config':>14} {'fmt':>8} {'T':>5} {'touched':>7} {'us':>9} {'TB/s':>6} {'%HBM':>5} "
             f"{'TFLOP/s':>8} {'%TC':>5} {'dense us':>9} {'x dense':>7}"]
    for r in rows:
        lines.append(f"{r['config']:>14} {r['format']:>8} {r['tokens']:>5} {r['experts_touched']:>7} {r['us']:>9.1f} "
                     f"{r['tb_s']:>6.2f} {r['pct_hbm']:>5.0f} {r['tflops']:>8.1f} {r['pct_tensor']:>5.0f} "
                     f"{r['dense_us']:>9.1f} {r['vs_dense']:>7.2f}")
    return "\n".join(lines)
