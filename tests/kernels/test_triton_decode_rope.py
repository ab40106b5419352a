"""Decode with RoPE and the KV-cache write in its own kernel (``triton_attention.decode(..., new=...)``)
against ``rope_and_write`` followed by ``decode``: the same output bits and the same cache bytes (codes,
NVFP4 block scales), for every cache format, with one or several context slices, a padding row (slot -1,
no context) and a sliding window. Both paths run the same float32 operations without FMA contraction, so
any difference is a bug, not rounding: the comparison is exact. Through the interpreter at small shapes
(float32), on the GPU (``-m gpu``) at Llama-3-8B's per-layer shapes in BF16 and float32.
"""

from __future__ import annotations

import pytest
import torch

from triton_device import triton_device

from mopt.kernels import paged_attention as ref
from mopt.quant.formats import fp8
from mopt.quant.formats import kv_cache as kv_format

triton_attention = pytest.importorskip("mopt.kernels.triton_attention")

FORMATS = ["model", "FP8", "INT8", "NVFP4", "NVFP4_AFFINE"]
SCALES = {"model": (1.0, 1.0), "FP8": (6 / 448, 3 / 448), "INT8": (6 / 127, 3 / 127), "NVFP4": (6 / 448, 3 / 448),
          "NVFP4_AFFINE": (6 / 448, 3 / 448)}


def _caches(algo, num_blocks, page, kv_heads, head_dim, dtype, device, g):
    """Caches of ``algo`` full of random tokens (written by the reference), and their PackedKV."""
    if algo == "model":
        k, v = (torch.randn(num_blocks, page, kv_heads, head_dim, generator=g).to(device, dtype) for _ in range(2))
        return k, v, None
    storage = kv_format.kv_storage(algo, head_dim)
    codes_dtype, width = storage.codes
    lead = (num_blocks, page, kv_heads)
    k_cache, v_cache = (torch.zeros(*lead, width, dtype=codes_dtype, device=device) for _ in range(2))
    sdtype, swidth = storage.block_scales or (None, None)
    packed = None
    if sdtype is not None:
        biases = [(torch.randn(kv_heads, head_dim, generator=g) * 0.3).to(device) for _ in range(2)] \
            if storage.bias else [None, None]
        packed = ref.PackedKV(*(torch.zeros(*lead, swidth, dtype=sdtype, device=device) for _ in range(2)), *biases)
    tokens = num_blocks * page
    ks, vs = SCALES[algo]
    ref.write_kv((torch.randn(tokens, kv_heads, head_dim, generator=g) * 2).to(device),
                 torch.randn(tokens, kv_heads, head_dim, generator=g).to(device), k_cache, v_cache,
                 torch.arange(tokens, device=device), ks, vs, packed)
    return k_cache, v_cache, packed


def _clone(k_cache, v_cache, packed):
    if packed is None:
        return k_cache.clone(), v_cache.clone(), None
    return k_cache.clone(), v_cache.clone(), ref.PackedKV(packed.k_block_scales.clone(), packed.v_block_scales.clone(),
                                                          packed.k_bias, packed.v_bias)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == fp8.FP8_DTYPE else t


