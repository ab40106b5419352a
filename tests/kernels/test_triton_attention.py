"""Triton paged attention against the torch reference (``mopt.kernels.paged_attention``).

* RoPE + KV-cache write: the cache bytes and the rotated queries equal the reference's exactly
  (same float32 operations, FMA contraction off), FP8 and model-dtype caches, padding slots skipped.
* Decode (split-KV) and prefill (varlen, over cached context): float32 through the interpreter agree
  with the reference to 2e-5 relative (float32 throughout; the kernels sum in another order). On
  the GPU in BF16 both the kernels and the reference are compared with a float32 computation over
  the same cache: BF16 probabilities meet BF16 values, so each may be off by ~2^-8 relative per
  product; the kernels must stay within 1e-2 relative L2 and within 2x the reference's own error + 1e-3.

Cases: block sizes 16 and 32 (4 on the CPU too), GQA ratios 1, 4 and 8, context lengths from 1 up
(4096 on the GPU), FP8 and unquantized caches, batches of mixed lengths, padding rows
(``seq_len == 0``), sliding windows, chunked prefill (new tokens after cached context).
"""

from __future__ import annotations


import pytest
import torch

from triton_device import INTERPRETED, triton_device

from mopt.kernels import paged_attention as ref
from mopt.quant.formats import fp8

triton_attention = pytest.importorskip("mopt.kernels.triton_attention")
triton_prefill_attention = pytest.importorskip("mopt.kernels.triton_prefill_attention")





