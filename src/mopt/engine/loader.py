"""Load a (ModelOpt-quantized or plain) Hugging Face checkpoint into a mopt model.

Tensors are streamed one at a time from the safetensors files (single or sharded) straight into
the parameters the quant methods created, so peak memory stays near the size of the quantized
model. Checkpoint names map to runtime names: q/k/v -> ``qkv_proj`` shards, gate/up ->
``gate_up_proj`` shards, ModelOpt's ``k_proj.k_scale`` / ``v_proj.v_scale`` -> the attention
layer's KV-cache scales.

Everything is checked before the model is built (config.json, the quant config, every safetensors
header and the shard index), and while loading: scales must be finite and positive, every
parameter (every shard of a fused one) must receive a tensor, and a tensor with no place in the
model is an error rather than something silently dropped.

Under tensor parallelism (``tensor_parallel_size > 1``) every rank runs :func:`load_local_model`
inside its parallel state: the layers are built at their shard's shapes, and tensors are handed to
the parameters as :class:`~mopt.engine.lazy_tensor.LazyTensor` so that only the rank's slices are read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mopt.engine.args import check_device, check_dtype, check_kv_cache_dtype, check_model_path, check_parallel_args
from mopt.engine.checkpoint import FLOAT_DTYPES, CheckpointError, read_checkpoint
from mopt.engine.distributed import current_parallel_state
from mopt.engine.lazy_tensor import LazyTensor
from mopt.errors import ModelConfigError
from mopt.jsonio import read_json_object
from mopt.layers.expert_parameter import ExpertParameter
from mopt.layers.parameter import BaseParameter, WeightLoadError
from mopt.models.config import read_model_config
from mopt.models.registry import model_class
from mopt.models.validate import validate_model_config, validate_raw_config
from mopt.quant.checkpoint_names import QUANT_TENSOR_RENAMES
from mopt.quant.config import load_quant_config

logger = logging.getLogger(__name__)

_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")
_KV_SCALES = {".attn.k_scale": ".k_proj.k_scale", ".attn.v_scale": ".v_proj.v_scale"}
_ALL_SCALES = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale")
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some exports save; mopt computes them


def _runtime_name(name: str, packed: dict, experts: dict | None = None,
                  renames: dict | None = None) -> tuple[str, object]:
    """Checkpoint tensor name -> (runtime parameter name, shard id).

    Per-expert tensors ``...experts.N.<projection>.<suffix>`` map to the stacked
    ``...experts.w13_<suffix>`` / ``w2_<suffix>`` with shard id ``(w1|w3|w2, N)``.
    """
    name = QUANT_TENSOR_RENAMES.map(name)
    if renames:
        name = ".".join(renames.get(part, part) for part in name.split("."))
    parts = name.split(".")
    if experts and "experts" in parts:
        i = parts.index("experts")
        if i + 3 < len(parts) and parts[i + 1].isdigit() and parts[i + 2] in experts:
            shard = experts[parts[i + 2]]
            stacked = "w2" if shard == "w2" else "w13"
            return ".".join(parts[: i + 1] + [f"{stacked}_{'.'.join(parts[i + 3:])}"]), (shard, int(parts[i + 1]))
    for runtime, checkpoint in _KV_SCALES.items():
        if name.endswith(checkpoint):
            return name[: -len(checkpoint)] + runtime, None
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            fused, shard = packed[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return name, None


def _checkpoint_names(target: str, packed: dict) -> list[str]:
    """The checkpoint tensor names that load into runtime parameter ``target`` (one per shard)."""
    for runtime, checkpoint in _KV_SCALES.items():
        if target.endswith(runtime):
            return [target[: -len(runtime)] + checkpoint]
    parts = target.split(".")
    for i, part in enumerate(parts):
        shards = [name for name, (fused, _) in packed.items() if fused == part]
        if shards:
            return [".".join(parts[:i] + [s] + parts[i + 1:]) for s in shards]
    return [target]


def _unquantized_layers(headers: dict[str, dict], quant) -> list[str]:
    """Linear layers stored in BF16/FP16/FP32 without scales although the config quantizes them."""
    found = []
    for name, info in headers.items():
        if not name.endswith(".weight") or len(info["shape"]) != 2 or info["dtype"] not in FLOAT_DTYPES:
            continue
        module = name[: -len(".weight")]
        if "embed" in module or "norm" in module or quant.is_layer_excluded(module):
            continue
        if f"{module}.weight_scale" not in headers:
            found.append(module)
    return found


def check_scale(name: str, tensor: torch.Tensor) -> None:
    """A scale must be finite; a per-tensor scale (one value) positive. Block and channel scales may
    hold zeros (an all-zero block of weights has scale 0) but nothing negative."""
    values = tensor.float()
    if not bool(values.isfinite().all()):
        raise WeightLoadError(f"{name}: scale has non-finite values ({values[~values.isfinite()][:3].tolist()})")
    if values.numel() == 1 and not float(values.reshape(())) > 0:
        raise WeightLoadError(f"{name}: scale must be positive, got {float(values.reshape(()))}")
    if bool((values < 0).any()):
        raise WeightLoadError(f"{name}: scale has negative values ({values[values < 0][:3].tolist()})")


def _read_config(root: Path):
    """``(model class, config)`` after checking config.json field by field; the config is read
    without transformers when ``mopt.models.config`` covers it (a faster start), else by ``AutoConfig``."""
    config_path = root / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{root}: no config.json (is this a Hugging Face checkpoint folder?)")
    raw = read_json_object(config_path, CheckpointError)
    source = str(config_path)
    cls = model_class(raw.get("architectures"), source)
    validate_raw_config(raw, cls, source)
    config = read_model_config(raw)
    if config is None:
        config = _transformers_config(root, source)
    validate_model_config(raw, config, cls, source)
    return cls, config


def _transformers_config(root: Path, source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(root)
    except Exception as e:  # transformers raises many kinds for a bad config
        raise ModelConfigError(f"{source}: transformers cannot parse it ({e})") from None


def _missing_tensors(params: dict, headers: dict, packed: dict, kv_scales_required: bool) -> list[str]:
    missing = []
    for target, p in params.items():
        if not isinstance(p, BaseParameter) or p.loaded or p.optional:
            continue
        if target.endswith(tuple(_KV_SCALES)) and not kv_scales_required:
            continue
        if isinstance(p, ExpertParameter):
            missing += [f"{target} ({m})" for m in p.missing()]
            continue
        names = [n for n in _checkpoint_names(target, packed) if n not in headers]
        missing += names or [f"{target} (rows {p.unloaded_spans()})"]
    return missing


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               kv_cache_dtype: str = "auto", progress: bool = False, *, tensor_parallel_size: int = 1,
               enable_expert_parallel: bool = False) -> torch.nn.Module:
    """A mopt model whose ``forward(input_ids [B, T]) -> logits [B, T, vocab]`` runs without a cache.

    ``progress`` shows a bar over the checkpoint's tensors on stderr. ``tensor_parallel_size > 1``
    loads one shard per rank (``mopt.engine.tp_runtime``) and returns rank 0's, whose ``forward``
    runs every rank's shard; ``enable_expert_parallel`` divides MoE experts among the ranks.
    """
    check_model_path(path)
    device = check_device(device) or torch.device("cpu")
    dtype = check_dtype(dtype) or torch.float32
    kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
    check_parallel_args(tensor_parallel_size, enable_expert_parallel, device)
    if tensor_parallel_size > 1:
        from mopt.engine.tp_runtime import load_tensor_parallel

        return load_tensor_parallel("checkpoint", path, device.type, dtype, kv_cache_dtype, tensor_parallel_size,
                                    enable_expert_parallel, progress=progress)
    return load_local_model(path, device, dtype, kv_cache_dtype, progress)


def read_model_spec(root: Path):
    """``(model class, config, quant config, files, headers)`` of a checkpoint folder, all validated; layers
    stored unquantized although not excluded are added to the quant config's exclusions."""
    cls, config = _read_config(root)
    quant = load_quant_config(root)
    files, headers = read_checkpoint(root)
    if quant is not None:
        stray = _unquantized_layers(headers, quant)
        if stray:
            logger.warning("layers stored unquantized although not excluded, run unquantized: %s", stray)
            quant.exclude_modules = list(quant.exclude_modules) + stray
    return cls, config, quant, files, headers


