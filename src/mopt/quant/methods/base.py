"""Method interfaces: a method creates a layer's parameters, converts them once, applies it."""

from __future__ import annotations

import torch

from mopt.kernels.linear import LinearKernel, LinearScheme, LinearShape, select_linear_kernel
from mopt.layers.parameter import BaseParameter, WeightLoadError


class QuantizeMethodBase:
    def create_weights(self, layer: torch.nn.Module, *args, **kwargs) -> None:
        raise NotImplementedError  # abstract

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Convert loaded weights into their run-time form; called once after loading."""


class LinearMethodBase(QuantizeMethodBase):
    """A linear method computes through a kernel chosen for its scheme when weights are final."""

    scheme: LinearScheme = LinearScheme.UNQUANTIZED
    # Tensor parallelism: a row-parallel layer's per-rank input size (K) must be a multiple of this,
    # for the reason given (format blocks, kernel alignment); checked when the layer is built.
    input_split_multiple: int = 1
    input_split_reason: str = ""
    # ... and a column-parallel layer's per-rank output sizes (each fused shard's) a multiple of this.
    output_split_multiple: int = 1
    output_split_reason: str = ""
    # Whether ``apply`` returns its kernel's output as is: then a row-parallel layer lets the kernel send
    # its partial sums to the peers itself (``RowParallelLinear.forward``).
    returns_kernel_output: bool = True

    def __init__(self) -> None:
        self.kernel: LinearKernel | None = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        raise NotImplementedError  # abstract

    def select_kernel(self, layer: torch.nn.Module, override: str | None = None) -> None:
        layer.linear_shape = LinearShape(
            self.scheme, layer.input_size_per_partition, layer.output_size_per_partition
        )
        self.kernel = select_linear_kernel(layer.linear_shape, layer.weight.device, override)
        self.kernel.process_weights(layer)

    def takes_quantized_input(self, layer: torch.nn.Module) -> bool:
        """Whether ``apply`` may be given its kernel's input already quantized (False where it must see
        the unquantized input, e.g. to smooth it first)."""
        return self.kernel is not None

    def fp8_input_scale(self, layer: torch.nn.Module) -> torch.Tensor | None:
        """The static scale under which ``apply`` also takes E4M3 codes (its kernel's), or None."""
        return self.kernel.fp8_input_scale(layer) if self.takes_quantized_input(layer) else None

    def nvfp4_input_scale(self, layer: torch.nn.Module) -> torch.Tensor | None:
        """The global scale under which ``apply`` also takes marked NVFP4 block values (its kernel's), or None."""
        return self.kernel.nvfp4_input_scale(layer) if self.takes_quantized_input(layer) else None

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError(
                f"{getattr(layer, 'prefix', type(layer).__name__)}: weights were not processed "
                "after loading (call process_weights_after_loading)"
            )
        return self.kernel.apply(layer, x, bias)

    def apply_silu_gated(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                         fp8_scale: torch.Tensor | None) -> torch.Tensor | None:
        """``silu(gate) * up`` of a fused gate/up layer in one kernel where the kernel offers it (see
        ``LinearKernel.apply_silu_gated``); None: use ``apply`` and ``kernels.glue.silu_mul``."""
        if not self.fuses_silu(layer, x):
            return None
        return self.kernel.apply_silu_gated(layer, x, bias, fp8_scale)

    def fuses_silu(self, layer: torch.nn.Module, x: torch.Tensor) -> bool:
        """Whether the kernel fuses the SiLU for ``x``'s number of tokens (checked before any work on ``x``)."""
        tokens = x.numel() // max(1, x.shape[-1])
        return self.kernel is not None and tokens <= self.kernel.silu_gated_rows(layer)


class ModelOptLinearMethodBase(LinearMethodBase):
    """A linear method that reads its format's settings from a ModelOpt quant config."""

    def __init__(self, quant_config) -> None:
        super().__init__()
        self.quant_config = quant_config


def require_loaded(layer: torch.nn.Module, *names: str) -> None:
    """Raise naming every listed parameter of ``layer`` (and its rows) that no checkpoint tensor filled."""
    missing = []
    for n in names:
        param = getattr(layer, n, None)
        if isinstance(param, BaseParameter) and not param.loaded:
            spans = ", ".join(f"{a}..{b}" for a, b in param.unloaded_spans())
            missing.append(f"{param.mopt_name} (rows {spans} of {param.tracked_extent})")
    if missing:
        raise WeightLoadError(f"no checkpoint tensor was loaded into: {'; '.join(missing)}")


def replace_parameter(layer: torch.nn.Module, name: str, data: torch.Tensor) -> None:
    """Swap a loader parameter for a plain frozen one holding its processed value."""
    if name in layer._parameters:
        del layer._parameters[name]
    layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