def _cache(seq_lens, page, kv_heads, head_dim, dtype, cache_dtype, device, seed):
    """Caches holding random keys/values for sequences of ``seq_lens`` in shuffled blocks, plus
    the block tables."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // page) for n in seq_lens]
    total = sum(blocks) + 3
    perm = torch.randperm(total, generator=g).tolist()
    width = max(1, max(blocks))
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    shape = (total, page, kv_heads, head_dim)
    k = torch.randn(shape, generator=g) * 2
    v = torch.randn(shape, generator=g)
    if cache_dtype == fp8.FP8_DTYPE:
        k_cache, v_cache, ks, vs = fp8.quantize(k, 0.02), fp8.quantize(v, 0.01), 0.02, 0.01
    else:
        k_cache, v_cache, ks, vs = k.to(dtype), v.to(dtype), 1.0, 1.0
    return k_cache.to(device), v_cache.to(device), tables.to(device), ks, vs


def _check(got, want, exact_dtype, ref_lowp=None):
    got, want = got.float().cpu(), want.float().cpu()
    assert not torch.isnan(got).any()
    err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    if exact_dtype == torch.float32:
        assert err < 2e-5, err
    else:
        ref_err = ((ref_lowp.float().cpu() - want).norm() / want.norm().clamp_min(1e-12)).item()
        assert err < 1e-2 and err < 2 * ref_err + 1e-3, (err, ref_err)


def _decode_case(device, dtype, cache_dtype, page, heads, kv_heads, seq_lens, window=None, head_dim=64, seed=0):
    k_cache, v_cache, tables, ks, vs = _cache(seq_lens, page, kv_heads, head_dim, dtype, cache_dtype, device, seed)
    b = len(seq_lens)
    q = torch.randn(b, heads, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    got = triton_attention.decode(q, k_cache, v_cache, tables, lens, scale, ks, vs, window or 0)
    want = ref.paged_attention(q.float(), k_cache if cache_dtype == fp8.FP8_DTYPE else k_cache.float(),
                               v_cache if cache_dtype == fp8.FP8_DTYPE else v_cache.float(), tables, lens, qsl, 1,
                               scale, ks, vs, sliding_window=window)
    lowp = None if dtype == torch.float32 else ref.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 1, scale,
                                                                    ks, vs, sliding_window=window)
    _check(got, want, dtype, lowp)
    for i, n in enumerate(seq_lens):
        if n == 0:
            assert torch.count_nonzero(got[i]) == 0


def _prefill_case(device, dtype, cache_dtype, page, heads, kv_heads, q_lens, contexts, window=None, head_dim=64,
                  seed=0):
    seq_lens = [q + c for q, c in zip(q_lens, contexts)]
    k_cache, v_cache, tables, ks, vs = _cache(seq_lens, page, kv_heads, head_dim, dtype, cache_dtype, device, seed)
    n = sum(q_lens)
    q = torch.randn(n, heads, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    got = triton_prefill_attention.prefill(q, k_cache, v_cache, tables, lens, qsl, max(q_lens), scale, ks, vs, window or 0)
    fp8_cache = cache_dtype == fp8.FP8_DTYPE
    want = ref.paged_attention(q.float(), k_cache if fp8_cache else k_cache.float(),
                               v_cache if fp8_cache else v_cache.float(), tables, lens, qsl, max(q_lens), scale, ks,
                               vs, sliding_window=window)
    lowp = None if dtype == torch.float32 else ref.paged_attention(q, k_cache, v_cache, tables, lens, qsl,
                                                                    max(q_lens), scale, ks, vs, sliding_window=window)
    _check(got, want, dtype, lowp)


CACHES = {"fp8": fp8.FP8_DTYPE, "model": None}


@pytest.mark.parametrize("page", [4, 16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("cache", ["fp8", "model"])
def test_decode_interpreted(page, heads, kv_heads, cache):
    device = triton_device(False)
    _decode_case(device, torch.float32, CACHES[cache] or torch.float32, page, heads, kv_heads, [1, 37, 0, 70])


@pytest.mark.parametrize("cache", ["fp8", "model"])
def test_decode_tile_widths_interpreted(cache):
    """Two slices per sequence of 20, 150 and 600 tokens (page 16: tiles of 32 and 64 tokens): 20 fits
    one narrow slice; 150 takes a slice of two middle tiles and a narrow remainder of 22; 600 two slices
    of middle tiles (320 and 280)."""
    device = triton_device(False)
    assert triton_attention.decode_splits(3, 2, torch.device(device)) == 2
    assert triton_attention.decode_tiles(16) == (32, 64)
    _decode_case(device, torch.float32, CACHES[cache] or torch.float32, 16, 4, 2, [20, 150, 600], head_dim=32)


@pytest.mark.parametrize("page,tiles", [(1, (16, 16)), (4, (16, 16)), (8, (16, 32)), (16, (32, 64)), (32, (32, 64))])
def test_decode_tiles(page, tiles):
    assert triton_attention.decode_tiles(page) == tiles


@pytest.mark.parametrize("splits", [1, 2, 8])
def test_decode_splits_and_window_interpreted(splits):
    device = triton_device(False)
    seq_lens = [5, 33, 90]
    k_cache, v_cache, tables, ks, vs = _cache(seq_lens, 16, 2, 32, torch.float32, torch.float32, device, 3)
    q = torch.randn(3, 4, 32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    qsl = torch.arange(4, dtype=torch.int32)
    for window in (0, 20):
        got = triton_attention.decode(q, k_cache, v_cache, tables, lens, 0.2, ks, vs, window, num_splits=splits)
        want = ref.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 1, 0.2, ks, vs, sliding_window=window or None)
        _check(got, want, torch.float32)


def _codes_match(got, want, exact):
    g, w = got.float().cpu(), want.float().cpu()
    if exact:
        assert torch.equal(got.view(torch.uint8).cpu(), want.view(torch.uint8).cpu())
    else:  # kernels compiled apart may sum in another order: a code one E4M3 step off, rarely
        assert ((g - w).abs() <= w.abs() * 2**-3 + 2**-9).all() and (g != w).float().mean() < 0.01


def _fp8_output_case(device, dtype, splits):
    seq_lens = [5, 33, 0, 90]
    k_cache, v_cache, tables, ks, vs = _cache(seq_lens, 16, 2, 64, dtype, fp8.FP8_DTYPE, device, 5)
    q = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = torch.tensor(0.004, device=device)
    plain = triton_attention.decode(q, k_cache, v_cache, tables, lens, 0.125, ks, vs, num_splits=splits)
    codes = triton_attention.decode(q, k_cache, v_cache, tables, lens, 0.125, ks, vs, num_splits=splits,
                                    out_scale=scale)
    assert codes.dtype == fp8.FP8_DTYPE
    _codes_match(codes, fp8.quantize(plain, scale), exact=INTERPRETED)
    qsl = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32, device=device)
    plain = triton_prefill_attention.prefill(q, k_cache, v_cache, tables, lens, qsl, 1, 0.125, ks, vs)
    codes = triton_prefill_attention.prefill(q, k_cache, v_cache, tables, lens, qsl, 1, 0.125, ks, vs, out_scale=scale)
    _codes_match(codes, fp8.quantize(plain, scale), exact=INTERPRETED)


@pytest.mark.parametrize("splits", [1, 4])
def test_fp8_output_interpreted(splits):
    """E4M3 output for an FP8 o_proj: the codes of the kernel's own output."""
    _fp8_output_case(triton_device(False), torch.float32, splits)


