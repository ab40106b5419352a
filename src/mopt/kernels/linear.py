"""Linear-kernel interface and the one backend selector.

A quantized linear method brings its processed weights to a canonical form (one per
:class:`LinearScheme`) and hands the layer to a kernel picked here. Kernels read only tensors
on the layer, never configs. Each kernel says ``(ok, reason)`` for a device and for a layer
shape; the selector walks an ordered list and, when nothing fits, raises one error listing
every reason.

Canonical processed weights, per scheme (``W[N, K]``; attributes on the layer):

* ``UNQUANTIZED``: ``weight`` float ``[N, K]``.
* ``FP8_TENSOR``: ``weight`` e4m3 ``[N, K]``, ``weight_scale`` fp32 ``[]`` or ``[N]`` (fused
  shards exported with different scales keep theirs, one per row; a kernel that takes only one
  scale applies ``fp8.requantize_with_max_scale``), ``input_scale`` fp32 ``[]`` (static).
* ``FP8_CHANNEL_TOKEN``: ``weight`` e4m3 ``[N, K]``, ``weight_scale`` fp32 ``[N]``;
  activations quantized per token at run time.
* ``FP8_BLOCK``: ``weight`` e4m3 ``[N, K]``, ``weight_scale`` fp32 ``[N, ceil(K/128)]`` (each
  row holds its 128x128 block's scale, so fused shards need not align to 128 rows);
  activations quantized in 1x128 groups at run time.
* ``NVFP4``: ``weight`` uint8 ``[N, K/2]``, ``weight_scale`` e4m3 ``[N, K/16]``,
  ``weight_scale_2`` fp32 ``[N]`` (global scale of each row's shard), ``input_scale`` fp32 ``[]``;
  activations quantized to NVFP4 at run time.

Schemes of the other ModelOpt formats (``mopt.kernels.reference_formats`` holds their reference
GEMMs; a per-input-channel ``pre_quant_scale`` is applied by the method, before the kernel):

* ``FP8_BLOCK_WO`` (FP8_PB_WO, FP8_PB_REAL): as ``FP8_BLOCK`` but weight-only: activations stay
  unquantized, each 128-wide K block's partial product is scaled by its row's block scale.
* ``INT4_WO`` (W4A16_AWQ): ``weight`` uint8 ``[N, K/2]`` (two's-complement nibbles along K,
  ``mopt.quant.formats.int4.pack_k``), ``weight_scale`` fp32 ``[N, K/g]``; each ``g``-wide K group's
  partial product is scaled by its group scale.
* ``INT8_WO`` (W8A16): ``weight`` int8 ``[N, K]``, ``weight_scale`` fp32 ``[N]`` (epilogue).
* ``INT8_SQ`` (W8A8_SQ_PER_CHANNEL): as ``INT8_WO`` plus ``input_scale`` fp32 ``[]``: static INT8
  activations, both scales in the epilogue.
* ``MXFP8``: ``weight`` e4m3 ``[N, K]``, ``weight_scale`` uint8 E8M0 ``[N, K/32]``; activations
  MXFP8 at run time (exact values: the GEMM multiplies dequantized values).
* ``MXFP4`` / ``MXFP4_WO``: ``weight`` uint8 ``[N, K/2]`` (E2M1 codes), ``weight_scale`` uint8 E8M0
  ``[N, K/32]``; activations MXFP4 at run time / unquantized.
* ``W4A8_MXFP4``: MXFP4 weights; activations FP8 E4M3 per tensor (``input_scale`` fp32 ``[]``) or,
  with ``input_scale`` None, per token at run time.
* ``NVFP4_WO`` (W4A16_NVFP4): as ``NVFP4`` without ``input_scale``: unquantized activations times
  the weights' block values, ``weight_scale_2`` in the epilogue.
* ``W4A8_NVFP4`` (W4A8_NVFP4_FP8): as ``NVFP4`` with 32-element blocks (``weight_scale`` e4m3
  ``[N, K/32]``) and static FP8 activations (``input_scale`` fp32 ``[]``).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKEND_ENV = "MOPT_BACKEND"


class LinearScheme(enum.Enum):
    UNQUANTIZED = "unquantized"
    FP8_TENSOR = "fp8_tensor"
    FP8_CHANNEL_TOKEN = "fp8_channel_token"
    FP8_BLOCK = "fp8_block"
    NVFP4 = "nvfp4"
    FP8_BLOCK_WO = "fp8_block_weight_only"
    INT4_WO = "int4_weight_only"
    INT8_WO = "int8_weight_only"
    INT8_SQ = "int8_smoothquant"
    MXFP8 = "mxfp8"
    MXFP4 = "mxfp4"
    MXFP4_WO = "mxfp4_weight_only"
    W4A8_MXFP4 = "w4a8_mxfp4_fp8"
    NVFP4_WO = "nvfp4_weight_only"
    W4A8_NVFP4 = "w4a8_nvfp4_fp8"


@dataclass(frozen=True)
class LinearShape:
    """What a kernel may depend on besides the device: the scheme and the weight's shape."""

    scheme: LinearScheme
    in_features: int
    out_features: int


