"""Checkpoint tensors as a ModelOpt export writes them for one linear weight ``W [N, K]`` (or one expert's
projection), in the export's exact shapes and dtypes, made with mopt's reference quantizers: what dummy-weight
models (``engine.dummy``) and ``mopt bench kernels`` / ``moe`` load. :data:`TENSORS` maps each ``mopt quantize
--format`` name to its maker; :data:`QUANTIZATION` to the ``quantization`` section of its
``hf_quant_config.json`` (``quant_algo``, ``group_size``).

Choices where an export depends on calibration: static activation scales assume activations of amax
``X_AMAX``; smoothing (SmoothQuant, SVDQuant) is ``0.5 + U(0, 1)`` per input column, seeded by K, so fused
shards and an expert's gate and up projections share it as exports do; INT4 AWQ's ``pre_quant_scale`` is left
out (ModelOpt folds it into the preceding norm for q/k/v and gate/up, the layers that dominate), NVFP4_AWQ
carries one on every layer (the most it can cost); SVDQuant's low-rank branch has ModelOpt's default rank 32;
W4A8_MXFP4_FP8 has no ``input_scale`` (ModelOpt calibrates none; activations are quantized per token).

torch and the formats load when a maker runs, not on import (``mopt bench --formats`` and the dummy-format
names are checked before anything heavy loads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

X_AMAX = 4.0  # static activation amax: the benchmark's activations are N(0, 1)
SVD_RANK = 32  # NVFP4_SVDQUANT_DEFAULT_CFG's lowrank


def _fp8(w):
    from mopt.quant.formats import fp8

    q, s = fp8.quantize_per_tensor(w)
    return dict(weight=q, weight_scale=s, input_scale=_scalar(X_AMAX / 448, w))


def _fp8_pcpt(w):
    from mopt.quant.formats import fp8

    q, s = fp8.quantize_per_channel(w)
    return dict(weight=q, weight_scale=s)


def _fp8_pb_wo(w):
    from mopt.quant.formats import fp8

    q, s = fp8.quantize_blocks(w)
    return dict(weight=q, weight_scale=s[:, None, :, None])  # [N/128, 1, K/128, 1], as FP8_PB_WO writes it


def _nvfp4(w, block: int = 16, static_input: str | None = "nvfp4"):
    from mopt.quant.formats import nvfp4

    g2 = w.abs().amax() / 448 if block == 32 else nvfp4.global_scale_from_amax(w.abs().amax())
    packed, scale = nvfp4.quantize(w, g2, block_size=block)
    out = dict(weight=packed, weight_scale=scale, weight_scale_2=g2)
    if static_input == "nvfp4":
        out["input_scale"] = nvfp4.global_scale_from_amax(_scalar(X_AMAX, w))
    elif static_input == "fp8":
        out["input_scale"] = _scalar(X_AMAX / 448, w)
    return out


def _fp8_pb_real(w):
    from mopt.quant.formats import fp8

    q, s = fp8.quantize_blocks(w)
    return dict(weight=q, weight_scale=s)  # [N/128, K/128], as mtq.compress writes it


def _nvfp4_svdquant(w):
    import torch

    n, k = w.shape
    g = torch.Generator(device=w.device).manual_seed(k)
    return dict(_nvfp4(w), pre_quant_scale=_smoothing(k, w),
                svdquant_lora_a=torch.randn(SVD_RANK, k, generator=g, device=w.device) * 0.01,
                svdquant_lora_b=torch.randn(n, SVD_RANK, generator=g, device=w.device) * 0.01)


def _int4_awq(w, w4a8: bool = False):
    from mopt.quant.formats import int4

    q, s = int4.quantize(w, 128)
    out = dict(weight=int4.pack_rows(q), weight_scale=s)  # [N/2, K] row pairs, [N, K/128]
    if w4a8:
        out.update(weight_scale_2=int4.dequantize(q, s).abs().amax() / 448, input_scale=_scalar(X_AMAX / 448, w))
    return out


def _int8(w, smoothquant: bool = False):
    from mopt.quant.formats import int8

    q, s = int8.quantize_per_channel(w)
    out = dict(weight=q, weight_scale=s)
    if smoothquant:
        out.update(input_scale=_scalar(X_AMAX / 127, w), pre_quant_scale=_smoothing(w.shape[1], w))
    return out


def _mxfp8(w):
    from mopt.quant.formats import mx

    q, s = mx.quantize_mxfp8(w)
    return dict(weight=q, weight_scale=s)


def _mxfp4(w):
    from mopt.quant.formats import mx

    q, s = mx.quantize_mxfp4(w)
    return dict(weight=q, weight_scale=s)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _smoothing(k: int, like: torch.Tensor) -> torch.Tensor:
    import torch

    g = torch.Generator(device=like.device).manual_seed(k)
    return 0.5 + torch.rand(k, generator=g, device=like.device)


TENSORS: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
    "fp8": _fp8,
    "fp8-pcpt": _fp8_pcpt,
    "fp8-pb-wo": _fp8_pb_wo,
    "fp8-pb-real": _fp8_pb_real,
    "nvfp4": _nvfp4,
    "nvfp4-awq": lambda w: dict(_nvfp4(w), pre_quant_scale=_smoothing(w.shape[1], w)),
    "nvfp4-svdquant": _nvfp4_svdquant,
    "w4a16-nvfp4": lambda w: _nvfp4(w, static_input=None),
    "w4a8-nvfp4-fp8": lambda w: _nvfp4(w, 32, "fp8"),
    "int4-awq": _int4_awq,
    "w4a8-awq": lambda w: _int4_awq(w, w4a8=True),
    "int8-wo": _int8,
    "int8-sq": lambda w: _int8(w, smoothquant=True),
    "mxfp8": _mxfp8,
    "mxfp4": _mxfp4,
    "w4a8-mxfp4-fp8": _mxfp4,
}

QUANTIZATION: dict[str, dict] = {
    "fp8": {"quant_algo": "FP8"},
    "fp8-pcpt": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"},
    "fp8-pb-wo": {"quant_algo": "FP8_PB_WO"},
    "fp8-pb-real": {"quant_algo": "FP8_PB_REAL"},
    "nvfp4": {"quant_algo": "NVFP4", "group_size": 16},
    "nvfp4-awq": {"quant_algo": "NVFP4_AWQ", "group_size": 16},
    "nvfp4-svdquant": {"quant_algo": "NVFP4_SVD", "group_size": 16},
    "w4a16-nvfp4": {"quant_algo": "W4A16_NVFP4", "group_size": 16},
    "w4a8-nvfp4-fp8": {"quant_algo": "W4A8_NVFP4_FP8", "group_size": 32},
    "int4-awq": {"quant_algo": "W4A16_AWQ", "group_size": 128},
    "w4a8-awq": {"quant_algo": "W4A8_AWQ", "group_size": 128},
    "int8-wo": {"quant_algo": "W8A16"},
    "int8-sq": {"quant_algo": "W8A8_SQ_PER_CHANNEL"},
    "mxfp8": {"quant_algo": "MXFP8", "group_size": 32},
    "mxfp4": {"quant_algo": "MXFP4", "group_size": 32},
    "w4a8-mxfp4-fp8": {"quant_algo": "W4A8_MXFP4_FP8", "group_size": 32},
}
