"""KV-cache storage formats: FP8, NVFP4, NVFP4_AFFINE and INT8, per layer.

ModelOpt 0.47 writes one scalar per layer and tensor, ``self_attn.k_proj.k_scale`` and
``self_attn.v_proj.v_scale`` (float32), always ``amax / 448`` in its HF export
(``postprocess_state_dict`` divides the calibrated amax by 448 for every KV format), where amax is
the largest magnitude of keys (values) after RoPE. Per format, for keys ``k [..., Hkv, D]``:

* FP8: ``e4m3(k / k_scale)``; one byte per element.
* NVFP4: NVFP4 (:mod:`mopt.quant.formats.nvfp4`) along ``D`` in blocks of 16 under the global
  scale ``g = k_scale / 6`` (= ``amax / (6 * 448)``, ModelOpt's NVFP4 global scale): packed codes
  ``uint8 [..., Hkv, D/2]`` plus E4M3 block scales ``[..., Hkv, D/16]`` computed when the token
  is written; 0.5625 bytes per element.
* NVFP4_AFFINE: NVFP4 of ``k - k_bias`` with ``k_bias`` float32 ``[Hkv, D]`` (exported as
  ``k_proj.k_bias`` of shape ``[1, Hkv, 1, D]``, the mean ModelOpt's bias calibrator measured),
  read back as ``dequantized + k_bias``. ModelOpt 0.47 calibrates and exports the bias but its own
  NVFP4 fake quantization ignores it (its dynamic block quantizer never receives the bias); mopt
  applies it, which is what the exported tensors describe.
* INT8: ``clamp(round(k / k_scale), -128, 127)`` with ``k_scale = amax / 127``. ModelOpt 0.47's HF
  export cannot write INT8 KV caches (``postprocess_state_dict`` asserts FP8/NVFP4/NVFP4_AFFINE:
  "Invalid KV cache quantization format."); the convention is its ``get_scaling_factor``'s.

:func:`quantize_kv` / :func:`dequantize_kv` are the reference write and read of one such
tensor; :func:`kv_storage` describes what a cache stores per token and head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mopt.quant.formats import fp8, int8, nvfp4

KV_FORMATS = ("FP8", "NVFP4", "NVFP4_AFFINE", "INT8")


@dataclass(frozen=True)
class KVCacheStorage:
    """What a paged cache holds per token and KV head for one of K or V.

    ``codes``: (dtype, last dim) of the element codes; ``block_scales``: (dtype, last dim) of the
    per-block scales stored beside them, or None; ``bias``: whether a per-layer ``[Hkv, D]`` bias is
    added on read. The per-layer scalar scale (``k_scale`` / ``v_scale``) is not stored per token.
    """

    algo: str
    codes: tuple[torch.dtype, int]
    block_scales: tuple[torch.dtype, int] | None = None
    bias: bool = False

    def bytes_per_head(self) -> int:
        """Bytes one token's K (or V) of one KV head takes in the cache: codes plus block scales."""
        dtype, width = self.codes
        total = torch.empty((), dtype=dtype).element_size() * width
        if self.block_scales is not None:
            sdtype, swidth = self.block_scales
            total += torch.empty((), dtype=sdtype).element_size() * swidth
        return total

    def bytes_per_element(self, head_dim: int) -> float:
        return self.bytes_per_head() / head_dim


def unquantized_storage(dtype: torch.dtype, head_dim: int) -> KVCacheStorage:
    """A cache holding keys and values as they are, in ``dtype`` (no KV-cache format)."""
    return KVCacheStorage("NONE", (dtype, head_dim))


def kv_storage(algo: str, head_dim: int) -> KVCacheStorage:
    """The cache storage of ``algo`` for heads of ``head_dim`` elements."""
    if algo == "FP8":
        return KVCacheStorage(algo, (fp8.FP8_DTYPE, head_dim))
    if algo == "INT8":
        return KVCacheStorage(algo, (torch.int8, head_dim))
    if algo in ("NVFP4", "NVFP4_AFFINE"):
        if head_dim % nvfp4.BLOCK_SIZE:
            raise ValueError(f"an NVFP4 KV cache needs head_dim divisible by {nvfp4.BLOCK_SIZE}, got {head_dim}")
        return KVCacheStorage(algo, (torch.uint8, head_dim // 2),
                              (fp8.FP8_DTYPE, head_dim // nvfp4.BLOCK_SIZE), bias=algo == "NVFP4_AFFINE")
    raise ValueError(f"unknown KV-cache format {algo!r}; known: {list(KV_FORMATS)}")


@dataclass
class KVCodes:
    """One quantized K or V tensor: ``codes`` and, for NVFP4, ``block_scales``."""

    codes: torch.Tensor
    block_scales: torch.Tensor | None = None


def nvfp4_global_scale(scale: torch.Tensor | float) -> torch.Tensor:
    """NVFP4 global scale from the exported ``k_scale`` / ``v_scale`` (``amax / 448``): ``/ 6``, as IEEE
    division (on CUDA, a reciprocal multiplication one ulp off moved E2M1 roundings)."""
    return fp8.div_ieee(torch.as_tensor(scale, dtype=torch.float32), nvfp4.E2M1_MAX)


def quantize_kv(x: torch.Tensor, algo: str, scale: torch.Tensor | float,
                bias: torch.Tensor | None = None) -> KVCodes:
    """Quantize keys or values ``x [..., Hkv, D]`` for the cache (``bias`` ``[Hkv, D]``: NVFP4_AFFINE)."""
    if algo == "FP8":
        return KVCodes(fp8.quantize(x, scale))
    if algo == "INT8":
        return KVCodes(int8.quantize_static(x, scale))
    if algo in ("NVFP4", "NVFP4_AFFINE"):
        kv_storage(algo, x.shape[-1])
        if algo == "NVFP4_AFFINE":
            if bias is None:
                raise ValueError("an NVFP4_AFFINE KV cache needs its k_bias / v_bias")
            x = x.float() - bias.float()
        packed, block_scales = nvfp4.quantize(x, nvfp4_global_scale(scale).to(x.device))
        return KVCodes(packed, block_scales)
    raise ValueError(f"unknown KV-cache format {algo!r}; known: {list(KV_FORMATS)}")


def dequantize_kv(stored: KVCodes, algo: str, scale: torch.Tensor | float, bias: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_kv` (float32 math, cast to ``dtype``)."""
    if algo == "FP8":
        return fp8.dequantize(stored.codes, scale, dtype)
    if algo == "INT8":
        return int8.dequantize(stored.codes, scale, dtype)
    if algo in ("NVFP4", "NVFP4_AFFINE"):
        g = nvfp4_global_scale(scale).to(stored.codes.device)
        out = nvfp4.dequantize(stored.codes, stored.block_scales, g)
        if algo == "NVFP4_AFFINE":
            out = out + bias.float()
        return out.to(dtype)
    raise ValueError(f"unknown KV-cache format {algo!r}; known: {list(KV_FORMATS)}")


def fake_quantize_kv(x: torch.Tensor, algo: str, scale: torch.Tensor | float,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """What attention reads back after writing ``x`` to the cache, in ``x``'s dtype."""
    return dequantize_kv(quantize_kv(x, algo, scale, bias), algo, scale, bias, x.dtype)
