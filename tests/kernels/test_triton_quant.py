"""Triton activation quantizers against the reference formats: bit-exact.

On CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by scripts/test.sh) at small
shapes; on the GPU (``-m gpu``) at realistic ones. Shapes include M=1, K not a multiple of the
group or block (90x64 -> padded, 150x80, 7x200), and values spanning zero rows, subnormal scales
and saturation.
"""

from __future__ import annotations

import os

import pytest
import torch

from triton_device import triton_device

from mopt.quant.formats import fp8, nvfp4

triton_quant = pytest.importorskip("mopt.kernels.triton_quant")

CPU_SHAPES = [(1, 64), (90, 64), (150, 80), (7, 200), (3, 1000)]
GPU_SHAPES = [(1, 4096), (16, 14336), (2048, 4096), (90, 64), (150, 80), (5, 1000)]


def _device() -> str:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    return "cuda"


def _inputs(m, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g) * 2)
    x[0, : min(k, 40)] *= 1e-6  # tiny values: subnormal codes and scales
    if m > 2:
        x[1] = 0.0  # an all-zero row
        x[2, 0] = 1e4  # an outlier
    return x.to(device)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    return torch.equal(view(a.cpu()), view(b.cpu()))


def _params(gpu: bool):
    return pytest.mark.parametrize("m,k", GPU_SHAPES if gpu else CPU_SHAPES)


def check_all(m, k, device):
    x = _inputs(m, k, device)
    xc = x.cpu()
    scale = torch.tensor(xc.abs().max().item() / 448 * 0.5)  # static: half the range, so some saturate
    assert _same(triton_quant.fp8_static(x, scale.to(device)), fp8.quantize(xc, scale))
    q, s = triton_quant.fp8_per_token(x)
    rq, rs = fp8.quantize_per_token(xc)
    assert _same(q, rq) and torch.equal(s.cpu(), rs)
    q, s = triton_quant.fp8_groups(x)
    rq, rs = fp8.quantize_groups(xc)
    assert _same(q, rq) and torch.equal(s.cpu(), rs)
    g = nvfp4.global_scale_from_amax(xc.abs().max())
    packed, bs = triton_quant.nvfp4_packed(x, g.to(device))
    rp, rbs = nvfp4.quantize(xc, g)
    assert _same(packed, rp) and _same(bs, rbs)
    values = triton_quant.nvfp4_block_values(x, g.to(device))
    assert torch.equal(values.cpu().float(), nvfp4.dequantize_to_block_values(rp, rbs))
    # Fused MoE: each row repeated for 3 experts, each under its own global scale.
    gs = g * torch.tensor([0.25, 1.0, 3.0]).repeat(m)
    values = triton_quant.nvfp4_block_values(x, gs.to(device), repeat=3)
    for r in range(3 * m):
        expected = nvfp4.dequantize_to_block_values(*nvfp4.quantize(xc[r // 3], gs[r]))
        assert torch.equal(values[r].cpu().float(), expected), f"row {r}"


@_params(gpu=False)
def test_quantizers_exact_interpreted(m, k):
    if _device() != "cpu":
        pytest.skip("interpreter run")
    check_all(m, k, "cpu")


@pytest.mark.gpu
@_params(gpu=True)
def test_quantizers_exact_gpu(m, k):
    if _device() != "cuda":
        pytest.skip("GPU run")
    check_all(m, k, "cuda")
    x = _inputs(m, k, "cuda").to(torch.bfloat16)  # bf16 activations as the GPU path feeds them
    q, s = triton_quant.fp8_per_token(x)
    rq, rs = fp8.quantize_per_token(x.cpu())
    assert _same(q, rq) and torch.equal(s.cpu(), rs)


def test_round_e4m3_all_codes():
    """Every E4M3 value and every midpoint between neighbours rounds as torch's cast does."""
    if _device() != "cpu":
        pytest.skip("interpreter run")
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr + offs, triton_quant.round_e4m3(x), mask=offs < n)

    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[~torch.isnan(values)].unique()
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, mids, mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(torch.tensor(-float("inf")))])
    x = x[x.abs() <= 448]
    out = torch.empty_like(x)
    kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(out, x.to(torch.float8_e4m3fn).float())


def check_expert_static(m, k, device, dtype):
    """``expert_static_values``: each token's ``top_k`` pairs under their experts' static scales, with and without
    SmoothQuant smoothing, INT8 and FP8, bit-equal to the reference quantizers on the repeated rows."""
    from mopt.quant.formats import int8

    top_k, experts = 3, 5
    x = _inputs(m, k, device).to(dtype)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, experts, (m * top_k,), generator=g)
    amax = x.float().abs().amax().cpu().item()
    smoothing = 0.5 + torch.rand(experts, k, generator=g)
    for int8_codes, scale in ((True, torch.tensor([0.3, 0.5, 1.0, 2.0, 0.1]) * amax / 127),
                              (False, torch.tensor([0.3, 0.5, 1.0, 2.0, 0.1]) * amax / 448)):
        for smooth in (None, smoothing):
            values, scales = triton_quant.expert_static_values(
                x, ids.to(device), scale.to(device), smooth.to(device) if smooth is not None else None, int8_codes,
                row_div=top_k)
            rows = x.cpu().repeat_interleave(top_k, dim=0)
            if smooth is not None:
                rows = rows * smooth[ids].to(dtype)
            quantize = int8.quantize_static if int8_codes else fp8.quantize
            want = quantize(rows, scale[ids][:, None]).to(dtype)
            assert torch.equal(values.cpu(), want), (int8_codes, smooth is not None)
            assert torch.equal(scales.cpu(), scale[ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@_params(gpu=False)
def test_expert_static_values_exact_interpreted(m, k, dtype):
    check_expert_static(m, k, triton_device(False), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@_params(gpu=True)
def test_expert_static_values_exact_gpu(m, k, dtype):
    check_expert_static(m, k, triton_device(True), dtype)
