"""FP8 E4M3 reference numerics with ModelOpt's scale convention.

Values are ``torch.float8_e4m3fn``: no infinities, finite range +-448, conversion rounds to
nearest even. A scale multiplies: ``x ~= fp8.float() * scale``, and a scale is ``amax / 448`` so
the largest magnitude lands on 448. Quantizing divides in float32, ``x / scale``, and saturates
at +-448 before the cast (torch's cast turns out-of-range values into NaN). A dynamic scale whose
amax is zero is set to 1.0, so an all-zero row or block quantizes to zeros without NaN.

Granularities, for a weight ``W[N, K]`` and an activation ``x[..., K]``:

* per-tensor: one scale, shape ``[]``;
* per-channel (weights): one scale per output row, shape ``[N]``;
* per-token (activations): one scale per row of ``x``, shape ``[..., 1]``;
* 2-D blocks (weights): ``block_n x block_k`` tiles (128x128), scale ``[ceil(N/bn), ceil(K/bk)]``;
  edge blocks are partial when a dimension is not a multiple of the block, and their amax is
  taken over the elements that exist;
* 1-D groups (activations): ``1 x group`` along K (1x128), scale ``[..., ceil(K/group)]``,
  the last group partial when K is not a multiple of the group.
"""

from __future__ import annotations

from typing import Sequence

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK_SHAPE = (128, 128)
GROUP_SIZE = 128


def div_ieee(x: torch.Tensor, number: float) -> torch.Tensor:
    """``x / number`` rounded as IEEE division on every device. CUDA divides a tensor by a Python number
    as a multiplication by its reciprocal, one ulp off at times, which the Triton kernels (``div_rn``)
    and CPUs do not; a tensor divisor keeps the true division."""
    return x / torch.full((), number, dtype=x.dtype, device=x.device)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` in float32, with 1.0 where that is zero (all-zero data)."""
    scale = div_ieee(amax.float(), FP8_MAX)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize with a scale that broadcasts against ``x``: ``e4m3(clamp(x / scale, +-448))``."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def to_float32(q: torch.Tensor) -> torch.Tensor:
    """E4M3 codes as float32 values, exactly (every E4M3 value is a float32).

    torch's CPU cast converts element by element; on CPU this rebuilds the bits instead: an E4M3
    code's sign, exponent and mantissa fields placed into float16's (bias 15 vs 7) are the same
    value times 2^-8, subnormals included, and float16 -> float32 is vectorized. Six to seven
    times faster, which is most of a CPU decode step. The NaN codes (0x7f, 0xff), which
    quantization never produces, decode to +-480 on this path.
    """
    if q.device.type != "cpu" or q.dtype != FP8_DTYPE:
        return q.float()
    bits = q.view(torch.uint8).to(torch.int16)
    half = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
    return half.view(torch.float16).float().mul_(256.0)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q * scale`` in float32, then cast to ``dtype``."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    return (to_float32(q) * scale).to(dtype)


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor quantization: returns ``(q, scale[])``."""
    scale = scale_from_amax(x.detach().abs().amax())
    return quantize(x, scale), scale


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel quantization of ``W[N, K]``: returns ``(q, scale[N])``."""
    scale = scale_from_amax(w.detach().abs().amax(dim=-1))
    return quantize(w, scale.unsqueeze(-1)), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) quantization of ``x[..., K]``: returns ``(q, scale[..., 1])``."""
    scale = scale_from_amax(x.detach().abs().amax(dim=-1, keepdim=True))
    return quantize(x, scale), scale


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def block_scale_shape(shape: Sequence[int], block: Sequence[int] = BLOCK_SHAPE) -> tuple[int, int]:
    """Scale shape ``[ceil(N/bn), ceil(K/bk)]`` for a weight of shape ``[N, K]``."""
    n, k = shape[-2], shape[-1]
    return _ceil_div(n, block[0]), _ceil_div(k, block[1])


def expand_block_scale(
    scale: torch.Tensor, shape: Sequence[int], block: Sequence[int] = BLOCK_SHAPE
) -> torch.Tensor:
    """Per-element scale of shape ``shape[-2:]`` from a block scale ``[nb, kb]`` (edges cropped)."""
    n, k = shape[-2], shape[-1]
    full = scale.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return full[..., :n, :k]


def _block_amax(w: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    n, k = w.shape[-2], w.shape[-1]
    nb, kb = block_scale_shape(w.shape, block)
    padded = torch.zeros(
        (*w.shape[:-2], nb * block[0], kb * block[1]), dtype=torch.float32, device=w.device
    )
    padded[..., :n, :k] = w.detach().float().abs()
    tiles = padded.unflatten(-1, (kb, block[1])).unflatten(-3, (nb, block[0]))
    return tiles.amax(dim=(-3, -1))


def quantize_blocks(
    w: torch.Tensor, block: Sequence[int] = BLOCK_SHAPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D block quantization of ``W[N, K]``: returns ``(q[N, K], scale[nb, kb])``."""
    scale = scale_from_amax(_block_amax(w, block))
    return quantize(w, expand_block_scale(scale, w.shape, block)), scale


def dequantize_blocks(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: Sequence[int] = BLOCK_SHAPE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blocks` (up to rounding)."""
    return dequantize(q, expand_block_scale(scale, q.shape, block), dtype)


def expand_group_scale(scale: torch.Tensor, k: int, group: int = GROUP_SIZE) -> torch.Tensor:
    """Per-element scale ``[..., K]`` from a group scale ``[..., ceil(K/group)]``."""
    return scale.float().repeat_interleave(group, dim=-1)[..., :k]


def quantize_groups(
    x: torch.Tensor, group: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic 1 x ``group`` quantization of ``x[..., K]``: ``(q[..., K], scale[..., ceil(K/g)])``."""
    k = x.shape[-1]
    groups = _ceil_div(k, group)
    padded = torch.zeros((*x.shape[:-1], groups * group), dtype=torch.float32, device=x.device)
    padded[..., :k] = x.detach().float().abs()
    scale = scale_from_amax(padded.unflatten(-1, (groups, group)).amax(dim=-1))
    return quantize(x, expand_group_scale(scale, k, group)), scale


