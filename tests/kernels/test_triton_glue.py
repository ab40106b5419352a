"""Triton glue kernels (RMSNorm with residual add, SiLU-gated product, one rank's embedding rows) against
their torch references.

The embedding rows are copies: equal bit for bit everywhere. Float32 through the interpreter: the mean
square sums in another order than torch, so outputs
agree to 1e-6 relative, and the residual sum (a plain add) exactly. On the GPU in BF16 the residual
sum is exact and the outputs agree with the reference to within one BF16 rounding (2^-8 relative
per element: the GPU's rsqrt/exp approximations and the summation order can move a value across a
rounding boundary); at most 1% of elements may differ at all.
"""

from __future__ import annotations


import pytest
import torch

from triton_device import INTERPRETED, triton_device

from mopt.kernels.glue import rms_norm_reference, silu_mul_reference, vocab_rows_reference
from mopt.quant.formats import fp8

triton_glue = pytest.importorskip("mopt.kernels.triton_glue")




def _close(got, want, dtype):
    got, want = got.float().cpu(), want.float().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert ((got - want).abs() <= want.abs() * 2**-7 + 1e-6).all()
        assert (got != want).float().mean() < 0.01


def _check(device, dtype, m, n, strided):
    g = torch.Generator().manual_seed(m * n)
    x = (torch.randn(m, 2 * n, generator=g) * 3).to(device, dtype)
    x_in = x[:, :n] if strided else x[:, :n].contiguous()
    residual = torch.randn(m, n, generator=g).to(device, dtype)
    weight = (1 + torch.randn(n, generator=g) * 0.1).to(device)
    _close(triton_glue.rms_norm(x_in, weight, 1e-5), rms_norm_reference(x_in, weight, 1e-5), dtype)
    out, res = triton_glue.rms_norm(x_in, weight, 1e-6, residual)
    want, want_res = rms_norm_reference(x_in, weight, 1e-6, residual)
    assert torch.equal(res, want_res)
    _close(out, want, dtype)
    _close(triton_glue.silu_mul(x), silu_mul_reference(x), dtype)
    # E4M3 output under a static scale: the codes of the unquantized output. On the GPU the FP8 variant
    # is compiled apart and may sum the mean square in another order, so a code may sit one step off
    # where the output moved by one rounding; through the interpreter they are equal.
    scale = torch.tensor(0.02, device=device)
    codes, res = triton_glue.rms_norm(x_in, weight, 1e-6, residual, scale)
    assert codes.dtype == fp8.FP8_DTYPE and torch.equal(res, want_res)
    _same_codes(codes, fp8.quantize(out, scale), dtype)
    _same_codes(triton_glue.silu_mul(x, scale), fp8.quantize(triton_glue.silu_mul(x), scale), dtype)


def _same_codes(got, want, dtype):
    if INTERPRETED:
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        return
    g, w = got.float().cpu(), want.float().cpu()
    assert ((g - w).abs() <= w.abs() * 2**-3 + 2**-9).all()  # within one E4M3 step
    assert (g != w).float().mean() < 0.01


@pytest.mark.parametrize("m,n", [(1, 64), (5, 576), (3, 1000)])
@pytest.mark.parametrize("strided", [False, True])
def test_glue_interpreted(m, n, strided):
    _check(triton_device(False), torch.float32, m, n, strided)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n", [(1, 4096), (64, 4096), (8192, 4096), (7, 14336), (3, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_glue_gpu(m, n, dtype):
    _check(triton_device(True), dtype, m, n, strided=True)


def _vocab_rows_case(device, dtype, shape, rows, n, start, id_dtype):
    """Ids below, inside and past a rank's ``[start, start + count)`` (the last rank's share ends at the
    vocabulary, before its padding rows); every element of the output equals the reference's bits."""
    g = torch.Generator().manual_seed(rows * n + start)
    weight = torch.randn(rows, n, generator=g).to(device, dtype)
    count = rows - 3
    ids = torch.randint(max(0, start - rows), start + rows + 5, shape, generator=g)
    ids.view(-1)[0], ids.view(-1)[-1] = start + count - 1, start + count  # the last row inside, the first past
    ids = ids.to(device, id_dtype)
    got = triton_glue.vocab_rows(ids, weight, start, count)
    want = vocab_rows_reference(ids.long(), weight, start, count)
    assert got.shape == (*shape, n) and got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    inside = ((ids.long() - start >= 0) & (ids.long() - start < count)).cpu()
    assert inside.any() and (~inside).any()  # the case covers both kinds of ids


VOCAB_CASES = [((2,), 40, 64, 0), ((3, 5), 50, 300, 40), ((7,), 33, 2048, 99)]


@pytest.mark.parametrize("shape,rows,n,start", VOCAB_CASES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_vocab_rows_interpreted(shape, rows, n, start, id_dtype):
    _vocab_rows_case(triton_device(False), torch.float32, shape, rows, n, start, id_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,rows,n,start", VOCAB_CASES + [((64,), 1000, 4096, 64128)])
def test_vocab_rows_gpu(shape, rows, n, start):
    _vocab_rows_case(triton_device(True), torch.bfloat16, shape, rows, n, start, torch.int64)
