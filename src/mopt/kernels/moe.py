"""Fused-MoE kernels and their selector (the mixture-of-experts counterpart of ``kernels.linear``).

A MoE method brings its processed expert weights to the canonical form of its scheme and hands
the layer to a kernel picked here; kernels read only tensors on the layer. ``E`` experts,
hidden size ``H``, intermediate size ``I``; ``w13`` stacks each expert's gate rows, then its up
rows; attributes on the ``FusedMoE`` layer:

* ``UNQUANTIZED``: ``w13_weight [E, 2I, H]``, ``w2_weight [E, H, I]`` float.
* ``FP8_TENSOR``: ``w13_weight``/``w2_weight`` e4m3 in those shapes, ``w13_scale``/``w2_scale``
  fp32 ``[E]`` (one per expert and projection), ``a13_scale``/``a2_scale`` fp32 ``[]`` (static
  activation scales, one per GEMM).
* ``NVFP4``: ``w13_weight`` uint8 ``[E, 2I, H/2]``, ``w13_weight_scale`` e4m3 ``[E, 2I, H/16]``,
  ``w13_global`` fp32 ``[E, 2I]`` (each row's ``weight_scale_2``), ``a13_global`` fp32 ``[E]``
  (each expert's input scale); ``w2_*`` likewise with ``[E, H, I/2]``, ``[E, H, I/16]``, ``[E, H]``,
  ``[E]``.

Under expert parallelism ``ids`` may hold ``E`` (one past the layer's experts): a pair routed to an
expert of another rank, which the kernel skips (it contributes nothing to this rank's output).

Kernels: ``reference`` (any device; the exact format numerics of ``kernels.reference`` per expert,
tokens grouped by expert), ``triton-fused-moe`` (CUDA; ``kernels.triton_moe``: BF16, FP8 per-tensor,
FP8 per-channel x per-token and NVFP4) and ``triton-weight-decode-moe`` (CUDA;
``kernels.triton_moe_weight_only``: every other scheme). cuBLAS has no grouped GEMM, so ``MOPT_BACKEND=cublas``
(cuBLASLt for linear layers) keeps MoE layers on Triton.
"""

from __future__ import annotations

import enum
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mopt.kernels import reference
from mopt.kernels.linear import BACKEND_ENV, LinearScheme, LinearShape, cuda_capability, layer_per_token_fp8


class MoEScheme(enum.Enum):
    UNQUANTIZED = "unquantized"
    FP8_TENSOR = "fp8_tensor"
    NVFP4 = "nvfp4"
    # Experts in a linear scheme's canonical form, stacked (see LINEAR_SCHEME_OF).
    FP8_CHANNEL_TOKEN = "fp8_channel_token"
    FP8_BLOCK_WO = "fp8_block_weight_only"
    INT8_WO = "int8_weight_only"
    INT8_SQ = "int8_smoothquant"
    MXFP8 = "mxfp8"
    MXFP4 = "mxfp4"
    MXFP4_WO = "mxfp4_weight_only"
    W4A8_MXFP4 = "w4a8_mxfp4_fp8"
    NVFP4_WO = "nvfp4_weight_only"
    W4A8_NVFP4 = "w4a8_nvfp4_fp8"


# Experts of these schemes hold the canonical tensors of the linear scheme (``mopt.kernels.linear``)
# stacked over experts: ``w13_<name> [E, ...]`` / ``w2_<name> [E, ...]`` for ``name`` in
# ``EXPERT_TENSORS`` (per-tensor scales ``[E]``); an optional ``w13_pre_quant_scale [E, H]`` /
# ``w2_pre_quant_scale [E, I]`` multiplies the expert's input first. Expert ``e`` of the reference
# kernel is the linear reference GEMM on ``w13_<name>[e]``.
LINEAR_SCHEME_OF: dict[MoEScheme, LinearScheme] = {
    scheme: LinearScheme[scheme.name] for scheme in MoEScheme
    if scheme.name not in ("UNQUANTIZED", "FP8_TENSOR", "NVFP4")
}
EXPERT_TENSORS = ("weight", "weight_scale", "weight_scale_2", "input_scale")


