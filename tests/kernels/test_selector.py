"""The one backend selector: ordered candidates, (ok, reason) answers, one error listing them all."""

import pytest
import torch

from mopt.kernels import linear as kl
from mopt.kernels.moe import MoEScheme, select_moe_kernel
from mopt.kernels.reference import CpuDecodedLinearKernel, ReferenceLinearKernel

SHAPE = kl.LinearShape(kl.LinearScheme.NVFP4, 4096, 4096)


class _NeverKernel(kl.LinearKernel):
    name = "never"
    backend = "triton"

    @classmethod
    def is_supported(cls, device):
        return False, "needs compute capability 9.0"

    @classmethod
    def can_implement(cls, shape):
        return True, ""


class _SmallKOnly(kl.LinearKernel):
    name = "small-k"
    backend = "cublas"

    @classmethod
    def is_supported(cls, device):
        return True, ""

    @classmethod
    def can_implement(cls, shape):
        return (shape.in_features <= 1024, f"K={shape.in_features} > 1024")


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(kl, "_KERNELS", {"cpu": [_NeverKernel, _SmallKOnly], "any": [ReferenceLinearKernel]})
    monkeypatch.delenv(kl.BACKEND_ENV, raising=False)


def test_cpu_defaults(monkeypatch):
    monkeypatch.delenv(kl.BACKEND_ENV, raising=False)
    cpu = torch.device("cpu")
    assert type(kl.select_linear_kernel(SHAPE, cpu)) is CpuDecodedLinearKernel
    unquantized = kl.LinearShape(kl.LinearScheme.UNQUANTIZED, 64, 64)
    assert type(kl.select_linear_kernel(unquantized, cpu)) is ReferenceLinearKernel
    assert type(kl.select_linear_kernel(SHAPE, cpu, "reference")) is ReferenceLinearKernel


def test_first_fitting_candidate_wins(registry):
    small = kl.LinearShape(kl.LinearScheme.FP8_TENSOR, 512, 512)
    assert isinstance(kl.select_linear_kernel(small, torch.device("cpu")), _SmallKOnly)
    assert isinstance(kl.select_linear_kernel(SHAPE, torch.device("cpu")), ReferenceLinearKernel)


@pytest.mark.parametrize("override,chosen", [("reference", ReferenceLinearKernel), (None, ReferenceLinearKernel)])
def test_override_argument_and_env(registry, monkeypatch, override, chosen):
    monkeypatch.setenv(kl.BACKEND_ENV, "reference")
    assert isinstance(kl.select_linear_kernel(kl.LinearShape(kl.LinearScheme.FP8_TENSOR, 512, 512),
                                              torch.device("cpu"), override), chosen)


def test_error_lists_every_reason(registry):
    with pytest.raises(ValueError) as err:
        kl.select_linear_kernel(SHAPE, torch.device("cpu"), override="cublas")
    text = str(err.value)
    assert "no linear kernel for nvfp4 4096x4096 on cpu" in text
    assert "never: not the requested backend 'cublas'" in text
    assert "small-k: K=4096 > 1024" in text
    assert "reference: not the requested backend 'cublas'" in text


def test_unprocessed_layer_is_a_clear_error():
    from mopt.layers.linear import ReplicatedLinear

    layer = ReplicatedLinear(8, 8, prefix="model.lm_head")
    with pytest.raises(RuntimeError, match="model.lm_head: weights were not processed"):
        layer(torch.zeros(1, 8))


# -- fused MoE ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", list(MoEScheme))
@pytest.mark.parametrize("override,chosen", [(None, "reference"), ("reference", "reference"), ("cpu", "reference")])
def test_moe_cpu_takes_the_reference(scheme, override, chosen, monkeypatch):
    monkeypatch.delenv("MOPT_BACKEND", raising=False)
    assert select_moe_kernel(scheme, torch.device("cpu"), override).name == chosen


def test_moe_error_lists_every_reason(monkeypatch):
    monkeypatch.setenv("MOPT_BACKEND", "triton")
    with pytest.raises(ValueError) as err:
        select_moe_kernel(MoEScheme.FP8_TENSOR, torch.device("cpu"))
    text = str(err.value)
    assert "fp8_tensor experts on cpu" in text
    assert "triton-fused-moe: needs a CUDA device, not cpu" in text
    assert "reference: not the requested backend 'triton'" in text


def test_moe_layer_without_processing_is_a_clear_error():
    from mopt.layers.fused_moe import FusedMoE

    layer = FusedMoE(4, 2, 32, 16, prefix="model.layers.3.mlp.experts")
    with pytest.raises(RuntimeError, match="model.layers.3.mlp.experts: weights were not processed"):
        layer(torch.zeros(1, 32), torch.zeros(1, 4))
