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

The checkpoint tensors and their calibration choices are ``mopt.quant.synthetic``'s, shared with dummy-weight
models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from mopt.quant.synthetic import QUANTIZATION, TENSORS

if TYPE_CHECKING:
    import torch

@dataclass(frozen=True)
class BenchFormat:
    """One benchmarked format: ``quant_algo`` (+ config options) and its checkpoint tensors for ``W``."""

    quant_algo: str
    tensors: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    scaled_mm: str | None = None  # "tensor" / "rowwise": _scaled_mm with the same activation scales
    fp8_mma: bool = False  # the kernel's math runs on FP8 tensor cores (for %TC); else BF16
    group_size: int | None = None  # as hf_quant_config.json writes it
    options: dict = field(default_factory=dict)  # config attributes, as the MOPT_* switches set them


def _bench(name: str, scaled_mm: str | None = None, fp8_mma: bool = False, tensors: str | None = None,
           **options) -> BenchFormat:
    """A benchmarked format from its ``quant.synthetic`` entry (``tensors``: another entry's tensors)."""
    section = QUANTIZATION[tensors or name]
    return BenchFormat(section["quant_algo"], TENSORS[tensors or name], scaled_mm, fp8_mma, section.get("group_size"),
                       options)


FORMATS: dict[str, BenchFormat] = {
    "fp8": _bench("fp8", "tensor", fp8_mma=True),
    "fp8-pcpt": _bench("fp8-pcpt", "rowwise", fp8_mma=True),
    "fp8-pb-wo": _bench("fp8-pb-wo"),
    "fp8-pb-wo-a8": _bench("fp8-pb-wo-a8", "tensor", fp8_mma=True, tensors="fp8-pb-wo",
                           fp8_pb_wo_activations="fp8"),
    "nvfp4": _bench("nvfp4", "tensor"),
    "nvfp4-svdquant": _bench("nvfp4-svdquant", "tensor"),
    "w4a16-nvfp4": _bench("w4a16-nvfp4"),
    "w4a8-nvfp4-fp8": _bench("w4a8-nvfp4-fp8", "tensor"),
    "int4-awq": _bench("int4-awq"),
    "w4a8-awq": _bench("w4a8-awq", "tensor", fp8_mma=True),
    "int8-wo": _bench("int8-wo"),
    "int8-sq": _bench("int8-sq"),
    "mxfp8": _bench("mxfp8"),
    "mxfp4": _bench("mxfp4"),
    "mxfp4-wo": _bench("mxfp4-wo", tensors="mxfp4", mxfp4_activations="none"),
    "w4a8-mxfp4-fp8": _bench("w4a8-mxfp4-fp8", "rowwise"),
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
