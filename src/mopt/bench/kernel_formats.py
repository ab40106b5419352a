"""The linear formats ``mopt bench kernels`` times: one row per scheme the kernel selector serves.

Each entry says how ModelOpt's export writes one linear layer ``W[N, K]`` (the checkpoint tensors, made
here by mopt's reference quantizers, in the export's exact shapes and dtypes), which ``quant_algo`` and
config options read it, and which ``_scaled_mm`` GEMM (if any) is the natural baseline besides BF16
cuBLAS: the one with the same activation quantization. :func:`build_layer` loads the tensors into a
``ReplicatedLinear`` through its method's weight loaders and ``process_weights_after_loading``, exactly
as a checkpoint loads, so the kernel timed is the one the selector picks for that device.

Names are ``mopt quantize --format`` names, plus ``fp8-pb-wo-a8`` (FP8_PB_WO with vLLM's 1x128 FP8
activations, ``MOPT_FP8_PB_WO_ACTIVATIONS=fp8``) and ``mxfp4-wo`` (MXFP4 weight-only,
``MOPT_MXFP4_ACTIVATIONS=none``). Same kernels, not listed: ``fp8-pb-real`` (= ``fp8-pb-wo``), ``nvfp4-awq``
(= ``nvfp4`` plus the ``pre_quant_scale`` multiply ``nvfp4-svdquant`` shows).

Layout choices: AWQ's ``pre_quant_scale`` is left out (ModelOpt folds it into the preceding norm for
q/k/v and gate/up, the layers that dominate); SmoothQuant and SVDQuant carry theirs (as their exports
do on every layer); SVDQuant's low-rank branch has ModelOpt's default rank 32; W4A8_MXFP4_FP8 has no
``input_scale`` (ModelOpt calibrates none; activations are quantized per token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

# torch and the formats load when a layer is built, not on import: ``mopt bench kernels --formats`` is
# checked before anything heavy loads.

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


@dataclass(frozen=True)
class BenchFormat:
    """One benchmarked format: ``quant_algo`` (+ config options) and its checkpoint tensors for ``W``."""

    quant_algo: str
    tensors: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    scaled_mm: str | None = None  # "tensor" / "rowwise": _scaled_mm with the same activation scales
    fp8_mma: bool = False  # the kernel's math runs on FP8 tensor cores (for %TC); else BF16
    group_size: int | None = None  # as hf_quant_config.json writes it
    options: dict = field(default_factory=dict)  # config attributes, as the MOPT_* switches set them


FORMATS: dict[str, BenchFormat] = {
    "fp8": BenchFormat("FP8", _fp8, "tensor", fp8_mma=True),
    "fp8-pcpt": BenchFormat("FP8_PER_CHANNEL_PER_TOKEN", _fp8_pcpt, "rowwise", fp8_mma=True),
    "fp8-pb-wo": BenchFormat("FP8_PB_WO", _fp8_pb_wo),
    "fp8-pb-wo-a8": BenchFormat("FP8_PB_WO", _fp8_pb_wo, "tensor", fp8_mma=True,
                                options=dict(fp8_pb_wo_activations="fp8")),
    "nvfp4": BenchFormat("NVFP4", _nvfp4, "tensor", group_size=16),
    "nvfp4-svdquant": BenchFormat("NVFP4_SVD", _nvfp4_svdquant, "tensor", group_size=16),
    "w4a16-nvfp4": BenchFormat("W4A16_NVFP4", lambda w: _nvfp4(w, static_input=None), group_size=16),
    "w4a8-nvfp4-fp8": BenchFormat("W4A8_NVFP4_FP8", lambda w: _nvfp4(w, 32, "fp8"), "tensor", group_size=32),
    "int4-awq": BenchFormat("W4A16_AWQ", _int4_awq, group_size=128),
    "w4a8-awq": BenchFormat("W4A8_AWQ", lambda w: _int4_awq(w, w4a8=True), "tensor", fp8_mma=True,
                            group_size=128),
    "int8-wo": BenchFormat("W8A16", _int8),
    "int8-sq": BenchFormat("W8A8_SQ_PER_CHANNEL", lambda w: _int8(w, smoothquant=True)),
    "mxfp8": BenchFormat("MXFP8", _mxfp8, group_size=32),
    "mxfp4": BenchFormat("MXFP4", _mxfp4, group_size=32),
    "mxfp4-wo": BenchFormat("MXFP4", _mxfp4, group_size=32, options=dict(mxfp4_activations="none")),
    "w4a8-mxfp4-fp8": BenchFormat("W4A8_MXFP4_FP8", _mxfp4, "rowwise", group_size=32),
}


def parse_formats(text: str | None) -> list[str]:
    """``--formats`` (comma list) -> names in :data:`FORMATS`; None or ``all``: every format."""
    if text is None or text.strip() == "all":
        return list(FORMATS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown format(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(FORMATS)}")
    return names


def quant_config(name: str):
    from mopt.quant.config import config_from_dict

    spec = FORMATS[name]
    section = dict(quant_algo=spec.quant_algo, kv_cache_quant_algo=None, exclude_modules=[])
    if spec.group_size is not None:
        section["group_size"] = spec.group_size
    config = config_from_dict({"quantization": section}, f"bench format {name}")
    for key, value in spec.options.items():
        setattr(config, key, value)
    return config


def build_layer(name: str, w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A ``ReplicatedLinear`` in format ``name`` holding ``w [N, K]`` (float32, on the target device),
    loaded and processed as a checkpoint would be; its method's kernel is selected for ``w.device``.
    ``dtype``: the layer's activation dtype (default BF16)."""
    import torch

    from mopt.layers.linear import ReplicatedLinear

    dtype = dtype or torch.bfloat16
    n, k = w.shape
    with torch.device(w.device):
        layer = ReplicatedLinear(k, n, quant_config=quant_config(name), prefix=f"bench.{name}", params_dtype=dtype)
    for tensor_name, value in FORMATS[name].tensors(w).items():
        layer.weight_loader(getattr(layer, tensor_name), value)
    layer.process_weights_after_loading()
    return layer


def layer_bytes(layer: torch.nn.Module) -> int:
    """Bytes of every tensor the processed layer holds (weights, scales, smoothing, low-rank factors)."""
    tensors = {id(t): t for t in list(layer.parameters()) + list(layer.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