class LinearKernel:
    """A way to run one or more schemes. Subclasses set ``name``, ``backend`` and override."""

    name: str = "abstract"
    backend: str = "abstract"  # the MOPT_BACKEND value that selects it

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str]:
        raise NotImplementedError  # abstract

    @classmethod
    def can_implement(cls, shape: LinearShape) -> tuple[bool, str]:
        raise NotImplementedError  # abstract

    def process_weights(self, layer: torch.nn.Module) -> None:
        """Convert the canonical weights on ``layer`` into this kernel's layout (once)."""

    def fp8_input_scale(self, layer: torch.nn.Module) -> torch.Tensor | None:
        """The static scale under which ``apply`` also takes E4M3 codes as ``x`` (then the output is in
        ``layer.params_dtype``), so the kernel before it can quantize; None: unquantized input only."""
        return None

    def nvfp4_input_scale(self, layer: torch.nn.Module) -> torch.Tensor | None:
        """The global scale under which ``apply`` also takes marked NVFP4 block values as ``x``
        (``kernels.quantized_input``); None: it quantizes its input itself."""
        return None

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def silu_gated_rows(self, layer: torch.nn.Module) -> int:
        """The most tokens ``apply_silu_gated`` fuses for ``layer`` (0: never)."""
        return 0

    def apply_silu_gated(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                         fp8_scale: torch.Tensor | None) -> torch.Tensor | None:
        """For a fused gate/up layer (output ``[gate | up]``): ``silu(gate) * up`` in one kernel, as
        ``kernels.glue.silu_mul(self.apply(layer, x, bias), fp8_scale)`` computes it, or None where this
        kernel does not fuse it (for these inputs)."""
        return None


# Ordered candidates per device type; GPU backends register themselves in front.
_KERNELS: dict[str, list[type[LinearKernel]]] = {}


def register_linear_kernel(device_type: str, kernel: type[LinearKernel], first: bool = False) -> None:
    kernels = _KERNELS.setdefault(device_type, [])
    if kernel not in kernels:
        kernels.insert(0, kernel) if first else kernels.append(kernel)


def candidate_kernels(device_type: str) -> list[type[LinearKernel]]:
    from mopt.kernels import reference  # noqa: F401  (registers the reference kernel)

    if device_type == "cuda":
        try:
            from mopt.kernels import triton_linear  # noqa: F401
        except ImportError:
            pass
        try:
            from mopt.kernels import triton_weight_only  # noqa: F401
        except ImportError:
            pass
    return list(_KERNELS.get(device_type, [])) + [
        k for k in _KERNELS.get("any", []) if k not in _KERNELS.get(device_type, [])
    ]


