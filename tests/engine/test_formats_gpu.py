"""Every format's tiny ModelOpt export on CUDA (``-m gpu``), read from ``$MOPT_TEST_EXPORTS`` (written on a CPU by
``PYTHONPATH=src:tests python3 tests/make_gpu_exports.py DIR``): dense Llama in every format ModelOpt 0.47
exports on a CPU, and Qwen3-MoE in every other expert format it exports.

Float32 logits of the GPU model (through the kernels the selector picks there: ``triton-weight-only``,
``hopper-fp8``, ``triton-nvfp4``; the reference expert loop for the new MoE schemes) against the CPU path's
(``cpu`` backend), relative L2 over two 21-token sequences:

* weight-only formats: 1e-3. Both sides multiply exact weight values and accumulate in float32; only the
  summation order differs (as BF16 and NVFP4 in tests/models/test_moe.py).
* formats that quantize activations (or the KV cache): three quarters of the quantization's own effect on
  these logits (``rel(CPU quantized, CPU unquantized)``, the unquantized model shipped as ``<arch>-plain``).
  Summation-order noise moves values across a rounding boundary of the next activation quantizer, and a
  random tiny model amplifies each flip (on an H100: FP8 MoE 1.8e-2 against an effect of 5e-2, 0.36 of it;
  static per-tensor FP8, whose codes the GPU's RMSNorm kernel writes, 6.4e-2 against 1.18e-1, 0.54); a
  wrong layout, scale or rounding rule gives about the whole effect or more.

Then paged greedy generation equals cache-free greedy decoding of the same GPU model, up to the first
near-tie (see ``NEAR_TIE``): decode steps and prefills replay
CUDA graphs (batches up to 4) for the dense formats, and run eagerly for the MoE formats whose experts have
no fused kernel yet (their reference expert loop reads the routing on the host: ``graph_blockers``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from make_gpu_exports import DENSE, FORMATS, MOE_NEW
from mopt.engine.loader import load_model

EXPORTS = [f"llama-{f}" for f in FORMATS] + [f"{arch}-{f}" for arch, f in MOE_NEW]
WEIGHT_ONLY = {"fp8-pb-wo", "fp8-pb-real", "int4-awq", "int8-wo", "w4a16-nvfp4"}
IDS = torch.randint(0, 320, (2, 21), generator=torch.Generator().manual_seed(4))
# A divergence of paged from cache-free greedy decoding is accepted at a near-tie only: the two logits within
# 2% of the largest logit magnitude, or within the relative difference the logits check allows the format
# (formats with 4-bit activations or KV caches round away much more of attention's summation-order noise).
NEAR_TIE = 0.02


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _export(name: str) -> Path:
    root = os.environ.get("MOPT_TEST_EXPORTS")
    path = Path(root) / name if root else None
    if path is None or not (path / "config.json").exists():
        pytest.skip(f"set MOPT_TEST_EXPORTS to a folder written by tests/make_gpu_exports.py (no {name})")
    return path


def test_every_quantize_format_has_a_gpu_export():
    from mopt.quantize import FORMATS as QUANTIZE_FORMATS

    assert set(FORMATS) | {fmt for _, fmt in DENSE} == set(QUANTIZE_FORMATS)


@pytest.mark.gpu
@pytest.mark.parametrize("name", EXPORTS)
def test_format_generates_on_gpu_like_cpu(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from mopt import LLM, SamplingParams

    arch, fmt = name.split("-", 1)
    path, plain = _export(name), _export(f"{arch}-plain")
    with torch.no_grad():
        cpu = load_model(path)(IDS)
        effect = _rel(cpu, load_model(plain)(IDS))
        llm = LLM(path, device="cuda", dtype=torch.float32, block_size=4, max_num_seqs=4, kv_cache_memory=16 << 20)
        gpu = llm.model(IDS.cuda()).cpu()
    bound = 1e-3 if fmt in WEIGHT_ONLY else 0.75 * effect
    diff = _rel(gpu, cpu)
    assert diff <= bound, f"{name}: {diff:.2e} against the CPU (bound {bound:.2e}, quantization effect {effect:.2e})"
    assert bool(llm.runner.graphs.graphs) == (arch == "llama"), f"{name}: CUDA graphs {llm.runner.graphs.graphs}"
    # Prefills replay graphs wherever decode steps do (a capture failure would fall back to eager quietly).
    assert (llm.runner.prefill_graphs is not None) == (arch == "llama"), f"{name}: prefill graphs"
    prompts = [[5, 17, 33], list(range(40, 60)), [7] * 9]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        tokens = list(prompt)
        with torch.no_grad():
            for paged in out.token_ids:
                logits = llm.model(torch.tensor([tokens], device="cuda"))[0, -1].float()
                best = int(logits.argmax())
                if paged != best:
                    # Paged (Triton) and cache-free (SDPA) attention sum in different orders; where the next
                    # activation or KV quantizer rounds the difference the other way, a near-tie may flip.
                    # Anything else (a token the cache-free model ranks clearly lower) is an error.
                    gap = (logits[best] - logits[paged]).item()
                    assert gap <= max(NEAR_TIE, bound) * logits.abs().max().item(), (
                        f"{name}: prompt {prompt[:3]}...: paged token {paged} is {gap:.3g} below the cache-free "
                        f"argmax {best} after {len(tokens) - len(prompt)} tokens")
                    break
                tokens.append(best)
