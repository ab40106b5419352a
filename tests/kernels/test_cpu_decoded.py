"""The CPU kernel that stores weights decoded to float16 equals the reference backend bit for bit."""

import pytest
import torch

from canonical import S, canonical_layer
from mopt.kernels.reference import CpuDecodedLinearKernel, ReferenceLinearKernel


@pytest.mark.parametrize("scheme", [S.FP8_TENSOR, S.FP8_CHANNEL_TOKEN, S.FP8_BLOCK, S.NVFP4])
@pytest.mark.parametrize("n,k,m", [(48, 64, 1), (130, 272, 5), (256, 384, 17)])
def test_cpu_decoded_equals_reference(scheme, n, k, m):
    layer = canonical_layer(scheme, n, k)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    expected = ReferenceLinearKernel().apply(layer, x, bias)
    kernel = CpuDecodedLinearKernel()
    kernel.process_weights(layer)
    assert layer.weight.dtype == torch.float16 and layer.weight.shape == (n, k)
    assert torch.equal(kernel.apply(layer, x, bias), expected)
