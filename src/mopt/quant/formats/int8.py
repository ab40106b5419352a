"""INT8 weights and activations: ModelOpt's W8A16 (weight-only) and W8A8_SQ_PER_CHANNEL (SmoothQuant).

Checked against ModelOpt 0.47 (``to_quantized_weight``, ``tensor_quant._tensor_quant``) and real
exports of tiny Llamas:

* weights: ``weight`` int8 ``[N, K]``, ``weight_scale`` float32 ``[N]`` per output channel,
  ``s = amax / 127``; ``q = clamp(round(w / s), -128, 127)``; ``w ~= q * s``.
* W8A8_SQ activations: static per tensor, ``input_scale`` float32 ``[]`` (``amax / 127``);
  ``q = clamp(round(x / s), -128, 127)`` (round half to even; ModelOpt's integer quantizer is not
  narrow-range by default, so -128 is used), ``x ~= q * s``. SmoothQuant's per-input-channel
  ``pre_quant_scale`` float32 ``[K]`` is exported for every layer (``x' = x * pre_quant_scale``
  is what gets quantized); fused shards (q/k/v, gate/up) share one, and one ``input_scale``.

An INT8 KV cache (``kv_cache_quant_algo: INT8``) uses :func:`quantize_static` with the per-layer
``k_scale`` / ``v_scale``.
"""

from __future__ import annotations

import torch

INT8_MIN, INT8_MAX = -128, 127
INT8_SCALE_DIV = 127.0


def channel_scales(w: torch.Tensor) -> torch.Tensor:
    """``amax / 127`` per output row (1.0 for an all-zero row): float32 ``[..., N]``."""
    scale = w.detach().float().abs().amax(dim=-1) / INT8_SCALE_DIV
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_static(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``clamp(round(x / scale), -128, 127)`` as int8 (``scale`` broadcasts against ``x``)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return (x.float() / scale).round().clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [..., N, K], scale float32 [..., N])``."""
    scale = channel_scales(w)
    return quantize_static(w, scale.unsqueeze(-1)), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in float32 (``scale`` broadcasts against ``q``), cast to ``dtype``."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    return (q.float() * scale).to(dtype)
