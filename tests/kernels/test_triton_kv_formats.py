"""Triton paged attention over native KV caches (FP8, INT8, NVFP4, NVFP4_AFFINE) against the reference.

* RoPE + KV-cache write: the code bytes (and NVFP4's E4M3 block-scale bytes) and the rotated queries
  equal the reference's exactly (``kernels.paged_attention.write_kv`` quantizes with the format's
  ``quantize_kv``; the kernel repeats its float32 operations, FMA contraction off), padding slots skipped.
* Read: a one-token context makes attention return that token's value (softmax weight exactly 1), so
  decode over it must equal the reference dequantization bit for bit (float32 through the interpreter;
  on the GPU in BF16 too: the value rounded to BF16 times 1.0 accumulates exactly).
* Decode (split-KV) and prefill (varlen, over cached context): float32 through the interpreter within
  2e-5 relative L2 of the reference, as for the model-dtype cache (tests/kernels/test_triton_attention.py):
  both read the same codes into the same float32 values, only the order of the sums differs. On the GPU in
  BF16 the kernels and the reference are compared with a float32 computation over the same cache, within
  1e-2 and 2x the reference's own BF16 error + 1e-3 (BF16 probabilities meet BF16 values).
"""

from __future__ import annotations

import pytest
import torch

from triton_device import triton_device

from mopt.kernels import paged_attention as ref
from mopt.quant.formats import fp8
from mopt.quant.formats import kv_cache as kv_format

triton_attention = pytest.importorskip("mopt.kernels.triton_attention")
triton_prefill_attention = pytest.importorskip("mopt.kernels.triton_prefill_attention")

FORMATS = ["FP8", "INT8", "NVFP4", "NVFP4_AFFINE"]
AMAX = {"k": 6.0, "v": 3.0}  # keys ~N(0, 2), values ~N(0, 1): a few values saturate, as calibrated scales allow


def _scales(algo: str) -> tuple[float, float]:
    div = 127.0 if algo == "INT8" else 448.0  # ModelOpt's k_scale / v_scale conventions
    return AMAX["k"] / div, AMAX["v"] / div


def _empty_caches(algo, num_blocks, page, kv_heads, head_dim, device, seed=0):
    """Zeroed caches of ``algo`` and their PackedKV (random NVFP4_AFFINE biases)."""
    storage = kv_format.kv_storage(algo, head_dim)
    dtype, width = storage.codes
    lead = (num_blocks, page, kv_heads)
    caches = [torch.zeros(*lead, width, dtype=dtype, device=device) for _ in range(2)]
    packed = None
    if storage.block_scales is not None:
        sdtype, swidth = storage.block_scales
        scales = [torch.zeros(*lead, swidth, dtype=sdtype, device=device) for _ in range(2)]
        biases = [None, None]
        if storage.bias:
            g = torch.Generator().manual_seed(seed + 7)
            biases = [(torch.randn(kv_heads, head_dim, generator=g) * 0.3).to(device) for _ in range(2)]
        packed = ref.PackedKV(*scales, *biases)
    return caches[0], caches[1], packed