class MoEKernel:
    """Runs a ``FusedMoE`` layer's experts. Subclasses set ``name``, ``backends`` and override."""

    name: str = "abstract"
    backends: tuple[str, ...] = ()  # the MOPT_BACKEND values that select it

    @classmethod
    def supports(cls, scheme: MoEScheme, device: torch.device) -> tuple[bool, str]:
        raise NotImplementedError  # abstract

    @classmethod
    def capturable(cls) -> tuple[bool, str]:
        """Whether a CUDA graph can hold ``apply`` (no host work that depends on the routing)."""
        return True, ""

    def apply(self, layer: nn.Module, scheme: MoEScheme, x: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` through experts ``ids [T, k]`` weighted by ``weights [T, k]`` (float32)."""
        raise NotImplementedError  # abstract


def _gated(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


def run_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                expert_mlp: Callable[[int, torch.Tensor], torch.Tensor], num_experts: int | None = None) -> torch.Tensor:
    """Reference routing: ``expert_mlp(e, x_e) -> [n_e, H]`` for each expert with tokens, added back
    in float32 times the router weight; ids ``>= num_experts`` (other ranks' experts) are skipped."""
    t, k = ids.shape
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1).float()
    token = torch.arange(t, device=x.device).repeat_interleave(k)
    for e in flat_ids.unique().tolist():
        if num_experts is not None and e >= num_experts:
            continue
        sel = flat_ids == e
        rows = token[sel]
        out.index_add_(0, rows, expert_mlp(e, x[rows]).float() * flat_w[sel, None])
    return out.to(x.dtype)


_REFERENCE_GEMMS: dict[MoEScheme, Callable] = {
    MoEScheme.UNQUANTIZED: lambda l, w, e, x: reference.unquantized_gemm(x, getattr(l, f"{w}_weight")[e]),
    MoEScheme.FP8_TENSOR: lambda l, w, e, x: reference.fp8_tensor_gemm(
        x, getattr(l, f"{w}_weight")[e], getattr(l, f"{w}_scale")[e], getattr(l, f"a{w[1:]}_scale")),
    MoEScheme.NVFP4: lambda l, w, e, x: reference.nvfp4_gemm(
        x, getattr(l, f"{w}_weight")[e], getattr(l, f"{w}_weight_scale")[e], getattr(l, f"{w}_global")[e],
        getattr(l, f"a{w[1:]}_global")[e]),
}


class _ExpertView:
    """Expert ``e``'s ``w13`` or ``w2`` as a linear layer in its scheme's canonical form."""

    def __init__(self, layer: nn.Module, proj: str, e: int, scheme: LinearScheme) -> None:
        for name in EXPERT_TENSORS:
            stacked = getattr(layer, f"{proj}_{name}", None)
            if stacked is not None:
                setattr(self, name, stacked[e])
        in_features = layer.hidden_size if proj == "w13" else layer.intermediate_size
        self.linear_shape = LinearShape(scheme, in_features, self.weight.shape[0])
        smoothing = getattr(layer, f"{proj}_pre_quant_scale", None)
        self.pre_quant_scale = smoothing[e] if smoothing is not None else None
        if proj == "w2":  # tensor parallel over the intermediate size: w2's input is a slice of each row
            self.reduce_token_amax = getattr(layer, "reduce_token_amax", None)


def _expert_linear(layer: nn.Module, proj: str, e: int, x: torch.Tensor, scheme: LinearScheme) -> torch.Tensor:
    view = _ExpertView(layer, proj, e, scheme)
    if view.pre_quant_scale is not None:
        x = x * view.pre_quant_scale.to(x.dtype)
    return reference._GEMM_BY_SCHEME[scheme](view, x, None)


for _moe_scheme, _linear_scheme in LINEAR_SCHEME_OF.items():
    _REFERENCE_GEMMS[_moe_scheme] = (lambda s: lambda l, w, e, x: _expert_linear(l, w, e, x, s))(_linear_scheme)


class ReferenceMoEKernel(MoEKernel):
    name, backends = "reference", ("reference", "cpu", "auto")

    @classmethod
    def supports(cls, scheme, device):
        return True, ""

    @classmethod
    def capturable(cls):
        return False, "reads the routing on the host (one GEMM per expert that has tokens)"

    def apply(self, layer, scheme, x, weights, ids):
        gemm = _REFERENCE_GEMMS[scheme]
        return run_experts(x, weights, ids, lambda e, xe: gemm(layer, "w2", e, _gated(gemm(layer, "w13", e, xe))),
                           layer.num_experts)


def _triton_supports(device: torch.device, capability: tuple[int, int], what: str, module: str) -> tuple[bool, str]:
    """A Triton MoE kernel's device check: the compute capability ``what`` needs, then that ``module`` imports."""
    ok, why = cuda_capability(device, capability, what)
    if not ok:
        return ok, why
    try:
        importlib.import_module(module)
    except ImportError as e:
        return False, f"triton is not importable ({e})"
    return True, ""


class TritonFusedMoEKernel(MoEKernel):
    name, backends = "triton-fused-moe", ("triton", "cublas", "auto")
    capability = {MoEScheme.UNQUANTIZED: ((8, 0), "the BF16 path"), MoEScheme.FP8_TENSOR: ((8, 9), "FP8"),
                  MoEScheme.FP8_CHANNEL_TOKEN: ((8, 9), "FP8"), MoEScheme.NVFP4: ((8, 0), "the BF16 W4A4 path")}

    @classmethod
    def supports(cls, scheme, device):
        if scheme not in cls.capability:
            return False, f"no fused Triton kernel for {scheme.value} experts yet"
        return _triton_supports(device, *cls.capability[scheme], "mopt.kernels.triton_moe")

    def apply(self, layer, scheme, x, weights, ids):
        from mopt.kernels import triton_moe

        from mopt.kernels.triton_quant import fp8_per_token

        return triton_moe.fused_moe(x, weights, ids, *self.expert_weights(layer, scheme),
                                    foreign_pairs=getattr(layer, "expert_parallel", False),
                                    w2_input_fp8=lambda act: layer_per_token_fp8(layer, act, fp8_per_token))

    @staticmethod
    def expert_weights(layer, scheme: MoEScheme):
        from mopt.kernels.triton_moe import ExpertWeights

        if scheme is MoEScheme.FP8_TENSOR:
            return (ExpertWeights(layer.w13_weight, layer.w13_scale, input_scale=layer.a13_scale.reshape(1)),
                    ExpertWeights(layer.w2_weight, layer.w2_scale, input_scale=layer.a2_scale.reshape(1)))
        if scheme is MoEScheme.FP8_CHANNEL_TOKEN:
            return (ExpertWeights(layer.w13_weight, layer.w13_weight_scale, token_fp8=True),
                    ExpertWeights(layer.w2_weight, layer.w2_weight_scale, token_fp8=True))
        if scheme is MoEScheme.NVFP4:
            return (ExpertWeights(layer.w13_weight, layer.w13_weight_scale, layer.w13_global, layer.a13_global),
                    ExpertWeights(layer.w2_weight, layer.w2_weight_scale, layer.w2_global, layer.a2_global))
        return ExpertWeights(layer.w13_weight), ExpertWeights(layer.w2_weight)


def _mx_values(fp4: bool) -> Callable:
    """MXFP8 / MXFP4 activations: each row's exact MX values, per 32-element block (local to a rank's slice)."""
    def build(layer: nn.Module, proj: str):
        from mopt.kernels import triton_moe_weight_only, triton_quant_mx

        values = triton_quant_mx.mxfp4_values if fp4 else triton_quant_mx.mxfp8_values
        return triton_moe_weight_only.ExpertActivation(lambda rows, experts, row_div: (values(rows), None))
    return build


def _int8_smoothed(layer: nn.Module, proj: str):
    """W8A8 SmoothQuant: the input times the expert's smoothing, INT8 codes under the expert's static scale."""
    from mopt.kernels import triton_moe_weight_only
    from mopt.kernels.triton_quant import expert_static_values

    scale, smoothing = getattr(layer, f"{proj}_input_scale"), getattr(layer, f"{proj}_pre_quant_scale", None)
    return triton_moe_weight_only.ExpertActivation(
        lambda rows, experts, row_div: expert_static_values(rows, experts, scale, smoothing, True, row_div),
        per_expert=True)


def _fp8_static_or_per_token(layer: nn.Module, proj: str):
    """W4A8: FP8 codes under the expert's static scale, or each token's own where the export has none (w2's
    input then takes the whole row's amax over the ranks, ``layer_per_token_fp8``)."""
    from mopt.kernels import triton_moe_weight_only
    from mopt.kernels.triton_quant import expert_static_values, fp8_per_token

    scale = getattr(layer, f"{proj}_input_scale", None)
    if scale is None:
        def per_token(rows, experts, row_div):
            q, s = layer_per_token_fp8(layer, rows, fp8_per_token) if proj == "w2" else fp8_per_token(rows)
            return q.to(rows.dtype), s.reshape(-1)
        return triton_moe_weight_only.ExpertActivation(per_token)
    return triton_moe_weight_only.ExpertActivation(
        lambda rows, experts, row_div: expert_static_values(rows, experts, scale, None, False, row_div),
        per_expert=True)


@dataclass(frozen=True)
class _DecodedScheme:
    """A scheme on ``triton-weight-decode-moe``: its weight FORMAT (``triton_weight_decode``), the tensor holding
    its row scales, its activations (``(layer, "w13" | "w2") -> ExpertActivation``; None: unquantized) and the
    elements per NVFP4 block scale."""

    fmt: str
    row_scale: str | None = None
    activation: Callable | None = None
    fp4_group: int = 16


_DECODED_EXPERTS: dict[MoEScheme, _DecodedScheme] = {
    MoEScheme.INT8_WO: _DecodedScheme("INT8", "weight_scale"),
    MoEScheme.NVFP4_WO: _DecodedScheme("NVFP4", "weight_scale_2"),
    MoEScheme.MXFP4_WO: _DecodedScheme("MXFP4"),
    MoEScheme.FP8_BLOCK_WO: _DecodedScheme("FP8_BLOCK"),
    MoEScheme.MXFP8: _DecodedScheme("MXFP8", activation=_mx_values(fp4=False)),
    MoEScheme.MXFP4: _DecodedScheme("MXFP4", activation=_mx_values(fp4=True)),
    MoEScheme.INT8_SQ: _DecodedScheme("INT8", "weight_scale", _int8_smoothed),
    MoEScheme.W4A8_NVFP4: _DecodedScheme("NVFP4", "weight_scale_2", _fp8_static_or_per_token, fp4_group=32),
    MoEScheme.W4A8_MXFP4: _DecodedScheme("MXFP4", activation=_fp8_static_or_per_token),
}


class TritonWeightDecodeMoEKernel(MoEKernel):
    """Experts whose weights decode in registers (``kernels.triton_moe_weight_only``), in the canonical layouts of
    their linear schemes, stacked: the weight-only schemes, MX W4A4 / W8A8, W4A8 and W8A8 SmoothQuant."""

    name, backends = "triton-weight-decode-moe", ("triton", "cublas", "auto")

    @classmethod
    def supports(cls, scheme, device):
        if scheme not in _DECODED_EXPERTS:
            return False, f"not a weight-decoding scheme ({', '.join(s.value for s in _DECODED_EXPERTS)})"
        return _triton_supports(device, (8, 0), "BF16 tensor cores", "mopt.kernels.triton_moe_weight_only")

    def apply(self, layer, scheme, x, weights, ids):
        from mopt.kernels import triton_moe_weight_only, triton_weight_decode

        spec = _DECODED_EXPERTS[scheme]
        fmt = getattr(triton_weight_decode, spec.fmt)
        group = triton_weight_decode.scale_group(fmt, 128, spec.fp4_group)
        w13, w2 = (triton_moe_weight_only.DecodedExperts(
            fmt, getattr(layer, f"{proj}_weight"),
            None if spec.fmt == "INT8" else getattr(layer, f"{proj}_weight_scale"),  # INT8's is the row scale
            getattr(layer, f"{proj}_{spec.row_scale}") if spec.row_scale else None, group) for proj in ("w13", "w2"))
        act13, act2 = ((spec.activation(layer, proj) if spec.activation else None) for proj in ("w13", "w2"))
        return triton_moe_weight_only.fused_moe_weight_only(x, weights, ids, w13, w2, act13, act2,
                                                            foreign_pairs=getattr(layer, "expert_parallel", False))


MOE_KERNELS: list[type[MoEKernel]] = [TritonFusedMoEKernel, TritonWeightDecodeMoEKernel, ReferenceMoEKernel]


def select_moe_kernel(scheme: MoEScheme, device: torch.device, override: str | None = None) -> MoEKernel:
    """The first kernel that runs ``scheme`` on ``device`` (and answers to ``override``, default
    ``MOPT_BACKEND``); otherwise an error listing why each kernel was passed over."""
    override = override if override is not None else os.environ.get(BACKEND_ENV) or "auto"
    reasons = []
    for kernel in MOE_KERNELS:
        if override not in kernel.backends:
            reasons.append(f"{kernel.name}: not the requested backend {override!r}")
            continue
        ok, why = kernel.supports(scheme, device)
        if ok:
            return kernel()
        reasons.append(f"{kernel.name}: {why}")
    raise ValueError(f"no MoE kernel for {scheme.value} experts on {device}:\n  " + "\n  ".join(reasons))
