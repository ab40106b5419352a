"""NVFP4 reference numerics: FP4 E2M1 values, E4M3 block scales per 16 elements, FP32 global scale.

E2M1 grid: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}. A 4-bit code is ``sign << 3 | index`` where ``index``
points into that grid; encoding rounds to nearest with ties to the even code (0.25->0, 0.75->1,
1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4), saturates beyond 6, and gives negative inputs the sign
bit even when they round to zero (as ModelOpt does).

Packing: two codes per ``uint8`` along the last dim; element ``2i`` in the low nibble, ``2i+1`` in
the high nibble. ``W[N, K]`` is stored as ``uint8[N, K/2]``.

Scales (ModelOpt's convention), for data ``x`` split into blocks of 16 along the last dim:

* global scale ``g = amax / (6 * 448)`` (``weight_scale_2`` for weights, ``input_scale`` for
  activations, both FP32);
* block scale ``s = e4m3(clamp(block_amax / (6 * g), 2**-9, 448))``, with ``s = 1`` for an
  all-zero block; ``weight_scale`` is ``float8_e4m3fn[N, K/16]``;
* code value ``c = e2m1(x / (float(s) * g))`` computed in float32; ``x ~= c * float(s) * g``.

The variants ModelOpt 0.47 exports with the same weight encoding (checked in its export code,
``quant_utils.get_weight_scaling_factor(_2)``, and in real exports):

* W4A16_NVFP4: weights as above, no ``input_scale``; activations stay unquantized.
* W4A8_NVFP4_FP8: 32-element weight blocks (``weight_scale`` e4m3 ``[N, K/32]``) and
  ``weight_scale_2 = amax / 448`` (not ``/ (6 * 448)``, so the kernel can widen weights to FP8), hence
  block scales up to ``448 / 6``; activations FP8 E4M3 per tensor with ``input_scale = amax / 448``.
  ModelOpt's own fake quantization uses ``amax / (6 * 448)`` for the weights, so its in-memory model
  rounds block scales differently from its export; mopt follows the export.
* NVFP4_AWQ: NVFP4 plus ``pre_quant_scale`` float32 ``[K]`` where AWQ's smoothing could not be
  folded into the preceding layer (``x' = x * pre_quant_scale`` is quantized).
* NVFP4_SVD (SVDQuant): NVFP4 plus ``pre_quant_scale`` on every layer and a low-rank branch
  ``weight_quantizer._svdquant_lora_a`` ``[r, K]`` and ``weight_quantizer._svdquant_lora_b``
  ``[N, r]`` in the export dtype: ``y = nvfp4(x') @ W^T + (x' @ A^T) @ B^T``.

Swizzled block-scale layout (what CUTLASS/FlashInfer-style FP4 GEMMs read): the ``[rows, cols]``
scale matrix is zero-padded to rows a multiple of 128 and cols a multiple of 4, then cut into
128x4 tiles, tiles in row-major order (a row of tiles along cols first). Each tile is 512
contiguous bytes laid out ``[32][4][4]``: ``tile[r32][r4][c] = S[128*t_r + 32*r4 + r32, 4*t_c + c]``.
"""

from __future__ import annotations

import torch

from mopt.quant.formats.fp8 import FP8_DTYPE, FP8_MAX, to_float32