def _case(device, dtype, algo, seq_lens, heads=4, kv_heads=2, head_dim=64, page=16, splits=None, window=0,
          fp8_out=False):
    g = torch.Generator().manual_seed(len(seq_lens) * 31 + heads)
    b = len(seq_lens)
    blocks = [max(1, -(-n // page)) for n in seq_lens]
    perm = torch.randperm(sum(blocks) + 2, generator=g)
    tables = torch.zeros(b, max(blocks), dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[at:at + n].to(torch.int32)
        at += n
    # The new token of sequence i sits at position seq_len - 1, in its slot; a row without context is padding.
    positions = torch.tensor([max(n - 1, 0) for n in seq_lens], dtype=torch.int32)
    slots = torch.tensor([int(tables[i, (n - 1) // page]) * page + (n - 1) % page if n else -1
                          for i, n in enumerate(seq_lens)], dtype=torch.int32)
    caches = _caches(algo, len(perm), page, kv_heads, head_dim, dtype, device, g)
    qkv = (torch.randn(b, (heads + 2 * kv_heads) * head_dim, generator=g) * 2).to(device, dtype)
    q, k, v = (t.reshape(b, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                kv_heads * head_dim], dim=-1))
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max(seq_lens) + 1).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
    tables, positions, slots = tables.to(device), positions.to(device), slots.to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    ks, vs = SCALES[algo]
    out_scale = torch.tensor([0.05], device=device) if fp8_out else None
    scale = head_dim ** -0.5

    kc1, vc1, p1 = _clone(*caches)
    q_rot = triton_attention.rope_and_write(q, k, v, positions, cos_sin, kc1, vc1, slots, ks, vs, packed=p1)
    want = triton_attention.decode(q_rot, kc1, vc1, tables, lens, scale, ks, vs, window, splits, out_scale, p1)
    kc2, vc2, p2 = _clone(*caches)
    new = triton_attention.NewTokens(k, v, positions, cos_sin, slots)
    got = triton_attention.decode(q, kc2, vc2, tables, lens, scale, ks, vs, window, splits, out_scale, p2, new=new)

    assert torch.equal(_bits(got), _bits(want))
    assert torch.equal(_bits(kc2), _bits(kc1)) and torch.equal(_bits(vc2), _bits(vc1))
    if p1 is not None:
        assert torch.equal(_bits(p2.k_block_scales), _bits(p1.k_block_scales))
        assert torch.equal(_bits(p2.v_block_scales), _bits(p1.v_block_scales))
    written = slots[slots >= 0].long()
    assert not torch.equal(_bits(kc2).flatten(0, 1)[written], _bits(caches[0]).flatten(0, 1)[written]), \
        "the new keys were not written"


# -- interpreter -----------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", FORMATS)
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_fused_rope_decode_interpreted(algo, splits):
    _case(triton_device(False), torch.float32, algo, [1, 37, 0, 70], splits=splits)


@pytest.mark.parametrize("algo", ["model", "NVFP4"])
def test_fused_rope_decode_window_and_fp8_out_interpreted(algo):
    _case(triton_device(False), torch.float32, algo, [5, 40, 90], splits=2, window=24, fp8_out=True)


@pytest.mark.parametrize("algo", ["model", "NVFP4"])
@pytest.mark.parametrize("decode", [True, False])
def test_backend_route_interpreted(monkeypatch, algo, decode):
    """``TritonAttention.rope_write_attend``: one kernel at decode (the RoPE kernel is never called), the RoPE
    kernel then prefill otherwise; either way the reference backend's cache bytes, and its output within
    2e-5 (float32 sums in another order)."""
    from mopt.kernels import attention
    from mopt.layers.attention import AttentionMetadata

    device = triton_device(False)
    g = torch.Generator().manual_seed(5)
    page, heads, kv_heads, head_dim = 16, 4, 2, 64
    contexts, q_lens = [20, 40], ([1, 1] if decode else [3, 5])
    seq_lens = [c + q for c, q in zip(contexts, q_lens)]
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)
    slots = torch.tensor([int(tables[i, p // page]) * page + p % page for i, (c, q) in enumerate(zip(contexts, q_lens))
                          for p in range(c, c + q)], dtype=torch.int32)
    positions = torch.tensor([p for c, q in zip(contexts, q_lens) for p in range(c, c + q)], dtype=torch.int32)
    n = len(slots)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g) * 2
    q, k, v = (t.reshape(n, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                kv_heads * head_dim], dim=-1))
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(64).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    meta = AttentionMetadata(slots.to(device), tables.to(device), lens, starts, max(q_lens))
    caches = _caches(algo, 8, page, kv_heads, head_dim, torch.float32, device, g)
    ks, vs = SCALES[algo]
    args = (positions.to(device), cos_sin.to(device))
    rope_calls = []
    real = triton_attention.rope_and_write
    monkeypatch.setattr(triton_attention, "rope_and_write", lambda *a, **kw: rope_calls.append(1) or real(*a, **kw))
    outs = []
    for backend in (attention.TritonAttention(), attention.ReferenceAttention()):
        kc, vc, packed = _clone(*caches)
        outs.append((backend.rope_write_attend(q.to(device), k.to(device), v.to(device), *args, kc, vc, meta,
                                               head_dim ** -0.5, ks, vs, None, packed=packed), kc, vc, packed))
    (got, kc1, vc1, p1), (want, kc2, vc2, p2) = outs
    assert len(rope_calls) == (0 if decode else 1)
    assert torch.equal(_bits(kc1), _bits(kc2)) and torch.equal(_bits(vc1), _bits(vc2))
    if p1 is not None:
        assert torch.equal(_bits(p1.k_block_scales), _bits(p2.k_block_scales))
    assert ((got - want).norm() / want.norm()).item() < 2e-5


def test_fused_rope_needs_power_of_two_head_dim():
    q = torch.zeros(1, 2, 48)
    cache = torch.zeros(1, 16, 1, 48)
    new = triton_attention.NewTokens(torch.zeros(1, 1, 48), torch.zeros(1, 1, 48), torch.zeros(1, dtype=torch.int32),
                                     torch.zeros(4, 48), torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="head_dim 48"):
        triton_attention.decode(q, cache, cache, torch.zeros(1, 1, dtype=torch.int32),
                                torch.ones(1, dtype=torch.int32), 1.0, 1.0, 1.0, new=new)


# -- GPU -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("algo", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_rope_decode_gpu(algo, dtype):
    """Llama-3-8B's heads per rank of two (16 query, 4 KV) and whole (32, 8, with E4M3 output)."""
    _case(triton_device(True), dtype, algo, [1, 17, 0, 513, 2000, 64], 16, 4, head_dim=128)
    _case(triton_device(True), dtype, algo, [300, 1], 32, 8, head_dim=128, fp8_out=True)
