"""NVFP4 reference numerics: the E2M1 grid, ties, packing, block scales and swizzling."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mopt.quant.formats import nvfp4

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

# (input, expected code): the grid itself, every tie (to the even code), saturation, signs.
KNOWN = [(v, i) for i, v in enumerate(GRID)] + [(-v, 8 + i) for i, v in enumerate(GRID) if v] + [
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),
    (-0.25, 8), (-0.75, 10), (-5.0, 14),
    (0.2500001, 1), (0.7499999, 1), (1.2500001, 3), (5.0000005, 7),
    (7.0, 7), (1e9, 7), (-1e9, 15), (-0.1, 8), (-0.0, 0),
]


@pytest.mark.parametrize("value,code", KNOWN)
def test_known_vectors(value, code):
    assert nvfp4.e2m1_encode(torch.tensor([value])).item() == code


def test_decode_is_the_grid():
    codes = torch.arange(16, dtype=torch.uint8)
    assert nvfp4.e2m1_decode(codes).tolist() == GRID + [-v for v in GRID]


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=-8, max_value=8, allow_nan=False))
def test_encode_is_nearest_with_ties_to_even(v):
    code = nvfp4.e2m1_encode(torch.tensor([v])).item()
    value = abs(nvfp4.e2m1_decode(torch.tensor([code], dtype=torch.uint8)).item())
    dists = [abs(abs(v) - g) for g in GRID]
    best = min(dists)
    assert abs(abs(v) - value) == best
    candidates = [i for i, d in enumerate(dists) if d == best]
    assert (code & 7) == (min(candidates, key=lambda i: i % 2) if len(candidates) > 1 else candidates[0])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40).map(lambda h: 2 * h), st.integers(0, 2**31 - 1))
def test_pack_unpack_inverse(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, k), generator=g, dtype=torch.uint8)
    packed = nvfp4.pack(codes)
    assert packed.shape == (rows, k // 2)
    assert torch.equal(nvfp4.unpack(packed), codes)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0])  # first element in the low nibble


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError, match="even"):
        nvfp4.pack(torch.zeros(3, dtype=torch.uint8))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_swizzle_inverse_and_tile_layout(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    sw = nvfp4.swizzle_block_scales(s)
    rows_p, cols_p = nvfp4.swizzled_shape(rows, cols)
    assert sw.shape == (rows_p, cols_p)
    assert torch.equal(nvfp4.unswizzle_block_scales(sw, rows, cols), s)
    flat = sw.flatten()
    # Spot-check the documented formula on a few positions.
    for r, c in [(0, 0), (rows - 1, cols - 1), (rows // 2, cols // 2)]:
        tr, rr = divmod(r, 128)
        r4, r32 = divmod(rr, 32)
        tc, cc = divmod(c, 4)
        offset = ((tr * (cols_p // 4) + tc) * 512) + r32 * 16 + r4 * 4 + cc
        assert flat[offset] == s[r, c]


def test_swizzle_batched_matches_unbatched():
    s = torch.randint(0, 256, (3, 130, 6), dtype=torch.uint8)
    sw = nvfp4.swizzle_block_scales(s)
    for i in range(3):
        assert torch.equal(sw[i], nvfp4.swizzle_block_scales(s[i]))
    assert torch.equal(nvfp4.unswizzle_block_scales(sw, 130, 6), s)


def test_all_zero_blocks_have_scale_one_and_no_nan():
    x = torch.zeros(2, 32)
    x[1, 16:] = torch.linspace(-3, 3, 16)
    g = nvfp4.global_scale_from_amax(x.abs().max())
    packed, scale = nvfp4.quantize(x, g)
    assert scale.float()[0].tolist() == [1.0, 1.0] and scale.float()[1, 0].item() == 1.0
    out = nvfp4.dequantize(packed, scale, g)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0], torch.zeros(32))


def test_zero_global_scale_input_is_all_zero_without_nan():
    x = torch.zeros(4, 16)
    packed, scale = nvfp4.quantize(x, nvfp4.global_scale_from_amax(x.abs().max()) + 1e-30)
    assert not torch.isnan(nvfp4.dequantize(packed, scale, 1e-30)).any()


@pytest.mark.parametrize("shape", [(1, 16), (1, 64), (90, 64), (150, 80), (7, 4096), (3, 24), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_exact_against_modelopt(shape, dtype):
    """Codes, block scales and dequantized values equal ModelOpt's own NVFP4QTensor."""
    mo = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    torch.manual_seed(shape[0] * 1000 + shape[1])
    x = (torch.randn(shape) * torch.exp(torch.randn(shape[0], 1))).to(dtype)
    g = nvfp4.global_scale_from_amax(x.float().abs().max())
    packed, scale = nvfp4.quantize(x, g)
    kp = -(-shape[1] // 16) * 16
    assert packed.shape == (shape[0], kp // 2) and scale.shape == (shape[0], kp // 16)
    padded = torch.nn.functional.pad(x, (0, kp - shape[1]))
    qt, mo_scale, _ = mo.NVFP4QTensor.quantize(padded.clone(), 16, weights_scaling_factor_2=g)
    assert torch.equal(scale.view(torch.uint8), mo_scale.view(torch.uint8))
    assert torch.equal(packed, qt._quantized_data)
    mo_dq = qt.dequantize(dtype=torch.float32, scale=mo_scale, double_scale=g, block_sizes={-1: 16})
    assert torch.equal(nvfp4.dequantize(packed, scale, g, k=shape[1]), mo_dq[:, : shape[1]])


@pytest.mark.parametrize("m,k", [(1, 64), (90, 64), (150, 80), (3, 40)])
def test_activation_quantization_pads_and_swizzles(m, k):
    torch.manual_seed(m + k)
    x = torch.randn(m, k)
    g = torch.tensor(0.01)
    packed, scale = nvfp4.quantize_activations(x, g)
    packed_sw, scale_sw = nvfp4.quantize_activations(x, g, swizzle=True)
    kp = -(-k // 16) * 16
    assert torch.equal(packed, packed_sw) and packed.shape == (m, kp // 2)
    assert scale_sw.shape == nvfp4.swizzled_shape(m, kp // 16)
    assert torch.equal(nvfp4.unswizzle_block_scales(scale_sw, m, kp // 16).view(torch.uint8),
                       scale.view(torch.uint8))
    # Padding columns quantize to code 0.
    assert torch.equal(nvfp4.unpack(packed)[:, k:], torch.zeros(m, kp - k, dtype=torch.uint8))


def test_block_values_are_exact_in_bfloat16():
    """E2M1 x E4M3 products fit bf16's significand: the basis of the BF16 tensor-core W4A4 path."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(256 // 16 * 16 // 16)[:256]
    all_scales = torch.arange(256, dtype=torch.uint8)
    all_scales = all_scales[(all_scales != 0x7F) & (all_scales != 0xFF)].view(torch.float8_e4m3fn)
    values = nvfp4.e2m1_decode(torch.arange(16, dtype=torch.uint8))
    products = values[:, None] * all_scales.float()[None, :]
    assert torch.equal(products.to(torch.bfloat16).float(), products)
    del codes