def load_local_model(path: str | Path, device: torch.device, dtype: torch.dtype, kv_cache_dtype: str = "auto",
                     progress: bool = False) -> torch.nn.Module:
    """``load_model`` in this process: the whole model, or this rank's shard inside a parallel state."""
    root = Path(path)
    cls, config, quant, files, headers = read_model_spec(root)
    sharded = current_parallel_state().tp_size > 1
    kv_scales_required = quant is not None and quant.kv_cache_quantized
    kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, quant)
    model = build_model(config, quant, device, dtype, kv_cache_dtype, str(root / "config.json"))
    params = dict(model.named_parameters())
    packed = dict(model.packed_modules_mapping)
    from safetensors import safe_open
    from tqdm.auto import tqdm

    bar = tqdm(total=len(headers), desc=f"loading {root.name}", unit="tensor", disable=not progress)
    for f in files:
        try:
            reader_context = safe_open(f, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type
            raise CheckpointError(f"{f}: cannot open ({e})") from None
        with reader_context as reader:
            for name in reader.keys():
                bar.update(1)
                target, shard = _runtime_name(name, packed, model.expert_projections, model.module_renames)
                param = params.get(target)
                if param is None:
                    if name.endswith(_SCALE_SUFFIXES) and name.rsplit(".", 1)[0] + ".weight" in headers:
                        logger.warning("%s: ignoring %s (its layer runs unquantized)", f.name, name)
                    elif not name.endswith(_IGNORED):
                        raise WeightLoadError(
                            f"{f.name}: tensor {name} has no place in {cls.__name__} as config.json describes "
                            f"it (runtime name {target}); wrong config.json, or a tensor of another model?"
                        )
                    continue
                is_scale = name.rsplit(".", 1)[-1] in _ALL_SCALES
                if sharded and not is_scale:  # read only this rank's slice (see lazy_tensor)
                    tensor = LazyTensor(reader, name, headers[name], device)
                else:
                    try:
                        tensor = reader.get_tensor(name)
                    except Exception as e:
                        raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from None
                try:
                    if is_scale:
                        check_scale(name, tensor)
                    param.weight_loader(param, tensor if isinstance(tensor, LazyTensor) else tensor.to(device), shard)
                except WeightLoadError as e:
                    where = f"{f.name}" if str(e).startswith(name) else f"{f.name}: {name}"
                    raise WeightLoadError(f"{where}: {e}") from None
    bar.close()
    return finish_loading(model, str(root), headers, kv_scales_required, progress)


def resolve_kv_cache_dtype(kv_cache_dtype: str, quant) -> str:
    """``"auto"`` becomes ``"fp8"`` when the quant config has KV-cache scales."""
    if kv_cache_dtype == "auto":
        return "fp8" if quant is not None and quant.kv_cache_quantized else "auto"
    if kv_cache_dtype == "fp8" and (quant is None or not quant.kv_cache_quantized):
        logger.warning("--kv-cache-dtype fp8 on a checkpoint without KV-cache scales: using scale 1.0")
    return kv_cache_dtype


def build_model(config, quant, device: torch.device, dtype: torch.dtype, kv_cache_dtype: str,
                source: str = "config.json") -> torch.nn.Module:
    """The model class of ``config``'s architecture with every layer's method's parameters, on ``device``
    (empty: a checkpoint or dummy weights fill them through their weight loaders)."""
    cls = model_class(getattr(config, "architectures", None), source)
    with torch.device(device):
        return cls(config, quant, dtype, kv_cache_dtype)


def finish_loading(model: torch.nn.Module, source: str, headers: dict | None = None,
                   kv_scales_required: bool = False, progress: bool = False) -> torch.nn.Module:
    """After every tensor went through its loader: tie embeddings, refuse missing tensors (named as the
    checkpoint would name them, from ``headers``), and let each layer's method convert its weights
    once (``process_weights_after_loading``)."""
    params = dict(model.named_parameters())
    if model.tie_word_embeddings and not model.lm_head.weight.loaded:
        tie = getattr(model.lm_head, "tie_to", None)  # vocabulary-parallel heads copy their own rows
        if tie is not None:
            tie(model.model.embed_tokens)
        else:
            model.lm_head.weight_loader(model.lm_head.weight, model.model.embed_tokens.weight.data)
    missing = _missing_tensors(params, headers or {}, dict(model.packed_modules_mapping), kv_scales_required)
    if missing:
        raise WeightLoadError(f"{source}: checkpoint has no tensor for: {', '.join(missing[:10])}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    from tqdm.auto import tqdm

    modules = [m for m in model.modules() if m is not model and hasattr(m, "process_weights_after_loading")]
    # Kernels convert weights to their layouts here (on CPUs: FP8/NVFP4 decoded once), a few seconds for
    # larger models: shown, not silent.
    for module in tqdm(modules, desc="preparing kernels", unit="layer", disable=not progress):
        module.process_weights_after_loading()
    return model.eval()