def first_fitting(candidates: list, device: torch.device, target, override: str | None,
                  backend_of: Callable[[type], str]) -> tuple[type | None, list[str]]:
    """The first candidate (a class with ``name``, ``is_supported(device)`` and ``can_implement(target)``)
    whose backend is ``override`` (when given) and that fits, with why each one before it did not."""
    reasons: list[str] = []
    for candidate in candidates:
        if override is not None and backend_of(candidate) != override:
            reasons.append(f"{candidate.name}: not the requested backend {override!r}")
            continue
        ok, why = candidate.is_supported(device)
        if ok:
            ok, why = candidate.can_implement(target)
        if ok:
            return candidate, reasons
        reasons.append(f"{candidate.name}: {why}")
    return None, reasons


def select_linear_kernel(
    shape: LinearShape, device: torch.device, override: str | None = None
) -> LinearKernel:
    """The first kernel that supports ``device`` and implements ``shape``.

    ``override`` (default: the ``MOPT_BACKEND`` environment variable) restricts the choice to
    one backend (``reference``, ``cpu``, ``triton``, ``cublas``). An override no kernel on the
    device offers is an error listing why each was passed over, never silently ignored.
    """
    override = override if override is not None else os.environ.get(BACKEND_ENV) or None
    kernel, reasons = first_fitting(candidate_kernels(device.type), device, shape, override, lambda k: k.backend)
    if kernel is not None:
        return kernel()
    raise ValueError(
        f"no linear kernel for {shape.scheme.value} {shape.out_features}x{shape.in_features} "
        f"on {device}:\n  " + "\n  ".join(reasons or ["no kernels registered"])
    )


def cuda_capability(device: torch.device, need: tuple[int, int], what: str) -> tuple[bool, str]:
    """``(ok, reason)``: ``device`` is CUDA with compute capability >= ``need`` (for ``what``)."""
    if device.type != "cuda":
        return False, f"needs a CUDA device, not {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        return False, f"{what} needs compute capability >= {need[0]}.{need[1]}, device has {cap[0]}.{cap[1]}"
    return True, ""


def per_token_fp8(x2: torch.Tensor, reduce_amax: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e4m3 codes, scale [M, 1])`` of ``x2 [M, K]`` under each token's ``amax / 448``.

    The amax is over the token's whole input row. A row-parallel layer holds a slice of that row, and
    its ``reduce_token_amax`` (a MAX all-reduce over the tensor-parallel group, given as
    ``reduce_amax``) makes every rank quantize under the full row's scale, as one rank would.
    """
    from mopt.quant.formats import fp8

    if reduce_amax is None:
        return fp8.quantize_per_token(x2)
    scale = fp8.scale_from_amax(reduce_amax(x2.detach().abs().amax(dim=-1, keepdim=True).contiguous()))
    return fp8.quantize(x2, scale), scale


def layer_per_token_fp8(layer, x2: torch.Tensor, local: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 of ``x2`` as ``layer``'s input: ``local(x2)`` unless the layer holds a slice of each row
    (``reduce_token_amax``); then under the whole row's amax, through the layer's ``token_fp8_over_peers``
    (one kernel exchanging the amaxes over peer memory: ``kernels.triton_peer_amax``) where it takes ``x2``,
    else a MAX all-reduce. Both give the same bits."""
    reduce_amax = getattr(layer, "reduce_token_amax", None)
    if reduce_amax is None:
        return local(x2)
    over_peers = getattr(layer, "token_fp8_over_peers", None)
    done = over_peers(x2) if over_peers is not None else None
    return done if done is not None else per_token_fp8(x2, reduce_amax)


def flatten_tokens(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``x[..., K]`` as ``[M, K]`` plus the function that restores the leading dims."""
    lead = x.shape[:-1]
    return x.reshape(-1, x.shape[-1]), lambda y: y.reshape(*lead, y.shape[-1])