BLOCK_SIZE = 16
E2M1_MAX = 6.0
MIN_BLOCK_SCALE = 2.0**-9  # smallest positive E4M3 value (a subnormal)
_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between grid neighbours; the upper neighbour of each is E2M1 index i + 1.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_values(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 code values, indexed by code (codes 8..15 are the negatives of 0..7)."""
    grid = torch.tensor(_E2M1_GRID, dtype=torch.float32, device=device)
    return torch.cat([grid, -grid])


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round float values onto the E2M1 grid; returns ``uint8`` codes in ``[0, 15]``."""
    x = x.float()
    mag = x.abs()
    index = torch.zeros_like(mag, dtype=torch.uint8)
    for i, mid in enumerate(_E2M1_MIDPOINTS):
        # A tie goes up only when the upper neighbour's index (i + 1) is even.
        up = mag >= mid if (i + 1) % 2 == 0 else mag > mid
        index += up.to(torch.uint8)
    return index | ((x < 0).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """``uint8`` codes (low 4 bits) to float32 values, by placing the code's fields into float32's: exponent
    field ``e`` (2 bits, bias 1) and mantissa bit ``m`` give ``(1 + m/2) * 2**(e - 1)``, ``e == 0`` the
    subnormals 0 and 0.5. No lookup table: nothing is copied from the host, so a CUDA graph can hold it."""
    c = codes.to(torch.int32)
    e, m = (c >> 1) & 3, c & 1
    normal = ((e + 126) << 23) | (m << 22)
    magnitude = torch.where(e == 0, m * (126 << 23), normal)  # 0.5 = 2**-1 when e == 0 and m == 1
    return (magnitude | ((c & 8) << 28)).view(torch.float32)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes ``[..., K]`` (K even) into ``uint8[..., K/2]``, element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"nvfp4.pack needs an even last dim, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8[..., K/2]`` to codes ``uint8[..., K]``."""
    low = packed & 0xF
    high = packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax / (6 * 448)`` in float32 (``weight_scale_2`` / ``input_scale``)."""
    return amax.float() / (E2M1_MAX * FP8_MAX)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    if pad == 0:
        return x
    return torch.nn.functional.pad(x, (0, pad))


def block_scales(x: torch.Tensor, global_scale: torch.Tensor | float, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """E4M3 block scales ``[..., ceil(K/16)]`` for ``x[..., K]`` (a partial last block is padded).

    ``block_size`` 32 is W4A8_NVFP4_FP8's weight block (same scale rule)."""
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    blocks = _pad_last(x.detach().float(), block_size).unflatten(-1, (-1, block_size))
    scale = blocks.abs().amax(dim=-1) / (E2M1_MAX * g)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(MIN_BLOCK_SCALE, FP8_MAX).to(FP8_DTYPE)


def quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | float,
    block_scale: torch.Tensor | None = None,
    block_size: int = BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x[..., K]`` to ``(packed uint8[..., Kp/2], block_scale e4m3[..., Kp/16])``.

    ``Kp`` is K rounded up to a multiple of 16; padding elements are zero and never read from
    ``x``. ``block_scale`` may be given (as loaded from a checkpoint) instead of computed.
    """
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    if block_scale is None:
        block_scale = block_scales(x, g, block_size)
    blocks = _pad_last(x.float(), block_size).unflatten(-1, (-1, block_size))
    scaled = blocks / (to_float32(block_scale) * g).unsqueeze(-1)
    return pack(e2m1_encode(scaled.flatten(-2))), block_scale


def dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.float32,
    k: int | None = None,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """``code value * float(block_scale) * global_scale``; ``k`` crops padded columns."""
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=packed.device)
    values = e2m1_decode(unpack(packed)).unflatten(-1, (-1, block_size))
    out = (values * (to_float32(block_scale) * g).unsqueeze(-1)).flatten(-2)
    if k is not None:
        out = out[..., :k]
    return out.to(dtype)


def dequantize_to_block_values(packed: torch.Tensor, block_scale: torch.Tensor,
                               block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """``code value * float(block_scale)`` without the global scale, float32.

    Exact: an E2M1 value (2 significant bits) times an E4M3 scale (4 significant bits) fits the
    8-bit significand of bfloat16, which is what lets a W4A4 GEMM run on BF16 tensor cores and
    apply both global scales once in its epilogue.
    """
    values = e2m1_decode(unpack(packed)).unflatten(-1, (-1, block_size))
    return (values * to_float32(block_scale).unsqueeze(-1)).flatten(-2)


def quantize_activations(
    x: torch.Tensor, input_scale: torch.Tensor | float, swizzle: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic NVFP4 quantization of ``x[M, K]`` given the static global ``input_scale``.

    Returns packed ``uint8[M, Kp/2]`` and block scales ``e4m3[M, Kp/16]`` (``Kp`` = K rounded up
    to 16), or, with ``swizzle``, the block scales in the swizzled layout of
    :func:`swizzle_block_scales` (rows padded to 128).
    """
    packed, scales = quantize(x, input_scale)
    if swizzle:
        scales = swizzle_block_scales(scales)
    return packed, scales


def swizzled_shape(rows: int, cols: int) -> tuple[int, int]:
    """Padded ``(rows, cols)`` of the swizzled layout: rows to 128, cols to 4."""
    return -(-rows // 128) * 128, -(-cols // 4) * 4


def swizzle_block_scales(scale: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` (or ``[B, rows, cols]``) block scales to the 128x4-tile swizzled layout.

    Returns a tensor of shape ``[rows_p, cols_p]`` (``[B, rows_p, cols_p]``) whose memory, read
    flat, is the tile sequence described in the module docstring.
    """
    batched = scale.dim() == 3
    s = scale if batched else scale.unsqueeze(0)
    b, rows, cols = s.shape
    rows_p, cols_p = swizzled_shape(rows, cols)
    padded = torch.zeros((b, rows_p, cols_p), dtype=s.dtype, device=s.device)
    padded[:, :rows, :cols] = s
    tiles = padded.view(b, rows_p // 128, 4, 32, cols_p // 4, 4)
    out = tiles.permute(0, 1, 4, 3, 2, 5).contiguous().view(b, rows_p, cols_p)
    return out if batched else out[0]


def unswizzle_block_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_block_scales`, cropped back to ``[rows, cols]``."""
    batched = swizzled.dim() == 3
    s = swizzled if batched else swizzled.unsqueeze(0)
    b = s.shape[0]
    rows_p, cols_p = swizzled_shape(rows, cols)
    if s[0].numel() != rows_p * cols_p:
        raise ValueError(
            f"swizzled scales hold {s[0].numel()} values, expected {rows_p}x{cols_p} "
            f"for a {rows}x{cols} scale matrix"
        )
    tiles = s.reshape(b, rows_p // 128, cols_p // 4, 32, 4, 4)
    out = tiles.permute(0, 1, 4, 3, 2, 5).reshape(b, rows_p, cols_p)[:, :rows, :cols]
    return out if batched else out[0]
