"""OCP microscaling formats: MXFP8 (E4M3 values) and MXFP4 (E2M1 values), E8M0 shared exponents.

Checked against ModelOpt 0.47 (``qtensor/mxfp8_tensor.py``, ``qtensor/mxfp4_tensor.py``, the CUDA
fake-quant kernel ``tensor_quant_mx.cu``) and real exports of tiny Llamas:

* blocks: 32 consecutive elements along the last dim (K); K must be a multiple of 32.
* scale: one ``uint8`` E8M0 code ``e`` per block, the power of two ``2 ** (e - 127)``;
  ``e = clamp(ceil(log2(block_amax / max_value)), -127, 127) + 127`` with ``max_value`` 448
  (E4M3) or 6 (E2M1); an all-zero block gets ``e = 0``. ``weight_scale`` is ``uint8 [N, K/32]``.
* MXFP8: ``weight`` ``float8_e4m3fn [N, K]``, ``q = e4m3(clamp(x / 2**(e-127), +-448))``.
* MXFP4: ``weight`` ``uint8 [N, K/2]``, two E2M1 codes per byte along K, element ``2i`` in the
  low nibble, codes as in :mod:`mopt.quant.formats.nvfp4` (sign bit 3, magnitude index into
  0, .5, 1, 1.5, 2, 3, 4, 6). ModelOpt's export rounds weight ties toward the smaller magnitude
  and gives exact zeros the sign bit (its ``MXFP4QTensor``); the codes decode the same either way.
* activations of MXFP8 / MXFP4 (W8A8 / W4A4) are quantized at run time per row and block with the
  same scale rule; values round to nearest, ties to even, as ModelOpt's GPU fake quantization
  (and FP4/FP8 hardware conversion) does. The exponent is computed exactly (bit-level
  ``ceil(log2(.))``, as the CUDA kernel does); ModelOpt's CPU code takes a float ``log2``, which can
  round down for an amax just above a power of two.
* ``x ~= value * 2**(e - 127)``: exact in float32 (values have at most 4 significant bits).

W4A8_MXFP4_FP8 pairs MXFP4 weights with FP8 E4M3 activations per tensor (no MX scale): a static
``input_scale`` when the checkpoint has one, else dynamic (see its linear method).
"""

from __future__ import annotations

import torch

from mopt.quant.formats import nvfp4

BLOCK_SIZE = 32
E8M0_BIAS = 127
E4M3_MAX = 448.0
E2M1_MAX = 6.0


def _check_blocks(x: torch.Tensor) -> None:
    if x.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"MX formats need the last dim to be a multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}")


def e8m0_exponent(amax: torch.Tensor, max_value: float) -> torch.Tensor:
    """Biased E8M0 codes (uint8) for block maxima: ``ceil(log2(amax / max_value))`` exactly, +127."""
    ratio = amax.float() / max_value
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2**exponent, mantissa in [0.5, 1)
    unbiased = exponent - (mantissa == 0.5).to(exponent.dtype)
    unbiased = torch.where(ratio > 0, unbiased, torch.full_like(unbiased, -E8M0_BIAS))
    return (unbiased.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Float32 powers of two ``2 ** (e - 127)`` of E8M0 codes (exact, 2**-127 included)."""
    ones = torch.ones(scale.shape, dtype=torch.float32, device=scale.device)
    return torch.ldexp(ones, scale.to(torch.int32) - E8M0_BIAS)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return x.float().unflatten(-1, (-1, BLOCK_SIZE))


def block_scales(x: torch.Tensor, max_value: float) -> torch.Tensor:
    """E8M0 codes ``uint8 [..., K/32]`` of ``x [..., K]`` for elements whose largest value is ``max_value``."""
    _check_blocks(x)
    return e8m0_exponent(_blocks(x.detach()).abs().amax(dim=-1), max_value)


def _expand(scale: torch.Tensor) -> torch.Tensor:
    return scale_values(scale).repeat_interleave(BLOCK_SIZE, dim=-1)


def quantize_mxfp8(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q float8_e4m3fn [..., K], scale uint8 [..., K/32])``."""
    if scale is None:
        scale = block_scales(x, E4M3_MAX)
    scaled = (x.float() / _expand(scale)).clamp(-E4M3_MAX, E4M3_MAX)
    return scaled.to(torch.float8_e4m3fn), scale


def dequantize_mxfp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * _expand(scale)).to(dtype)


def quantize_mxfp4(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [..., K/2], scale uint8 [..., K/32])``, ties to even."""
    if scale is None:
        scale = block_scales(x, E2M1_MAX)
    return nvfp4.pack(nvfp4.e2m1_encode(x.float() / _expand(scale))), scale


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (nvfp4.e2m1_decode(nvfp4.unpack(packed)) * _expand(scale)).to(dtype)


def fake_quantize_mxfp8(x: torch.Tensor) -> torch.Tensor:
    """Dynamic MXFP8 quantize-dequantize of activations ``x [..., K]`` (float32, exact values)."""
    return dequantize_mxfp8(*quantize_mxfp8(x))


def fake_quantize_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """Dynamic MXFP4 quantize-dequantize of activations ``x [..., K]`` (float32, exact values)."""
    return dequantize_mxfp4(*quantize_mxfp4(x))