def _cache(algo, seq_lens, page, kv_heads, head_dim, device, seed):
    """Caches of ``algo`` holding random keys/values for ``seq_lens`` in shuffled blocks (written by the
    reference), and the block tables."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // page) for n in seq_lens]
    total = sum(blocks) + 3
    perm = torch.randperm(total, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(1, max(blocks)), dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    k_cache, v_cache, packed = _empty_caches(algo, total, page, kv_heads, head_dim, device, seed)
    k = torch.randn(total * page, kv_heads, head_dim, generator=g) * 2
    v = torch.randn(total * page, kv_heads, head_dim, generator=g)
    ks, vs = _scales(algo)
    slots = torch.arange(total * page, device=device)
    ref.write_kv(k.to(device), v.to(device), k_cache, v_cache, slots, ks, vs, packed)
    return k_cache, v_cache, packed, tables.to(device), ks, vs


def _rel(got, want):
    return ((got.float().cpu() - want.float().cpu()).norm() / want.float().cpu().norm().clamp_min(1e-12)).item()


def _check(got, want, dtype, lowp=None):
    assert not torch.isnan(got.float()).any()
    err = _rel(got, want)
    if dtype == torch.float32:
        assert err < 2e-5, err
    else:
        ref_err = _rel(lowp, want)
        assert err < 1e-2 and err < 2 * ref_err + 1e-3, (err, ref_err)


def _decode_case(device, dtype, algo, page, heads, kv_heads, seq_lens, head_dim=64, seed=0, splits=None):
    k_cache, v_cache, packed, tables, ks, vs = _cache(algo, seq_lens, page, kv_heads, head_dim, device, seed)
    b = len(seq_lens)
    q = torch.randn(b, heads, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    got = triton_attention.decode(q, k_cache, v_cache, tables, lens, scale, ks, vs, num_splits=splits, packed=packed)
    want = ref.paged_attention(q.float(), k_cache, v_cache, tables, lens, qsl, 1, scale, ks, vs, packed=packed)
    lowp = None if dtype == torch.float32 else ref.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 1, scale,
                                                                    ks, vs, packed=packed)
    _check(got, want, dtype, lowp)
    for i, n in enumerate(seq_lens):
        if n == 0:
            assert torch.count_nonzero(got[i]) == 0


def _prefill_case(device, dtype, algo, page, heads, kv_heads, q_lens, contexts, head_dim=64, seed=0):
    seq_lens = [q + c for q, c in zip(q_lens, contexts)]
    k_cache, v_cache, packed, tables, ks, vs = _cache(algo, seq_lens, page, kv_heads, head_dim, device, seed)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    args = (tables, lens, qsl, max(q_lens), scale, ks, vs)
    got = triton_prefill_attention.prefill(q, k_cache, v_cache, *args, packed=packed)
    want = ref.paged_attention(q.float(), k_cache, v_cache, *args, packed=packed)
    lowp = None if dtype == torch.float32 else ref.paged_attention(q, k_cache, v_cache, *args, packed=packed)
    _check(got, want, dtype, lowp)


def _read_exact_case(device, dtype, algo, kv_heads=2, head_dim=64):
    """Decode over one cached token per sequence returns its dequantized value exactly."""
    seq_lens = [1] * 5
    k_cache, v_cache, packed, tables, ks, vs = _cache(algo, seq_lens, 4, kv_heads, head_dim, device, 11)
    q = torch.randn(5, 2 * kv_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    got = triton_attention.decode(q, k_cache, v_cache, tables, lens, 0.125, ks, vs, num_splits=1, packed=packed)
    slots = (tables[:, 0].long() * 4)
    bias = packed.v_bias if packed is not None else None
    codes = kv_format.KVCodes(v_cache.flatten(0, 1)[slots],
                              None if packed is None else packed.v_block_scales.flatten(0, 1)[slots])
    value = kv_format.dequantize_kv(codes, algo, vs, bias, dtype).repeat_interleave(2, dim=1)  # [5, H, D]
    if algo == "NVFP4_AFFINE" and device == "cuda":
        # The GPU compiles ``value * scale + bias`` to one FMA (one rounding, <= 2**-24 |sum|) where the
        # reference rounds the product (<= 2**-24 |product|) and then the sum (<= 2**-24 |sum|): float32
        # results at most 2**-23 (|product| + |sum|) apart (seen on an H200: one ulp of the sum), plus for
        # BF16 one rounding of the sum moved by one BF16 ulp.
        product = kv_format.dequantize_kv(codes, "NVFP4", vs, None, torch.float32).repeat_interleave(2, dim=1)
        tol = 2 ** -23 * (product.abs() + value.float().abs())
        if dtype == torch.bfloat16:
            tol = tol + 2 ** -8 * value.float().abs()
        assert ((got.float() - value.float()).abs() <= tol).all()
    else:
        assert torch.equal(got, value)


def _rope_case(device, dtype, algo, n=6, heads=4, kv_heads=2, head_dim=64, grid=None):
    """``grid``: inputs rounded to multiples of it, so that many values and block amaxes sit exactly on
    rounding ties of the formats (as small dummy or real weights produce)."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g) * 2
    if grid is not None:
        qkv = (qkv / grid).round() * grid
    qkv = qkv.to(device, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(n, -1, head_dim) for t in (q, k, v))  # strided views, as the QKV GEMM leaves them
    positions = torch.tensor([0, 5, 17, 300, 1023, 2][:n], dtype=torch.int32, device=device)
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(1024).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
    slots = torch.tensor([3, 17, -1, 64, 127, 40][:n], dtype=torch.int32, device=device)
    ks, vs = _scales(algo)
    results = []
    for fn in (triton_attention.rope_and_write, ref.rope_and_write):
        kc, vc, packed = _empty_caches(algo, 8, 16, kv_heads, head_dim, device)
        results.append((fn(q, k, v, positions, cos_sin, kc, vc, slots, ks, vs, packed=packed), kc, vc, packed))
    (q1, k1, v1, p1), (q2, k2, v2, p2) = results
    bits = lambda t: t.view(torch.uint8) if t.dtype == fp8.FP8_DTYPE else t  # noqa: E731
    assert torch.equal(q1, q2)
    assert torch.equal(bits(k1), bits(k2)) and torch.equal(bits(v1), bits(v2))
    if p1 is not None:
        for a, b in ((p1.k_block_scales, p2.k_block_scales), (p1.v_block_scales, p2.v_block_scales)):
            assert torch.equal(bits(a), bits(b))
    assert torch.count_nonzero(bits(k1).flatten(0, 1)[slots.long()[slots >= 0]]) > 0


