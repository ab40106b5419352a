"""Producers that write NVFP4 block values for the W4A4 GEMM after them (``kernels.quantized_input``).

Each producer (RMSNorm with and without the residual, the SiLU-gated product, the fused all-reduce +
RMSNorm, decode attention with and without its split merge) given ``nvfp4_scale`` must write, bit for
bit, the block values ``triton_quant.nvfp4_block_values`` computes from its unquantized output under that
scale, marked; and ``triton-nvfp4`` given them must return what it returns for the unquantized input.
Exactness is the point (the quantization is moved, not changed), so comparisons are ``torch.equal``,
through the interpreter and on the GPU, with one exception on the GPU, where kernels compiled apart
may differ: decode attention's variant that writes block values may sum in another order (as its E4M3
variant, ``test_triton_attention``), so a value may sit across a rounding boundary and land in another
E2M1 step, rarely (under 1% of elements). (The NVFP4 MMA kernel's split K adds its partials in split
order, so it too gives equal bits.) The torch references quantize with ``nvfp4.quantize``: equal too.
"""

from __future__ import annotations

import pytest
import torch

from canonical import canonical_layer
from peer_buffers import Buffers
from test_triton_attention import _cache
from triton_device import INTERPRETED, triton_device

from mopt.kernels.glue import rms_norm_reference, silu_mul_reference
from mopt.kernels.linear import LinearScheme as S
from mopt.kernels.quantized_input import Nvfp4BlockValues, mark_nvfp4_block_values, nvfp4_block_values_of

triton_glue = pytest.importorskip("mopt.kernels.triton_glue")
triton_quant = pytest.importorskip("mopt.kernels.triton_quant")
tan = pytest.importorskip("mopt.kernels.triton_allreduce_norm")
triton_attention = pytest.importorskip("mopt.kernels.triton_attention")

SCALE = 0.004  # a global input scale: block scales land in E4M3's normal range for outputs of a few units


def _norm(device, x, residual, weight, nvfp4_scale):
    return triton_glue.rms_norm(x, weight, 1e-5, None, None, nvfp4_scale)


def _norm_residual(device, x, residual, weight, nvfp4_scale):
    return triton_glue.rms_norm(x, weight, 1e-5, residual, None, nvfp4_scale)[0]


def _silu(device, x, residual, weight, nvfp4_scale):
    return triton_glue.silu_mul(torch.cat([x, residual], dim=-1), None, nvfp4_scale)


def _all_reduce_norm(device, x, residual, weight, nvfp4_scale):
    """Rank 1 of 2, its peer's partial sums (``x`` itself) put in place as its kernel would have pushed them."""
    buffers = Buffers(2, device)
    buffers.send(0, 1, 0, x)
    return tan.all_reduce_rms_norm(x, residual, weight, 1e-5, None, buffers.peers(1), nvfp4_scale=nvfp4_scale)[0]


def _decode(splits):
    """Decode attention of 4 sequences (one empty) over 8 query heads of 64 (``x`` only sets the device and
    dtype): ``[4, 8 * 64]`` as the model hands it to ``o_proj``, whatever the case's shape."""
    def produce(device, x, residual, weight, nvfp4_scale):
        seq_lens = [5, 33, 0, 90]
        k_cache, v_cache, tables, ks, vs = _cache(seq_lens, 16, 2, 64, x.dtype, x.dtype, device, 5)
        q = (torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(9)) * 3).to(device, x.dtype)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        out = triton_attention.decode(q, k_cache, v_cache, tables, lens, 0.125, ks, vs, num_splits=splits,
                                      nvfp4_scale=nvfp4_scale)
        values = nvfp4_block_values_of(out)
        flat = (out if values is None else values).reshape(4, 8 * 64)
        return flat if values is None else mark_nvfp4_block_values(flat)
    return produce


ROW_PRODUCERS = {"rms_norm": _norm, "rms_norm+residual": _norm_residual, "silu_mul": _silu,
                 "all_reduce_rms_norm": _all_reduce_norm}  # rows of the case's shape
DECODE_PRODUCERS = {"decode": _decode(1), "decode+merge": _decode(4)}  # one shape of their own
PRODUCERS = {**ROW_PRODUCERS, **DECODE_PRODUCERS}


def _cases(names, shapes):
    return [(name, m, n) for name in names if name in ROW_PRODUCERS for m, n in shapes] + \
        [(name, 4, 512) for name in names if name in DECODE_PRODUCERS]


def _case(device, dtype, m, n):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = (torch.randn(m, n, generator=g) * 2).to(device, dtype)
    residual = torch.randn(m, n, generator=g).to(device, dtype)
    weight = (1 + torch.randn(n, generator=g) * 0.1).to(device)
    return x, residual, weight


