"""Reference paged attention: RoPE, KV-cache writes and attention over block tables, in torch.

Cache layout, per layer: ``k_cache``, ``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]``;
token ``t`` of a sequence lives in slot ``block_table[t // block_size] * block_size + t % block_size``.
The cache's dtype says its format (``mopt.quant.formats.kv_cache``): float8_e4m3fn is FP8
(``e4m3(k / k_scale)``), int8 is INT8 (``round(k / k_scale)``), uint8 is NVFP4 (two E2M1 codes a
byte, ``[..., Hkv, D/2]``) whose E4M3 block scales ``[..., Hkv, D/16]`` and, for NVFP4_AFFINE, float32
``[Hkv, D]`` biases come in a :class:`PackedKV`; any other dtype holds the values themselves. Writes
quantize with the format's reference ``quantize_kv``, reads dequantize with its ``dequantize_kv``, so
attention sees exactly the values the cache-free path computes with. A slot < 0 is not written
(padding rows of a CUDA-graph batch); a sequence with ``seq_len == 0`` gets a zero output.

RoPE is rotate-half over a ``cos_sin_cache [positions, head_dim]`` table (cosines in the first half,
sines in the second, both already times the RoPE type's attention scaling), in float32, rounded to
the input dtype once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mopt.quant.formats import fp8
from mopt.quant.formats import kv_cache as kv_format


@dataclass(frozen=True)
class PackedKV:
    """What an NVFP4 cache keeps beside its packed codes: E4M3 block scales ``[num_blocks, block_size,
    num_kv_heads, head_dim / 16]`` for keys and values, and NVFP4_AFFINE's float32 ``[num_kv_heads,
    head_dim]`` biases (None: plain NVFP4)."""

    k_block_scales: torch.Tensor
    v_block_scales: torch.Tensor
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None


def cache_format(cache: torch.Tensor, packed: PackedKV | None = None) -> str:
    """The KV-cache format a cache tensor holds (``"NONE"``: values in the cache's dtype)."""
    if cache.dtype == fp8.FP8_DTYPE:
        return "FP8"
    if cache.dtype == torch.int8:
        return "INT8"
    if cache.dtype == torch.uint8:
        assert packed is not None, "an NVFP4 cache needs its block scales (PackedKV)"
        return "NVFP4" if packed.k_bias is None else "NVFP4_AFFINE"
    return "NONE"


def _sides(k_cache, v_cache, k_scale, v_scale, packed: PackedKV | None):
    """``(cache, scale, block scales, bias)`` of keys, then of values."""
    if packed is None:
        return (k_cache, k_scale, None, None), (v_cache, v_scale, None, None)
    return ((k_cache, k_scale, packed.k_block_scales, packed.k_bias),
            (v_cache, v_scale, packed.v_block_scales, packed.v_bias))


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """``x [..., heads, D]`` rotated by ``cos_sin [..., D]`` (the table's rows at x's positions)."""
    cos, sin = cos_sin.unsqueeze(-2).chunk(2, dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    # Per half, as the Triton kernel computes it: (x1 cos - x2 sin, x2 cos + x1 sin), one product each.
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float, v_scale: float, packed: PackedKV | None = None) -> None:
    """Store ``key, value [N, Hkv, D]`` at ``slot_mapping [N]`` in the caches' format."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    algo = cache_format(k_cache, packed)
    for new, (cache, scale, block_scales, bias) in zip((key, value),
                                                       _sides(k_cache, v_cache, k_scale, v_scale, packed)):
        flat = cache.view(-1, *cache.shape[2:])
        if algo == "NONE":
            flat[slot_mapping] = new.to(cache.dtype)
            continue
        codes = kv_format.quantize_kv(new, algo, scale, bias)
        flat[slot_mapping] = codes.codes
        if block_scales is not None:
            block_scales.view(-1, *block_scales.shape[2:])[slot_mapping] = codes.block_scales


def rope_and_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float, v_scale: float,
                   packed: PackedKV | None = None) -> torch.Tensor:
    """``q [N, H, D]``, ``k, v [N, Hkv, D]`` -> rotated q; rotated k and v are written to the caches."""
    cos_sin = cos_sin_cache[positions]
    write_kv(apply_rope(k, cos_sin), v, k_cache, v_cache, slot_mapping, k_scale, v_scale, packed)
    return apply_rope(q, cos_sin)


def _read(algo: str, cache: torch.Tensor, scale: float, block_scales: torch.Tensor | None,
          bias: torch.Tensor | None, block_tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, max_blocks * block_size, Hkv, D]`` in ``dtype``."""
    blocks = cache[block_tables].flatten(1, 2)
    if algo == "NONE":
        return blocks.to(dtype)
    if block_scales is not None:
        block_scales = block_scales[block_tables].flatten(1, 2)
    return kv_format.dequantize_kv(kv_format.KVCodes(blocks, block_scales), algo, scale, bias, dtype)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    max_query_len: int, scale: float, k_scale: float = 1.0, v_scale: float = 1.0, *,
                    sliding_window: int | None = None, packed: PackedKV | None = None) -> torch.Tensor:
    """Causal attention of new tokens over their sequences' cached context.

    ``query [N, H, D]`` holds the new tokens of ``B`` sequences back to back
    (``query_start_loc [B + 1]``); sequence ``b`` has ``seq_lens[b]`` tokens in the cache, the last
    ``q_len`` of which are its new ones. With ``sliding_window``, a query at position ``i`` sees
    only keys at ``i - sliding_window < j <= i``; ``packed``: an NVFP4 cache's block scales and biases.
    Rows after ``query_start_loc[B]`` belong to no sequence (a padded CUDA-graph step's) and get zeros.
    Returns ``[N, H, D]``.
    """
    rows = query.shape[0]
    used = int(query_start_loc[-1])
    if used < rows:
        out = paged_attention(query[:used], k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                              scale, k_scale, v_scale, sliding_window=sliding_window, packed=packed)
        return torch.cat([out, out.new_zeros(rows - used, *out.shape[1:])])
    n, num_heads, head_dim = query.shape
    batch = seq_lens.shape[0]
    block_tables, seq_lens, query_start_loc = block_tables.long(), seq_lens.long(), query_start_loc.long()
    algo = cache_format(k_cache, packed)
    (k_side, v_side) = _sides(k_cache, v_cache, k_scale, v_scale, packed)
    keys = _read(algo, *k_side, block_tables, query.dtype)
    values = _read(algo, *v_side, block_tables, query.dtype)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=query.device), q_lens)
    row_of_token = torch.arange(n, device=query.device) - query_start_loc[seq_of_token]
    padded = query.new_zeros(batch, max_query_len, num_heads, head_dim)
    padded[seq_of_token, row_of_token] = query
    query_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_query_len, device=query.device)
    key_pos = torch.arange(keys.shape[1], device=query.device)
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= query_pos[:, :, None] - key_pos[None, None, :] < sliding_window
    out = nn.functional.scaled_dot_product_attention(
        padded.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask[:, None],
        scale=scale, enable_gqa=keys.shape[2] != num_heads,
    )
    out = out.transpose(1, 2)[seq_of_token, row_of_token]
    # Rows with no key at all (seq_len 0: padding) come out of SDPA as NaN.
    return out.masked_fill((seq_lens[seq_of_token] == 0)[:, None, None], 0.0)
