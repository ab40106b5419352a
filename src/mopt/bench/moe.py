"""``mopt bench moe``: fused-MoE layers on the GPU, BF16 and FP8 in one run.

Qwen3-30B-A3B-shaped (128 experts, top-8, H=2048, I=768) and Mixtral-8x7B-shaped (8 experts,
top-2, H=4096, I=14336) layers at several token counts, random router logits. Reported: time of
the expert computation (routing excluded), effective TB/s over the bytes of the experts actually
touched (plus activations), TFLOP/s, and the ratio to a dense GEMM pair of the same FLOPs in the
same format (BF16 ``torch.mm`` / FP8 ``_scaled_mm``) measured in the same run. CUDA-graph timing.
"""

from __future__ import annotations

import torch

from mopt.bench.kernels import H100, _time
from mopt.layers.fused_moe import FusedMoE
from mopt.quant.config import ModelOptFp8Config
from mopt.quant.formats import fp8

CONFIGS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
TOKENS = [1, 16, 256, 4096]


def _layer(fmt: str, e: int, k: int, h: int, i: int, dev) -> FusedMoE:
    qc = ModelOptFp8Config("FP8") if fmt == "fp8" else None
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
            else:
                layer.weight_loader(getattr(layer, f"{stacked}_weight"), w.bfloat16(), (name, x))
    layer.process_weights_after_loading()
    return layer


def bench_moe(configs=CONFIGS, tokens=TOKENS, iters: int = 10, repeats: int = 5) -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    for name, (e, k, h, i) in configs.items():
        for fmt in ("bf16", "fp8"):
            layer = _layer(fmt, e, k, h, i, dev)
            bytes_per_weight = 1 if fmt == "fp8" else 2
            expert_bytes = 3 * h * i * bytes_per_weight
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
                if fmt == "fp8":
                    one = torch.tensor(1.0, device=dev)
                    q = [v.to(fp8.FP8_DTYPE) for v in (a, b13, a2, b2)]
                    dense = _time([lambda: (torch._scaled_mm(q[0], q[1].t(), scale_a=one, scale_b=one,
                                                             out_dtype=torch.bfloat16),
                                            torch._scaled_mm(q[2], q[3].t(), scale_a=one, scale_b=one,
                                                             out_dtype=torch.bfloat16))], iters, repeats)
                else:
                    dense = _time([lambda: (a @ b13.t(), a2 @ b2.t())], iters, repeats)
                peak = H100["fp8_tflops"] if fmt == "fp8" else H100["bf16_tflops"]
                rows.append(dict(config=name, format=fmt, tokens=t, experts_touched=touched, us=sec * 1e6,
                                 tb_s=moved / sec / 1e12, pct_hbm=100 * moved / sec / 1e12 / H100["hbm_tb_s"],
                                 tflops=flops / sec / 1e12, pct_tensor=100 * flops / sec / 1e12 / peak,
                                 dense_us=dense * 1e6, vs_dense=dense / sec))
            del layer
            torch.cuda.empty_cache()
    return rows


def format_rows(rows: list[dict], device: str) -> str:
    lines = [f"mopt bench moe on {device} (TB/s over touched experts' bytes; x dense: same-FLOP dense GEMMs)",
             f"{'config':>14} {'fmt':>5} {'T':>5} {'touched':>7} {'us':>9} {'TB/s':>6} {'%HBM':>5} "
             f"{'TFLOP/s':>8} {'%TC':>5} {'dense us':>9} {'x dense':>7}"]
    for r in rows:
        lines.append(f"{r['config']:>14} {r['format']:>5} {r['tokens']:>5} {r['experts_touched']:>7} {r['us']:>9.1f} "
                     f"{r['tb_s']:>6.2f} {r['pct_hbm']:>5.0f} {r['tflops']:>8.1f} {r['pct_tensor']:>5.0f} "
                     f"{r['dense_us']:>9.1f} {r['vs_dense']:>7.2f}")
    return "\n".join(lines)