def dequantize_groups(
    q: torch.Tensor, scale: torch.Tensor, group: int = GROUP_SIZE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` (up to rounding)."""
    return dequantize(q, expand_group_scale(scale, q.shape[-1], group), dtype)


def requantize_with_max_scale(
    weight: torch.Tensor, weight_scale: torch.Tensor, logical_widths: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give a fused weight (q/k/v or gate/up shards stacked on rows) one per-tensor scale.

    Each shard ``i`` was quantized with its own ``weight_scale[i]``; kernels want one scale, so every
    shard is dequantized and quantized again with the largest scale (vLLM's rule). Shards whose
    scale already is the maximum come back unchanged. Returns ``(max_scale[], new_weight)``.
    """
    if weight_scale.numel() != len(logical_widths):
        raise ValueError(
            f"requantize_with_max_scale: {weight_scale.numel()} scales for "
            f"{len(logical_widths)} shards {list(logical_widths)}"
        )
    if sum(logical_widths) != weight.shape[0]:
        raise ValueError(
            f"requantize_with_max_scale: shard widths {list(logical_widths)} sum to "
            f"{sum(logical_widths)}, weight has {weight.shape[0]} rows"
        )
    max_scale = weight_scale.float().max()
    out = weight.clone()
    start = 0
    for width, shard_scale in zip(logical_widths, weight_scale.float().flatten()):
        rows = slice(start, start + width)
        if shard_scale != max_scale:
            out[rows] = quantize(dequantize(weight[rows], shard_scale), max_scale)
        start += width
    return max_scale, out
