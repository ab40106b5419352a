"""Attention: RoPE, grouped-query causal attention, with the layer's KV-cache quantization method.

Two paths. Without metadata (scoring, evaluation) it rotates ``q, k`` and attends over the full
sequence with no cache; keys and values still pass through the KV cache's storage format (FP8:
``e4m3(k / k_scale) * k_scale``; NVFP4, NVFP4_AFFINE, INT8: the KV method's ``round_kv``), so logits
equal what a cached decode computes. With :class:`AttentionMetadata` (generation) the backend chosen
when the engine attaches the paged cache (``kernels.attention``) rotates the new tokens, writes their
keys and values into the cache (one fused kernel on GPUs) and attends over the cached context.

The paged cache stores the layer's format natively (:meth:`Attention.kv_storage`): FP8 or INT8 codes,
or NVFP4 packed codes plus E4M3 block scales (``kernels.paged_attention.PackedKV``). Only an NVFP4 /
INT8 checkpoint run with ``kv_cache_dtype="fp8"`` still rounds keys and values to the checkpoint's
format first and then stores them as FP8 (both roundings, as before).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mopt.kernels.attention import AttentionBackend, AttentionSpec, select_attention_backend
from mopt.kernels.paged_attention import PackedKV, cache_format
from mopt.kernels.quantized_input import mark_nvfp4_block_values, nvfp4_block_values_of
from mopt.quant.formats import fp8
from mopt.quant.formats import kv_cache as kv_format


def cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache tensor. On CPUs numpy's calloc'd memory: the OS maps zero pages as they are first
    touched, where ``torch.zeros`` writes the whole cache up front (0.2 s of start-up for the default 512 MiB)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(math.prod(shape) * itemsize, np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


@dataclass
class AttentionMetadata:
    """Where a batch of new tokens sits in the paged KV cache.

    Tokens of ``B`` sequences are packed back to back: sequence ``b`` owns tokens
    ``query_start_loc[b]:query_start_loc[b + 1]`` and has ``seq_lens[b]`` tokens in the cache once
    they are written; ``slot_mapping [N]`` is each new token's cache slot (-1: padding, not written)
    and ``block_tables [B, max_blocks]`` each sequence's blocks (padded with block 0, masked by
    ``seq_lens``). ``max_query_len == 1`` marks a decode step.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int


