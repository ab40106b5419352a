"""INT4 group-quantized weights: ModelOpt's W4A16_AWQ and W4A8_AWQ.

Checked against ModelOpt 0.47's export (``quant_utils.pack_int4_in_uint8``, ``to_quantized_weight``,
``get_weight_scaling_factor``) and real exports of tiny Llamas:

* values: signed 4-bit integers ``q`` in ``[-8, 7]``, ``q = clamp(round(w / s), -8, 7)`` (torch's
  round: half to even); ``w ~= q * s``.
* scales: ``weight_scale`` float32 ``[N, K / g]``, one per output row and group of ``g`` (the
  config's ``group_size``, 128) consecutive input columns: ``s = group_amax / 7`` (1.0 for an
  all-zero group). K must be a multiple of ``g``.
* checkpoint packing: two values per byte **along the output dimension**: ``weight`` is
  ``uint8 [N / 2, K]``, byte ``(r, k)`` holds row ``2r`` in its low nibble and row ``2r + 1`` in
  its high nibble, each as a two's-complement nibble. N must be even.
* ``pre_quant_scale`` float32 ``[K]`` (AWQ's per-input-channel smoothing) is exported only where
  ModelOpt could not fold it into the preceding norm: ``x' = x * pre_quant_scale`` feeds the GEMM.
  On Llama it stays on ``o_proj`` and ``down_proj``; q/k/v and gate/up have theirs folded into
  the RMSNorm weights.
* W4A8_AWQ adds ``weight_scale_2`` float32 ``[]`` (``amax / 448`` of the INT4-dequantized weight)
  and ``input_scale`` float32 ``[]`` (static per-tensor FP8 activations, ``amax / 448``). ModelOpt
  quantizes the weight twice: INT4 per group, then the dequantized INT4 weight to FP8 per tensor,
  so the effective weight is ``e4m3(q * s / weight_scale_2) * weight_scale_2``
  (:func:`w4a8_fp8_weight`), multiplied with FP8 activations.

mopt's run-time layout (:func:`pack_k`): ``uint8 [N, K / 2]``, two values per byte **along K**,
element ``2i`` in the low nibble, like NVFP4, so every 4-bit format streams rows the same way.
"""

from __future__ import annotations

import torch

from mopt.quant.formats import fp8

INT4_MIN, INT4_MAX = -8, 7
INT4_SCALE_DIV = 7.0  # s = amax / 7


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.int16).bitwise_and(0xF).to(torch.uint8)


def _signed(nibble: torch.Tensor) -> torch.Tensor:
    """Two's-complement 4-bit values from nibbles ``[0, 15]`` as int8."""
    n = nibble.to(torch.int16)
    return torch.where(n >= 8, n - 16, n).to(torch.int8)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """ModelOpt's checkpoint packing: int ``[..., N, K]`` (N even) -> ``uint8 [..., N/2, K]``."""
    if q.shape[-2] % 2:
        raise ValueError(f"int4.pack_rows needs an even number of rows, got shape {tuple(q.shape)}")
    return _nibbles(q[..., 0::2, :]) | (_nibbles(q[..., 1::2, :]) << 4)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``uint8 [..., N/2, K]`` -> int8 ``[..., N, K]``."""
    low, high = _signed(packed & 0xF), _signed(packed >> 4)
    return torch.stack([low, high], dim=-2).flatten(-3, -2)


def pack_k(q: torch.Tensor) -> torch.Tensor:
    """mopt's run-time packing: int ``[..., K]`` (K even) -> ``uint8 [..., K/2]``, element 2i low."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4.pack_k needs an even last dim, got shape {tuple(q.shape)}")
    return _nibbles(q[..., 0::2]) | (_nibbles(q[..., 1::2]) << 4)


def unpack_k(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_k`: ``uint8 [..., K/2]`` -> int8 ``[..., K]``."""
    return torch.stack([_signed(packed & 0xF), _signed(packed >> 4)], dim=-1).flatten(-2)


def rows_to_k(packed_rows: torch.Tensor) -> torch.Tensor:
    """Checkpoint layout ``[N/2, K]`` -> run-time layout ``[N, K/2]`` (same values)."""
    return pack_k(unpack_rows(packed_rows))


def group_scales(w: torch.Tensor, group: int) -> torch.Tensor:
    """``amax / 7`` per row and group of ``group`` columns: float32 ``[..., N, K/group]``."""
    if w.shape[-1] % group:
        raise ValueError(f"int4 groups of {group} do not divide K={w.shape[-1]}")
    amax = w.detach().float().unflatten(-1, (-1, group)).abs().amax(dim=-1)
    scale = amax / INT4_SCALE_DIV
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def expand_groups(scale: torch.Tensor, k: int) -> torch.Tensor:
    """Per-element scale ``[..., K]`` from per-group ``[..., K/g]``."""
    return scale.float().repeat_interleave(k // scale.shape[-1], dim=-1)


def quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [..., N, K], scale float32 [..., N, K/group])`` as ModelOpt's export computes them."""
    scale = group_scales(w, group)
    q = (w.float() / expand_groups(scale, w.shape[-1])).round().clamp(INT4_MIN, INT4_MAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * s`` in float32 for values ``q`` (int8 ``[..., N, K]``) and group scales ``[..., N, K/g]``."""
    return (q.float() * expand_groups(scale, q.shape[-1])).to(dtype)


def w4a8_fp8_weight(q: torch.Tensor, scale: torch.Tensor, weight_scale_2: torch.Tensor | float) -> torch.Tensor:
    """W4A8_AWQ's effective FP8 weight codes: ``e4m3(q * s / weight_scale_2)``; times
    ``weight_scale_2`` they are the weight the FP8 GEMM multiplies (INT4 values times their group
    scale are re-quantized per tensor, as ModelOpt's second weight quantizer does)."""
    return fp8.quantize(dequantize(q, scale), weight_scale_2)
