"""Whole-model logits of real ModelOpt exports against an independent dequantize-and-simulate model.

The reference is transformers' own model (unfused q/k/v and gate/up, its own RoPE and attention)
with every quantized linear replaced by ``act_quant(x) @ dequant(W)^T`` computed from the raw
checkpoint tensors (tests/simulate.py) and, for FP8 KV caches, keys and values fake-quantized after
RoPE. mopt runs the same function through its fused layers, methods and kernels.

Tolerances (relative L2 over all logits; measured 2026-11-25 in brackets):

* NVFP4: 1e-5 [1.7e-7, 1.9e-7]: the same function up to float32 rounding.
* FP8 formats: at most a quarter of the quantization's own effect, ``rel(unquantized, sim)``
  [ratios 0.049, 0.089, 0.145, 0.010]. Both models agree per layer to float32 rounding (<= 1e-7,
  tests/quant/test_modelopt_linear.py), but the two attention implementations differ in the last
  bits, and at the next activation quantizer such a difference flips values that sit on an E4M3
  rounding boundary to the neighbouring code (a 2^-3 relative step). The error this causes grows
  with the square root of the noise, not linearly (1e-7 -> ~1e-5 after one layer), and random tiny
  models amplify it layer by layer. A wrong scale, layout or rounding convention instead moves the
  logits by the order of the quantization effect itself (ratio ~1), which this bound catches.
"""

import copy

import pytest
import torch
from safetensors.torch import load_file

from mopt.engine.loader import load_model
from mopt.quantize import _modelopt
from simulate import simulated_model

pytestmark = pytest.mark.slow

CASES = [("fp8-kv", 256, "llama"), ("fp8-kv", 576, "qwen3"), ("fp8-pcpt", 256, "llama"),
         ("fp8-pb-wo", 576, "llama"), ("nvfp4", 256, "llama"), ("nvfp4", 576, "qwen3")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("fmt,hidden,arch", CASES)
def test_logits_match_independent_simulation(export_factory, fmt, hidden, arch):
    export = export_factory(fmt, hidden, arch)
    sim = simulated_model(export, load_file(export.path / "model.safetensors"))
    unquantized = copy.deepcopy(export.fake_quant_model)
    _modelopt()[0].disable_quantizer(unquantized, "*")
    ours = load_model(export.path)
    ids = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = sim(ids).logits
        err, effect = _rel(ours(ids), expected), _rel(unquantized(ids).logits, expected)
    if fmt.startswith("nvfp4"):
        assert err <= 1e-5, f"{fmt} {arch} h={hidden}: relative L2 error {err:.2e}"
    else:
        assert err <= 0.25 * effect, f"{fmt} {arch} h={hidden}: error {err:.2e} vs quantization effect {effect:.2e}"