class Attention(nn.Module):
    quant_kind = "attention"

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, rotary: nn.Module,
                 quant_config=None, prefix: str = "", kv_cache_dtype: str = "auto",
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.prefix = prefix
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.rotary = rotary
        self.kv_cache_dtype = kv_cache_dtype
        # Query at position i sees keys at i - sliding_window < j <= i (transformers' convention).
        self.sliding_window = sliding_window
        self.quant_method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        if self.quant_method is not None:
            self.quant_method.create_weights(self)
            for name in ("k_scale", "v_scale"):
                p = getattr(self, name)
                p.mopt_name = f"{prefix}.{name}"
                p._weight_loader = lambda param, t, shard_id=None: param.load(t)
        self.k_scale_float = self.v_scale_float = 1.0
        self.k_cache: torch.Tensor | None = None  # attached by the engine
        self.v_cache: torch.Tensor | None = None
        self.backend: AttentionBackend | None = None
        # An NVFP4 / NVFP4_AFFINE / INT8 KV-cache method (set by it after loading): rounds keys and values
        # to what such a cache returns on the cache-free path, and hands out the format's codes.
        self.kv_emulation = None
        self.kv_packed: PackedKV | None = None  # an NVFP4 paged cache's block scales and biases
        self.kv_native = True  # False: the paged cache is FP8 for an NVFP4 / INT8 method (round first)

    def process_weights_after_loading(self) -> None:
        if self.quant_method is not None:
            self.quant_method.process_weights_after_loading(self)

    def kv_storage(self, model_dtype: torch.dtype) -> kv_format.KVCacheStorage:
        """What the paged cache holds per token and KV head: the checkpoint's KV format (FP8 when
        ``kv_cache_dtype == "fp8"``), else the values in ``model_dtype``. Known before loading."""
        if self.kv_cache_dtype == "fp8":
            return kv_format.kv_storage("FP8", self.head_dim)
        algo = getattr(self.quant_method, "kv_algo", None)
        if algo is not None:
            return kv_format.kv_storage(algo, self.head_dim)
        return kv_format.unquantized_storage(model_dtype, self.head_dim)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, model_dtype: torch.dtype, device: torch.device,
                          backend: str | None = None) -> None:
        """Allocate (zeroed) and attach a paged cache of ``num_blocks x block_size`` slots in :meth:`kv_storage`."""
        storage = self.kv_storage(model_dtype)
        lead = (num_blocks, block_size, self.num_kv_heads)
        dtype, width = storage.codes
        k_cache, v_cache = (cache_zeros((*lead, width), dtype, device) for _ in range(2))
        packed = None
        if storage.block_scales is not None:
            sdtype, swidth = storage.block_scales
            k_scales, v_scales = (cache_zeros((*lead, swidth), sdtype, device) for _ in range(2))
            biases = (None, None)
            if storage.bias:
                biases = tuple(getattr(self, name).to(device, torch.float32).contiguous()
                               for name in ("k_bias", "v_bias"))
            packed = PackedKV(k_scales, v_scales, *biases)
        self.attach_kv_cache(k_cache, v_cache, backend, packed)

    def attach_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, backend: str | None = None,
                        packed: PackedKV | None = None) -> None:
        """Give the layer its paged cache (``packed``: an NVFP4 cache's block scales and biases) and pick
        the backend that computes with it."""
        self.k_cache, self.v_cache, self.kv_packed = k_cache, v_cache, packed
        self.kv_native = self.kv_emulation is None or cache_format(k_cache, packed) == self.kv_cache_algo
        spec = AttentionSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.sliding_window)
        self.backend = select_attention_backend(spec, k_cache.device, backend)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                metadata: AttentionMetadata | None = None, fp8_scale: torch.Tensor | None = None,
                nvfp4_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``positions [B, T]``, ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]`` (before RoPE) -> ``[B, T, H*D]``.

        With ``metadata``, ``B == 1`` and the ``T`` tokens are the packed new tokens of a batch; then
        ``fp8_scale`` (the output projection's ``fp8_input_scale``) makes the output E4M3 codes under it,
        and ``nvfp4_scale`` (its ``nvfp4_input_scale``) may make it marked NVFP4 block values
        (``kernels.quantized_input``; decode steps on GPUs).
        """
        if metadata is not None:
            return self._forward_paged(positions, q, k, v, metadata, fp8_scale, nvfp4_scale)
        q, k = self.rotary(positions, q, k)
        if self.kv_emulation is not None:
            k, v = self.kv_emulation.round_kv(self, k, v)
        if self.kv_cache_dtype == "fp8":
            k = fp8.dequantize(fp8.quantize(k, self.k_scale_float), self.k_scale_float, k.dtype)
            v = fp8.dequantize(fp8.quantize(v, self.v_scale_float), self.v_scale_float, v.dtype)
        b, t = q.shape[:2]
        mask = None
        if self.sliding_window is not None:
            pos = torch.arange(t, device=q.device)
            distance = pos[:, None] - pos[None, :]
            mask = (distance >= 0) & (distance < self.sliding_window)
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)

    def _forward_paged(self, positions, q, k, v, meta: AttentionMetadata, fp8_scale, nvfp4_scale) -> torch.Tensor:
        if self.backend is None:
            raise RuntimeError(f"{self.prefix}: attention metadata given but no KV cache attached")
        cos_sin = self.rotary.cos_sin_cache
        if self.kv_emulation is not None and not self.kv_native:
            # An FP8 cache for an NVFP4 / INT8 checkpoint: round after RoPE, then let the kernel write
            # through an identity rotation (cos 1, sin 0: exact), so the cache holds the rounded keys.
            q, k = self.rotary(positions, q, k)
            k, v = self.kv_emulation.round_kv(self, k, v)
            cos_sin = self.rotary.identity_cos_sin()
        out = self.backend.rope_write_attend(q[0], k[0], v[0], positions[0], cos_sin, self.k_cache, self.v_cache,
                                             meta, self.scale, self.k_scale_float, self.v_scale_float,
                                             self.sliding_window, fp8_scale, packed=self.kv_packed,
                                             nvfp4_scale=nvfp4_scale)
        values = nvfp4_block_values_of(out)
        out = (out if values is None else values).reshape(1, out.shape[0], self.num_heads * self.head_dim)
        return out if values is None else mark_nvfp4_block_values(out)
