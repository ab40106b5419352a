"""Reference numerics of INT4 groups, INT8, MXFP8/MXFP4 and the KV-cache formats: packing and scale
round trips (hypothesis), known vectors, and the facts checked against ModelOpt's own code."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mopt.quant.formats import fp8, int4, int8, kv_cache, mx, nvfp4

small_ints = st.integers(min_value=1, max_value=6)


def _tensor(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# -- INT4 ----------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=small_ints, cols=small_ints, seed=st.integers(0, 2**16))
def test_int4_packings_round_trip_bit_exactly(rows, cols, seed):
    q = torch.randint(-8, 8, (2 * rows, 2 * cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    assert torch.equal(int4.unpack_rows(int4.pack_rows(q)), q)
    assert torch.equal(int4.unpack_k(int4.pack_k(q)), q)
    assert torch.equal(int4.rows_to_k(int4.pack_rows(q)), int4.pack_k(q))
    packed = int4.pack_rows(q)
    assert packed.shape == (rows, 2 * cols) and packed.dtype == torch.uint8


def test_int4_checkpoint_layout_is_modelopts():
    """``pack_int4_in_uint8`` (ModelOpt 0.47): rows 2r / 2r+1 in the low / high nibble of byte (r, k)."""
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    w = _tensor(0, 8, 256)
    q, scale = int4.quantize(w, 128)
    assert torch.equal(pack_int4_in_uint8(w, scale, 128), int4.pack_rows(q))
    assert q.min() >= -8 and q.max() <= 7 and scale.shape == (8, 2)
    assert int4.unpack_rows(torch.tensor([[0x9F]], dtype=torch.uint8)).flatten().tolist() == [-1, -7]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_int4_quantize_dequantize_is_idempotent(seed, scale):
    w = _tensor(seed, 4, 64, scale=scale)
    q, s = int4.quantize(w, 32)
    assert torch.equal(int4.quantize(int4.dequantize(q, s), 32)[0], q)
    assert (w - int4.dequantize(q, s)).abs().le(s.repeat_interleave(32, dim=1) / 2 * (1 + 1e-6)).all()


def test_w4a8_weight_is_int4_values_requantized_to_fp8():
    q, s = int4.quantize(_tensor(1, 16, 128), 128)
    scale2 = int4.dequantize(q, s).abs().max() / 448
    codes = int4.w4a8_fp8_weight(q, s, scale2)
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(codes, (int4.dequantize(q, s) / scale2).to(torch.float8_e4m3fn))


# -- INT8 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,code", [(0.5, 0), (1.5, 2), (-2.5, -2), (126.6, 127), (300.0, 127), (-300.0, -128)])
def test_int8_rounds_half_to_even_and_saturates(value, code):
    assert int8.quantize_static(torch.tensor([value]), 1.0).item() == code


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_int8_per_channel_round_trip(seed):
    w = _tensor(seed, 8, 32)
    q, s = int8.quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(int8.quantize_per_channel(int8.dequantize(q, s[:, None]))[0], q)


# -- MX --------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False), st.sampled_from([6.0, 448.0]))
def test_e8m0_exponent_is_the_exact_ceiling(amax, max_value):
    """``ceil(log2(amax / max_value))`` computed exactly on the float32 ratio (rationals, no float log2)."""
    ratio = Fraction(float(torch.tensor(amax, dtype=torch.float32) / max_value))
    e = mx.e8m0_exponent(torch.tensor([amax]), max_value).item() - 127
    assert Fraction(2) ** (e - 1) < ratio <= Fraction(2) ** e or e in (-127, 127)


def test_e8m0_zero_block_and_scale_values():
    assert mx.e8m0_exponent(torch.tensor([0.0]), 6.0).item() == 0
    assert mx.scale_values(torch.tensor([0, 127, 130], dtype=torch.uint8)).tolist() == [2.0**-127, 1.0, 8.0]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-4, 1e4))
def test_mx_quantize_round_trips(seed, scale):
    x = _tensor(seed, 3, 64, scale=scale)
    for quantize, dequantize in ((mx.quantize_mxfp8, mx.dequantize_mxfp8), (mx.quantize_mxfp4, mx.dequantize_mxfp4)):
        q, s = quantize(x)
        values = dequantize(q, s)
        q2, s2 = quantize(values)
        # A block whose rounded maximum fits a smaller power of two takes it: same values, finer scale.
        assert torch.equal(dequantize(q2, s2), values) and bool((s2 <= s).all())


def test_mxfp4_ties_go_to_even_and_codes_match_nvfp4():
    block = torch.tensor([[6.0, 0.75, 1.25, 2.5, 3.5, 5.0, -0.25] + [0.0] * 25])
    packed, scale = mx.quantize_mxfp4(block)
    assert scale.item() == 127  # amax 6 -> 2**0
    assert mx.dequantize_mxfp4(packed, scale)[0, :7].tolist() == [6.0, 1.0, 1.0, 2.0, 4.0, 4.0, -0.0]
    assert torch.equal(nvfp4.unpack(packed), nvfp4.e2m1_encode(block))


def test_mx_exports_decode_like_modelopts_qtensors():
    """MXFP8QTensor / MXFP4QTensor (ModelOpt 0.47) dequantize their own outputs as mopt does."""
    from modelopt.torch.quantization.qtensor.mxfp4_tensor import MXFP4QTensor
    from modelopt.torch.quantization.qtensor.mxfp8_tensor import MXFP8QTensor

    w = _tensor(3, 16, 96, scale=0.05)
    q8, s8 = MXFP8QTensor.quantize(w)
    assert torch.equal(mx.dequantize_mxfp8(q8._quantized_data, s8), q8.dequantize(dtype=torch.float32, scale=s8))
    q4, s4 = MXFP4QTensor.quantize(w, 32)
    s4 = s4.reshape(16, 3)
    reference = q4.dequantize(dtype=torch.float32, scale=s4, block_sizes={-1: 32})
    assert torch.equal(mx.dequantize_mxfp4(q4._quantized_data, s4), reference)


# -- NVFP4 with 32-element blocks (W4A8_NVFP4_FP8) ------------------------------------------------

def test_nvfp4_block32_matches_modelopts_qtensor():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    w = _tensor(4, 8, 128)
    scale2 = w.abs().max() / 448  # W4A8_NVFP4_FP8's weight_scale_2
    qt, block_scale, _ = NVFP4QTensor.quantize(w, 32, weights_scaling_factor_2=scale2)
    packed, ours_scale = nvfp4.quantize(w, scale2, block_size=32)
    assert torch.equal(ours_scale.view(torch.uint8), block_scale.view(torch.uint8))
    assert torch.equal(packed, qt._quantized_data)
    assert torch.equal(nvfp4.dequantize(packed, ours_scale, scale2, block_size=32),
                       qt.dequantize(dtype=torch.float32, scale=block_scale, double_scale=scale2, block_sizes={-1: 32}))


# -- KV-cache formats ------------------------------------------------------------------------------

@pytest.mark.parametrize("algo,bytes_per_element", [("FP8", 1.0), ("INT8", 1.0), ("NVFP4", 0.5625),
                                                    ("NVFP4_AFFINE", 0.5625)])
def test_kv_storage_describes_the_cache(algo, bytes_per_element):
    storage = kv_cache.kv_storage(algo, 64)
    assert storage.bytes_per_element(64) == bytes_per_element and storage.bias == (algo == "NVFP4_AFFINE")
    with pytest.raises(ValueError, match="unknown KV-cache format"):
        kv_cache.kv_storage("FP4", 64)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), algo=st.sampled_from(["FP8", "INT8", "NVFP4", "NVFP4_AFFINE"]))
def test_kv_round_trip_is_idempotent_and_bounded(seed, algo):
    k = _tensor(seed, 2, 5, 2, 64)
    amax = k.abs().max()
    scale = amax / (127 if algo == "INT8" else 448)
    bias = _tensor(seed + 1, 2, 64, scale=0.1) if algo == "NVFP4_AFFINE" else None
    once = kv_cache.fake_quantize_kv(k, algo, scale, bias)
    assert torch.equal(kv_cache.fake_quantize_kv(once, algo, scale, bias), once)
    # One rounding: INT8 moves each value by at most half a step, 1/254 of amax (as a relative L2 error
    # that depends on amax / rms: seed 449 gave 1.1e-2); relative L2 errors of 2**-4 (E4M3) and NVFP4's half
    # step (1/6 of a block's amax, plus its E4M3 block scale's rounding).
    if algo == "INT8":
        assert (once - k).abs().max().item() <= amax.item() / 254 * (1 + 1e-6)
    else:
        bound = {"FP8": 0.07, "NVFP4": 0.3, "NVFP4_AFFINE": 0.3}[algo]
        assert ((once - k).norm() / k.norm()).item() < bound


def test_nvfp4_kv_uses_modelopts_global_scale():
    """The exported k_scale is amax / 448; the cache's NVFP4 global scale is amax / (6 * 448)."""
    k = _tensor(5, 3, 2, 64)
    k_scale = k.abs().max() / 448
    stored = kv_cache.quantize_kv(k, "NVFP4", k_scale)
    packed, block_scales = nvfp4.quantize(k, nvfp4.global_scale_from_amax(k.abs().max()))
    assert torch.equal(stored.codes, packed) and torch.equal(stored.block_scales.view(torch.uint8),
                                                             block_scales.view(torch.uint8))
    assert stored.codes.shape == (3, 2, 32) and stored.block_scales.shape == (3, 2, 4)
    assert math.isclose(float(kv_cache.nvfp4_global_scale(k_scale)), float(k.abs().max() / (6 * 448)), rel_tol=1e-6)