def _check_producer(name, device, dtype, m, n):
    produce = PRODUCERS[name]
    x, residual, weight = _case(device, dtype, m, n)
    scale = torch.tensor(SCALE, device=device)
    got = produce(device, x, residual, weight, scale)
    assert isinstance(got, Nvfp4BlockValues) and got.dtype == torch.bfloat16
    plain = produce(device, x, residual, weight, None)
    assert got.shape == plain.shape
    want = triton_quant.nvfp4_block_values(plain, scale)
    got = nvfp4_block_values_of(got)
    if name in DECODE_PRODUCERS and not INTERPRETED:
        assert (got != want).float().mean() < 0.01
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("name,m,n", _cases(list(PRODUCERS), [(1, 64), (3, 256), (2, 1024)]))
def test_producers_write_the_block_values_interpreted(name, m, n):
    """One row of 1024 is split over four programs in the fused all-reduce norm: blocks stay whole."""
    dtype = torch.float16 if name == "all_reduce_rms_norm" else torch.float32  # the peer buffers' dtype
    _check_producer(name, triton_device(False), dtype, m, n)


def test_references_write_the_block_values():
    from mopt.quant.formats import nvfp4

    x, residual, weight = _case("cpu", torch.float32, 3, 128)
    scale = torch.tensor(SCALE)
    for got, plain in [(rms_norm_reference(x, weight, 1e-5, None, None, scale), rms_norm_reference(x, weight, 1e-5)),
                       (silu_mul_reference(x, None, scale), silu_mul_reference(x))]:
        assert isinstance(got, Nvfp4BlockValues)
        want = nvfp4.dequantize_to_block_values(*nvfp4.quantize(plain, scale)).to(torch.bfloat16)
        assert torch.equal(nvfp4_block_values_of(got), want)


@pytest.mark.parametrize("fmt_args", [(torch.tensor(0.1), torch.tensor(0.1)), (None, torch.tensor(0.1))])
def test_bad_requests_are_named(fmt_args):
    fp8_scale, nvfp4_scale = fmt_args
    x = torch.zeros(2, 40 if fp8_scale is None else 64)
    expected = "both given" if fp8_scale is not None else "whole 16-element blocks"
    with pytest.raises(ValueError, match=expected):
        triton_glue.rms_norm(x, torch.ones(x.shape[1]), 1e-5, None, fp8_scale, nvfp4_scale)
    with pytest.raises(ValueError, match=expected):
        rms_norm_reference(x, torch.ones(x.shape[1]), 1e-5, None, fp8_scale, nvfp4_scale)


def test_the_mark_does_not_survive_an_operation():
    values = mark_nvfp4_block_values(torch.ones(2, 16, dtype=torch.bfloat16))
    assert nvfp4_block_values_of(values) is not None
    for changed in (values * 2, values.reshape(-1, 16), values[:1], values.float()):
        assert nvfp4_block_values_of(changed) is None


def _check_consumer(device, m, k, n):
    from mopt.kernels import triton_linear

    layer = canonical_layer(S.NVFP4, n, k)
    for name in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
        setattr(layer, name, getattr(layer, name).to(device))
    layer.params_dtype = torch.float32
    kernel = triton_linear.TritonNvfp4Kernel()
    kernel.process_weights(layer)
    assert kernel.nvfp4_input_scale(layer) is layer.input_scale
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).to(device)
    values = mark_nvfp4_block_values(triton_quant.nvfp4_block_values(x, layer.input_scale))
    got, want = kernel.apply(layer, values, None), kernel.apply(layer, x, None)
    assert torch.equal(got, want)


@pytest.mark.parametrize("m", [1, 3])  # the one-token kernel and the weight-decoding MMA kernel
def test_the_nvfp4_kernel_takes_block_values_interpreted(m):
    _check_consumer(triton_device(False), m, 64, 48)


def test_only_kernels_that_take_block_values_ask_for_them():
    """The FP8 and BF16 kernels quantize nothing they could be spared; a smoothed or SVDQuant NVFP4 layer
    must see its unquantized input (``takes_quantized_input``)."""
    from mopt.kernels import triton_linear
    from mopt.quant.methods.smoothing import PreQuantScaleMixin, SvdQuantLoraMixin

    layer = canonical_layer(S.FP8_TENSOR, 32, 64)
    for kernel in (triton_linear.HopperFp8Kernel(), triton_linear.TritonGemvKernel()):
        assert kernel.nvfp4_input_scale(layer) is None

    class _Base:
        def takes_quantized_input(self, layer):
            return True

    class _Smoothed(PreQuantScaleMixin, _Base):
        pass

    class _LowRank(SvdQuantLoraMixin, _Base):
        pass

    smoothed = torch.nn.Module()
    smoothed.pre_quant_scale = torch.ones(64)
    assert not _Smoothed().takes_quantized_input(smoothed)
    smoothed.pre_quant_scale = None
    assert _Smoothed().takes_quantized_input(smoothed)
    assert not _LowRank().takes_quantized_input(smoothed)


@pytest.mark.gpu
@pytest.mark.parametrize("name,m,n", _cases(["rms_norm", "rms_norm+residual", "silu_mul", "decode", "decode+merge"],
                                             [(1, 4096), (64, 4096), (1, 14336), (200, 7168)]))
def test_quantized_input_gpu(name, m, n):
    _check_producer(name, triton_device(True), torch.bfloat16, m, n)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 200])
def test_the_nvfp4_kernel_takes_block_values_gpu(m):
    _check_consumer(triton_device(True), m, 4096, 3072)
