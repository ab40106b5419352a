"""FP8 E4M3 reference numerics: round trips, saturation, scales, blocks with partial edges."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mopt.quant.formats import fp8

# All 254 finite e4m3fn bit patterns except NaN (0x7f, 0xff).
FINITE_CODES = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
FINITE_VALUES = FINITE_CODES.view(torch.float8_e4m3fn).float()

dims = st.integers(min_value=1, max_value=300)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def rand(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    # Heavy-tailed rows so that scales differ a lot between rows and blocks.
    return x * torch.exp(torch.randn(shape[:-1] + (1,), generator=g) * 2)


def test_every_finite_value_round_trips_exactly():
    q = fp8.quantize(FINITE_VALUES, 1.0)
    assert torch.equal(q.view(torch.uint8), FINITE_CODES)
    assert torch.equal(fp8.dequantize(q, 1.0), FINITE_VALUES)


@pytest.mark.parametrize("value,expected", [(448.0, 448.0), (1e6, 448.0), (-1e6, -448.0),
                                            (float("inf"), 448.0), (464.0, 448.0), (0.0, 0.0)])
def test_saturates_instead_of_nan(value, expected):
    assert fp8.quantize(torch.tensor([value]), 1.0).float().item() == expected


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=-400, max_value=400, allow_nan=False))
def test_quantize_rounds_to_nearest_representable(v):
    v = torch.tensor([v]).item()  # the float32 value the quantizer sees
    q = fp8.quantize(torch.tensor([v]), 1.0).float().item()
    best = (FINITE_VALUES - v).abs().min().item()
    assert abs(q - v) == pytest.approx(best, abs=0.0)


@settings(max_examples=30, deadline=None)
@given(dims, dims, seeds)
def test_per_channel_and_per_token_relative_error_bound(n, k, seed):
    # E4M3 has 3 mantissa bits: relative rounding error <= 2**-4 for normal values; values
    # below the smallest normal (2**-6 * scale) are bounded by half the subnormal step.
    w = rand((n, k), seed)
    for q, s in [fp8.quantize_per_channel(w), fp8.quantize_per_token(w)]:
        s = s.reshape(n, -1)
        err = (fp8.dequantize(q, s) - w).abs()
        bound = torch.maximum(w.abs() * 2**-4, s * 2**-10) * (1 + 1e-6)
        assert bool((err <= bound).all())
        assert bool(((q.float().abs().amax(dim=1) == 448) | (w.abs().amax(dim=1) == 0)).all())


def test_zero_rows_get_scale_one_and_no_nan():
    w = torch.zeros(3, 5)
    w[1] = torch.arange(5.0)
    q, s = fp8.quantize_per_token(w)
    assert s.flatten().tolist() == [1.0, torch.tensor(4.0 / 448).item(), 1.0]  # fp32 4/448
    assert not torch.isnan(q.float()).any()
    assert torch.equal(fp8.dequantize(q, s)[0], torch.zeros(5))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), seeds)
def test_blocks_with_partial_edges(n, k, seed):
    w = rand((n, k), seed)
    q, s = fp8.quantize_blocks(w)
    assert s.shape == (math.ceil(n / 128), math.ceil(k / 128))
    # Independent check of each block's scale, including partial edge blocks.
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            block = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            amax = block.abs().max()
            assert s[bi, bj].item() == pytest.approx((amax / 448).item() if amax > 0 else 1.0, rel=0)
    err = (fp8.dequantize_blocks(q, s) - w).abs()
    bound = torch.maximum(w.abs() * 2**-4, fp8.expand_block_scale(s, w.shape) * 2**-10) * (1 + 1e-6)
    assert bool((err <= bound).all())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(1, 700), seeds)
def test_groups_with_partial_last_group(m, k, seed):
    x = rand((m, k), seed)
    q, s = fp8.quantize_groups(x)
    assert s.shape == (m, math.ceil(k / 128))
    for g in range(s.shape[1]):
        amax = x[:, g * 128:(g + 1) * 128].abs().amax(dim=1)
        assert torch.equal(s[:, g], torch.where(amax > 0, amax / 448, torch.ones_like(amax)))
    assert torch.equal(q, fp8.quantize(x, fp8.expand_group_scale(s, k)))


def test_requantize_with_max_scale():
    torch.manual_seed(0)
    shards = [torch.randn(8, 16) * s for s in (1.0, 3.0, 0.5)]
    qs, scales = zip(*(fp8.quantize_per_tensor(w) for w in shards))
    weight = torch.cat(qs)
    scale = torch.stack(scales)
    max_scale, new = fp8.requantize_with_max_scale(weight, scale, [8, 8, 8])
    assert max_scale == scale.max()
    # The shard that owns the max scale is untouched; the others equal an explicit requantization.
    assert torch.equal(new[8:16].view(torch.uint8), qs[1].view(torch.uint8))
    for i in (0, 2):
        expect = ((qs[i].float() * scale[i]) / max_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(new[8 * i:8 * i + 8].view(torch.uint8), expect.view(torch.uint8))
    with pytest.raises(ValueError, match="shard widths"):
        fp8.requantize_with_max_scale(weight, scale, [8, 8, 9])
