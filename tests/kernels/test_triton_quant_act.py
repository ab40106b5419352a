"""Triton activation quantizers of INT8 SmoothQuant and MXFP8 / MXFP4 against the reference formats: bit-exact.

``triton_quant.int8_static`` vs ``int8.quantize_static`` (codes, and their values in the input dtype),
``triton_quant_mx.mxfp8_values`` / ``mxfp4_values`` vs ``mx.fake_quantize_mxfp8/4(x).to(x.dtype)``.
Tolerance: none; outputs are compared bit for bit (negative zeros included), NaN where the reference
has NaN. On CPU through Triton's interpreter at small shapes, on the GPU (``-m gpu``) at realistic ones.
Each case fills the first blocks of the input with special blocks (ties, saturation, zeros, signs,
exponent edges) and the rest with random values of a wide dynamic range.
"""

from __future__ import annotations

import pytest
import torch
from triton_device import triton_device

from mopt.quant.formats import int8, mx

triton_quant = pytest.importorskip("mopt.kernels.triton_quant")
triton_quant_mx = pytest.importorskip("mopt.kernels.triton_quant_mx")

CPU_SHAPES = [(1, 64), (3, 96), (5, 256), (2, 1056)]
GPU_SHAPES = [(1, 4096), (16, 14336), (2048, 4096), (3, 96), (7, 1056)]
DTYPES = [torch.float32, torch.bfloat16]
INF, NAN = float("inf"), float("nan")
E4M3 = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, positive codes
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FORMATS = {"mxfp8": (448.0, E4M3), "mxfp4": (6.0, E2M1)}


def _random(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Values spanning ~2**-20 .. 2**20 within rows and blocks, and rows of different size."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, k, generator=g) * 3) \
        * torch.exp(torch.randn(m, 1, generator=g) * 2)


def _fill(m: int, k: int, blocks: list[torch.Tensor]) -> torch.Tensor:
    """Random ``[m, k]`` whose first 32-element blocks (row-major) are ``blocks``."""
    x = _random(m, k)
    flat = x.view(-1, 32)
    for i, b in enumerate(blocks[: flat.shape[0]]):
        flat[i] = b
    return x


def _block(*head: float, rest: float = 0.0) -> torch.Tensor:
    b = torch.full((32,), rest)
    b[: len(head)] = torch.tensor(head)
    return b


def _mids(grid: torch.Tensor) -> torch.Tensor:
    return (grid[1:] + grid[:-1]) / 2


def _up(v: float) -> float:
    return torch.tensor(v).nextafter(torch.tensor(INF)).item()


def _down(v: float) -> float:
    return torch.tensor(v).nextafter(torch.tensor(-INF)).item()


def _mx_blocks(case: str, max_value: float, grid: torch.Tensor) -> list[torch.Tensor]:
    if case == "random":
        return []
    if case == "zero_blocks":  # zeros, negative zeros, zeros beside one value
        return [torch.zeros(32), torch.full((32,), -0.0), _block(0.0, -0.0, 1.0), torch.zeros(32)]
    if case == "ties":  # every midpoint of the grid, both signs, under a block amax of exactly max * 2**j
        mids = torch.cat([_mids(grid), -_mids(grid)])
        chunks = [torch.cat([torch.tensor([max_value]), c]) for c in mids.split(31)]
        blocks = [torch.cat([c, torch.zeros(32 - c.numel())]) * 2.0 ** j for j in (0, -7, 9) for c in chunks]
        return blocks + [torch.cat([torch.tensor([-max_value]), mids[:31].repeat(3)[:31]]) * 2.0 ** -40]
    if case == "exponent_edges":  # amax at, just above and just below max * 2**j (j = 0 and the E8M0 floor)
        blocks = []
        for j in (0, -20, 60, -126, -127, -128):
            top = max_value * 2.0 ** j
            for amax in (top, _up(top), _down(top), _up(_up(top))):
                blocks.append(_block(amax, -amax / 3, amax / 7, _down(amax), rest=amax / 5))
        return blocks + [_block((1.75 + 2**-23) * 2.0 ** -119, 2.0 ** -149, 3e38), _block(2.0 ** -149, -(2.0 ** -149))]
    if case == "saturation":  # infinite and NaN blocks, and the largest finite values
        return [_block(INF, 1.0, -1.0, 1e-3), _block(-INF, INF, 5.0), _block(NAN, 1.0, -1e-30, 0.0),
                _block(1.0, NAN, INF), _block(3.3e38, -3.3e38, 1e30, 1.0, rest=-1e-30), _block(max_value * 2**127)]
    if case == "negative_zero":  # negatives that round to zero keep their sign, -0.0 inputs
        tiny = 1e-4 if max_value == 448.0 else 0.1
        return [_block(max_value, -tiny, -0.0, tiny, -tiny / 10, rest=-tiny), _block(-0.0, -1e-40, rest=-0.0)]
    raise ValueError(case)


MX_CASES = ["random", "zero_blocks", "ties", "exponent_edges", "saturation", "negative_zero"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.int8: torch.int8}[t.dtype])