@pytest.mark.parametrize("page", [4, 16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 1)])
@pytest.mark.parametrize("cache", ["fp8", "model"])
def test_prefill_interpreted(page, heads, kv_heads, cache):
    device = triton_device(False)
    # A fresh prompt, a chunk after 20 cached tokens, a one-token chunk, a prompt longer than BLOCK_M.
    _prefill_case(device, torch.float32, CACHES[cache] or torch.float32, page, heads, kv_heads, [7, 12, 1, 40],
                  [0, 20, 9, 0])


def test_prefill_window_interpreted():
    device = triton_device(False)
    _prefill_case(device, torch.float32, torch.float32, 16, 4, 2, [30, 12], [0, 25], window=8, head_dim=32)


def _rope_case(device, dtype, cache_dtype, n=6, heads=4, kv_heads=2, head_dim=64, strided=True):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g).to(device, dtype) * 3
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(n, -1, head_dim) for t in (q, k, v))
    if not strided:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    positions = torch.tensor([0, 5, 17, 300, 1023, 2][:n], dtype=torch.int32, device=device)
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(1024).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
    shape = (8, 16, kv_heads, head_dim)
    slots = torch.tensor([3, 17, -1, 64, 127, 40][:n], dtype=torch.int32, device=device)
    caches = []
    for fn in (triton_attention.rope_and_write, ref.rope_and_write):
        kc = torch.zeros(shape, dtype=cache_dtype, device=device)
        vc = torch.zeros(shape, dtype=cache_dtype, device=device)
        caches.append((fn(q, k, v, positions, cos_sin, kc, vc, slots, 0.03, 0.02), kc, vc))
    (q1, k1, v1), (q2, k2, v2) = caches
    bits = lambda t: t.view(torch.uint8) if t.dtype == fp8.FP8_DTYPE else t
    assert torch.equal(q1, q2)
    assert torch.equal(bits(k1), bits(k2)) and torch.equal(bits(v1), bits(v2))
    assert torch.count_nonzero(bits(k1).flatten(0, 1)[slots.long()[slots >= 0]]) > 0


@pytest.mark.parametrize("cache", ["fp8", "model"])
@pytest.mark.parametrize("strided", [True, False])
def test_rope_and_write_exact_interpreted(cache, strided):
    device = triton_device(False)
    _rope_case(device, torch.float32, CACHES[cache] or torch.float32, strided=strided)


# -- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["fp8", "model"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_and_write_exact_gpu(cache, dtype):
    device = triton_device(True)
    _rope_case(device, dtype, CACHES[cache] or dtype, n=6, heads=32, kv_heads=8, head_dim=128)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (32, 8), (32, 4)])
@pytest.mark.parametrize("cache", ["fp8", "model"])
@pytest.mark.parametrize("seq_lens", [[1], [4096], [1, 17, 0, 513, 4096, 100, 2000, 64]])
def test_decode_gpu(page, heads, kv_heads, cache, seq_lens):
    device = triton_device(True)
    _decode_case(device, torch.bfloat16, CACHES[cache] or torch.bfloat16, page, heads, kv_heads, seq_lens,
                 head_dim=128)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (32, 8), (32, 4)])
@pytest.mark.parametrize("cache", ["fp8", "model"])
def test_prefill_gpu(page, heads, kv_heads, cache):
    device = triton_device(True)
    _prefill_case(device, torch.bfloat16, CACHES[cache] or torch.bfloat16, page, heads, kv_heads,
                  [1024, 1, 300, 77, 2048], [0, 4095, 200, 1000, 0], head_dim=128)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 32])
def test_fp8_output_gpu(splits):
    _fp8_output_case(triton_device(True), torch.bfloat16, splits)


@pytest.mark.gpu
def test_window_gpu():
    device = triton_device(True)
    _decode_case(device, torch.bfloat16, torch.bfloat16, 16, 32, 8, [1, 300, 4096], window=256, head_dim=128)
    _prefill_case(device, torch.bfloat16, torch.bfloat16, 16, 32, 8, [700, 5], [0, 600], window=256, head_dim=128)
