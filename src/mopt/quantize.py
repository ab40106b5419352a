"""Quantize a Hugging Face model with NVIDIA ModelOpt and export a ModelOpt checkpoint.

A thin wrapper over ``modelopt.torch.quantization.quantize`` and
``modelopt.torch.export.export_hf_checkpoint`` (the optional ``nvidia-modelopt`` dependency):
it names the formats mopt runs, calibrates on the batches it is given, and makes ModelOpt's
NVFP4 and MX fake quantization work on CPU, where ModelOpt only ships CUDA kernels for them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from mopt.atomic import atomic_directory

if TYPE_CHECKING:  # torch loads with the first quantization, not with the format names the CLI lists
    import torch

# Format name -> ModelOpt config names whose quant_cfg lists are concatenated, in order (the first
# one's algorithm calibrates). ``NAME@pattern`` takes NAME's weight and input quantizer settings for
# the modules matching ``pattern`` only (a MIXED_PRECISION export).
FORMATS: dict[str, tuple[str, ...]] = {
    "fp8": ("FP8_DEFAULT_CFG",),
    "fp8-kv": ("FP8_DEFAULT_CFG", "FP8_KV_CFG"),
    "fp8-pcpt": ("FP8_PER_CHANNEL_PER_TOKEN_CFG",),
    "fp8-pb-wo": ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",),
    "fp8-pb-real": ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",),  # then mtq.compress (see COMPRESSED_FORMATS)
    "nvfp4": ("NVFP4_DEFAULT_CFG",),
    "nvfp4-kv": ("NVFP4_DEFAULT_CFG", "FP8_KV_CFG"),
    "nvfp4-awq": ("NVFP4_AWQ_LITE_CFG",),
    "nvfp4-svdquant": ("NVFP4_SVDQUANT_DEFAULT_CFG",),
    "w4a16-nvfp4": ("W4A16_NVFP4_CFG",),
    "w4a8-nvfp4-fp8": ("W4A8_NVFP4_FP8_CFG",),
    "int4-awq": ("INT4_AWQ_CFG",),
    "w4a8-awq": ("W4A8_AWQ_BETA_CFG",),
    "int8-wo": ("INT8_WEIGHT_ONLY_CFG",),
    "int8-sq": ("INT8_SMOOTHQUANT_CFG",),
    "mxfp8": ("MXFP8_DEFAULT_CFG",),
    "mxfp4": ("MXFP4_DEFAULT_CFG",),
    "w4a8-mxfp4-fp8": ("W4A8_MXFP4_FP8_CFG",),
    "fp8-nvfp4-kv": ("FP8_DEFAULT_CFG", "NVFP4_KV_CFG"),
    "fp8-nvfp4-affine-kv": ("FP8_DEFAULT_CFG", "NVFP4_AFFINE_KV_CFG"),
    "mixed-fp8-nvfp4": ("FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG@*mlp*"),  # attention FP8, MLPs NVFP4
}
# Formats whose weights ModelOpt real-quantizes (``mtq.compress``) before export.
COMPRESSED_FORMATS = ("fp8-pb-real",)


def _modelopt():
    try:
        import modelopt.torch.export as mte
        import modelopt.torch.quantization as mtq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "quantizing needs NVIDIA ModelOpt: pip install -e '.[quantize]' "
            "(or pip install 'nvidia-modelopt==0.47.*' requests)"
        ) from e
    return mtq, mte


def quant_config(fmt: str) -> dict:
    """The ModelOpt quantize config for a format name of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    mtq, _ = _modelopt()
    names = FORMATS[fmt]
    base = dict(getattr(mtq, names[0]))
    quant_cfg = list(base["quant_cfg"])
    for name in names[1:]:
        name, _, scope = name.partition("@")
        entries = list(getattr(mtq, name)["quant_cfg"])
        if scope:
            entries = [dict(e, quantizer_name=scope + e["quantizer_name"].lstrip("*")) for e in entries
                       if e.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer")]
        quant_cfg += entries
    base["quant_cfg"] = quant_cfg
    return base


def _nvfp4_fake_quant(inputs: torch.Tensor, block_size: int, amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 (E2M1 values, E4M3 block scales under a global scale ``amax / (6 * 448)``)."""
    import torch

    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    global_scale = amax.float().amax() / (6.0 * 448.0)
    qtensor, scale, scale_2 = NVFP4QTensor.quantize(
        inputs.detach().clone(), block_size, weights_scaling_factor_2=global_scale
    )
    return qtensor.dequantize(
        dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: block_size}
    )


def _mxfp8_fake_quant(inputs: torch.Tensor, block_size: int, amax: torch.Tensor | None) -> torch.Tensor:
    """MXFP8 (E4M3 values, E8M0 shared exponents per 32 elements)."""
    import torch

    from modelopt.torch.quantization.qtensor.mxfp8_tensor import MXFP8QTensor

    qtensor, scale = MXFP8QTensor.quantize(inputs.detach().float())
    return qtensor.dequantize(dtype=torch.float32, scale=scale)


def _mxfp4_fake_quant(inputs: torch.Tensor, block_size: int, amax: torch.Tensor | None) -> torch.Tensor:
    """MXFP4 (E2M1 values, E8M0 shared exponents per 32 elements) as ModelOpt's CUDA fake quantization
    computes it (``tensor_quant_mx.cu``: ``compute_scale_e8m0_NV``, then ``round_to_even`` on the E2M1
    table). ModelOpt's pure-torch ``MXFP4QTensor`` rounds ties toward zero instead, so on CPU it would
    compute a different function from ModelOpt on a GPU; this follows the GPU, with ModelOpt's tables."""
    import torch

    from modelopt.torch.quantization.qtensor.mxfp4_tensor import MXFP4QTensor

    blocks = inputs.detach().float().unflatten(-1, (-1, block_size))
    ratio = blocks.abs().amax(dim=-1, keepdim=True) / MXFP4QTensor.E2M1_max
    mantissa, exponent = torch.frexp(ratio)  # ceil(log2(ratio)), exactly, as the kernel's bit test
    unscale = torch.ldexp(torch.ones_like(ratio), exponent - (mantissa == 0.5).to(exponent.dtype))
    unscale = torch.where(ratio > 0, unscale, torch.ones_like(ratio))
    mag = blocks.abs() / unscale
    bounds = MXFP4QTensor.E2M1_bounds.to(mag.device)
    values = torch.tensor(MXFP4QTensor.E2M1_values, dtype=torch.float32, device=mag.device)
    index = (mag.unsqueeze(-1) > bounds).sum(-1)  # round down at a tie ...
    tie = (mag.unsqueeze(-1) == bounds).any(-1) & (index % 2 == 1)  # ... and up to the even value
    q = values[index + tie.long()] * unscale * torch.sign(blocks)
    return q.flatten(-2)


# (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) as ModelOpt passes them to its
# dynamic block quantizer -> the pure-torch ModelOpt code that computes the same fake quantization.
_CPU_BLOCK_FAKE_QUANT = {
    (4, 2, 8, 4): _nvfp4_fake_quant,  # NVFP4 (block 16) and W4A8_NVFP4_FP8's weights (block 32)
    (8, 4, 9, 8): _mxfp8_fake_quant,  # MXFP8
    (4, 2, 9, 8): _mxfp4_fake_quant,  # MXFP4
}


def _cpu_dynamic_block_quantize(
    inputs: torch.Tensor,
    block_size: int,
    amax: torch.Tensor | None,
    num_bits: int,
    exponent_bits: int,
    scale_num_bits: int,
    scale_exponent_bits: int,
) -> torch.Tensor:
    """Block fake quantization through ModelOpt's own pure-torch QTensor classes (see the table)."""
    key = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
    fake_quant = _CPU_BLOCK_FAKE_QUANT.get(key)
    if fake_quant is None:
        raise NotImplementedError(
            "no CPU route for ModelOpt's dynamic block fake quantization with num_bits="
            f"{num_bits} exponent_bits={exponent_bits} scale_bits=({scale_num_bits}, "
            f"{scale_exponent_bits}); routed: {sorted(_CPU_BLOCK_FAKE_QUANT)}"
        )
    shape, dtype = inputs.shape, inputs.dtype
    return fake_quant(inputs, block_size, amax).reshape(shape).to(dtype)


@contextlib.contextmanager
def cpu_block_quantization() -> Iterator[None]:
    """Route ModelOpt's dynamic block quantizer to its pure-torch NVFP4/MXFP8/MXFP4 code while active."""
    import modelopt.torch.quantization.tensor_quant as tq

    original = tq.dynamic_block_quantize_op
    tq.dynamic_block_quantize_op = _cpu_dynamic_block_quantize
    try:
        yield
    finally:
        tq.dynamic_block_quantize_op = original


def quantize_model(
    model: torch.nn.Module,
    fmt: str,
    calibration: Iterable[torch.Tensor],
    progress: bool = False,
    algorithm: dict | str | None = None,
) -> torch.nn.Module:
    """Quantize ``model`` in place with ModelOpt, calibrating on batches of token ids (``progress``: a
    bar over the calibration batches on stderr).

    ``algorithm`` replaces the format's calibration algorithm (e.g. a coarser AWQ search for tests)."""
    mtq, _ = _modelopt()
    batches = list(calibration)
    config = quant_config(fmt)
    if algorithm is not None:
        config["algorithm"] = algorithm

    import torch
    from tqdm.auto import tqdm

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for ids in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                m(ids.to(next(m.parameters()).device))

    with cpu_block_quantization():
        model = mtq.quantize(model, config, forward_loop)
    model.mopt_quant_format = fmt  # export_checkpoint compresses COMPRESSED_FORMATS
    return model


def export_checkpoint(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    save_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Export a ModelOpt-quantized model to ``out_dir`` atomically.

    The checkpoint is written to a temporary sibling folder and renamed into place only when
    complete, so an interrupted export never leaves a folder that looks usable.
    ``save_extra(tmp_dir)`` may add files (a tokenizer) before the rename.
    """
    import torch

    mtq, mte = _modelopt()
    out = Path(out_dir)
    if getattr(model, "mopt_quant_format", None) in COMPRESSED_FORMATS:
        mtq.compress(model)
    if getattr(model.config, "architectures", None) in (None, []):
        model.config.architectures = [type(model).__name__]
    with atomic_directory(out) as tmp:
        with cpu_block_quantization(), torch.no_grad():
            mte.export_hf_checkpoint(model, export_dir=str(tmp))
        if save_extra is not None:
            save_extra(tmp)
    return out