# -- interpreter -----------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", FORMATS)
@pytest.mark.parametrize("grid", [None, 2 ** -3])
def test_rope_and_write_exact_interpreted(algo, grid):
    _rope_case(triton_device(False), torch.float32, algo, grid=grid)


@pytest.mark.parametrize("algo", FORMATS)
def test_read_exact_interpreted(algo):
    _read_exact_case(triton_device(False), torch.float32, algo)


@pytest.mark.parametrize("algo", FORMATS)
@pytest.mark.parametrize("page,heads,kv_heads,splits", [(4, 4, 1, None), (16, 2, 2, 2)])
def test_decode_interpreted(algo, page, heads, kv_heads, splits):
    _decode_case(triton_device(False), torch.float32, algo, page, heads, kv_heads, [1, 37, 0, 70], splits=splits)


@pytest.mark.parametrize("algo", FORMATS)
def test_prefill_interpreted(algo):
    # A fresh prompt, a chunk after 20 cached tokens, a one-token chunk.
    _prefill_case(triton_device(False), torch.float32, algo, 16, 4, 2, [7, 12, 1], [0, 20, 9], head_dim=32)


def test_nvfp4_cache_needs_its_block_scales():
    k_cache, v_cache, _ = _empty_caches("NVFP4", 2, 4, 1, 32, "cpu")
    with pytest.raises(ValueError, match="block scales"):
        triton_attention.decode(torch.zeros(1, 1, 32), k_cache, v_cache, torch.zeros(1, 1, dtype=torch.int32),
                                torch.ones(1, dtype=torch.int32), 0.1, 1.0, 1.0)


# -- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("algo", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grid", [None, 2 ** -3])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (4, 2, 64)])
def test_rope_and_write_exact_gpu(algo, dtype, grid, heads, kv_heads, head_dim):
    _rope_case(triton_device(True), dtype, algo, heads=heads, kv_heads=kv_heads, head_dim=head_dim, grid=grid)


@pytest.mark.gpu
@pytest.mark.parametrize("algo", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_read_exact_gpu(algo, dtype):
    _read_exact_case(triton_device(True), dtype, algo, kv_heads=8, head_dim=128)


@pytest.mark.gpu
@pytest.mark.parametrize("algo", FORMATS)
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 4)])
@pytest.mark.parametrize("seq_lens", [[1], [4096], [1, 17, 0, 513, 4096, 100, 2000, 64]])
def test_decode_gpu(algo, page, heads, kv_heads, seq_lens):
    _decode_case(triton_device(True), torch.bfloat16, algo, page, heads, kv_heads, seq_lens, head_dim=128)


@pytest.mark.gpu
@pytest.mark.parametrize("algo", FORMATS)
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (32, 8)])
def test_prefill_gpu(algo, heads, kv_heads):
    _prefill_case(triton_device(True), torch.bfloat16, algo, 16, heads, kv_heads, [1024, 1, 300, 77],
                  [0, 4095, 200, 1000], head_dim=128)