def assert_bit_exact(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    got = got.cpu()
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    nan = torch.isnan(expected) if expected.is_floating_point() else torch.zeros_like(expected, dtype=torch.bool)
    if nan.any():
        assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
    bad = (_bits(got) != _bits(expected)) & ~nan
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} differ, first at {i}: {got[tuple(i)].item()!r} vs "
                             f"{expected[tuple(i)].item()!r}")


def check_mx(fmt: str, case: str, m: int, k: int, dtype: torch.dtype, device: str) -> None:
    max_value, grid = FORMATS[fmt]
    x = _fill(m, k, _mx_blocks(case, max_value, grid)).to(dtype)
    ours = triton_quant_mx.mxfp8_values if fmt == "mxfp8" else triton_quant_mx.mxfp4_values
    reference = mx.fake_quantize_mxfp8 if fmt == "mxfp8" else mx.fake_quantize_mxfp4
    assert_bit_exact(ours(x.to(device)), reference(x).to(dtype), f"{fmt} {case} {m}x{k} {dtype}")


def _int8_inputs(case: str, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, per-tensor scale) of each INT8 case."""
    if case == "random":  # half the range: the largest values saturate
        x = _random(m, k)
        return x, torch.tensor(x.abs().max().item() / 127 * 0.5)
    if case == "ties":  # exactly halfway between integers under a power-of-two scale, and the integers
        s = 0.25
        n = torch.arange(-140, 140, dtype=torch.float32)
        special = torch.cat([(n + 0.5) * s, n * s])
    elif case == "ties_inexact":  # near-halfway under SmoothQuant-like scales, where x / s itself rounds
        s = 6.0 / 127
        n = torch.arange(-130, 130, dtype=torch.float32)
        special = torch.cat([(n + 0.5) * s, (n + 0.5).nextafter(n) * s, (n + 0.5).nextafter(n + 1) * s])
    elif case == "saturation":
        s = 0.03
        special = torch.tensor([INF, -INF, 1e30, -1e30, 128.5 * s, -128.5 * s, 127.49 * s, -128.49 * s, 3.3e38])
    elif case == "negative_zero":
        s = 0.5
        special = torch.tensor([-0.0, -0.1, -0.25, -0.2500001, 0.25, -1e-40, -0.75])
    else:
        raise ValueError(case)
    x = _random(m, k).flatten()
    x[: special.numel()] = special[: x.numel()]
    return x.view(m, k), torch.tensor(s)


INT8_CASES = ["random", "ties", "ties_inexact", "saturation", "negative_zero"]


def check_int8(case: str, m: int, k: int, dtype: torch.dtype, device: str) -> None:
    x, s = _int8_inputs(case, m, k)
    x = x.to(dtype)
    codes = int8.quantize_static(x, s)
    what = f"int8 {case} {m}x{k} {dtype}"
    assert_bit_exact(triton_quant.int8_static(x.to(device), s.to(device)), codes, what)
    assert_bit_exact(triton_quant.int8_static(x.to(device), s.to(device), dtype), codes.to(dtype), what + " values")
    # A bfloat16 one-element scale, as some checkpoints store it: the reference reads it as float32 too.
    sb = s.to(torch.bfloat16).reshape(1)
    assert_bit_exact(triton_quant.int8_static(x.to(device), sb.to(device)), int8.quantize_static(x, sb), what + " bf16 scale")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", CPU_SHAPES)
@pytest.mark.parametrize("case", MX_CASES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mx_values_exact_interpreted(fmt, case, m, k, dtype):
    check_mx(fmt, case, m, k, dtype, triton_device(gpu=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", CPU_SHAPES)
@pytest.mark.parametrize("case", INT8_CASES)
def test_int8_static_exact_interpreted(case, m, k, dtype):
    check_int8(case, m, k, dtype, triton_device(gpu=False))


def test_mx_values_keep_leading_dims_and_refuse_partial_blocks():
    device = triton_device(gpu=False)
    x = _random(6, 64).view(2, 3, 64)
    for fmt in FORMATS:
        ours = getattr(triton_quant_mx, f"{fmt}_values")
        reference = getattr(mx, f"fake_quantize_{fmt}")
        assert_bit_exact(ours(x.to(device)), reference(x), f"{fmt} [2, 3, 64]")
        assert_bit_exact(ours(x[..., ::2].to(device)), reference(x[..., ::2]), f"{fmt} strided")
        assert ours(torch.empty(0, 64, device=device)).shape == (0, 64)
        for fn in (ours, reference):  # K = 48: the reference refuses it as well
            with pytest.raises(ValueError, match="multiple of 32"):
                fn(torch.ones(2, 48, device=device))


def test_int8_static_refuses_per_channel_scales():
    device = triton_device(gpu=False)
    with pytest.raises(ValueError, match="one per-tensor scale"):
        triton_quant.int8_static(torch.ones(2, 8, device=device), torch.ones(2, 1, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", GPU_SHAPES)
@pytest.mark.parametrize("case", MX_CASES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mx_values_exact_gpu(fmt, case, m, k, dtype):
    check_mx(fmt, case, m, k, dtype, triton_device(gpu=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", GPU_SHAPES)
@pytest.mark.parametrize("case", INT8_CASES)
def test_int8_static_exact_gpu(case, m, k, dtype):
    check_int8(case, m, k, dtype, triton_device(gpu=True))
