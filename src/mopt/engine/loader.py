"""Load a (ModelOpt-quantized or plain) Hugging Face checkpoint into a mopt model.

Tensors are streamed one at a time from the safetensors files (single or sharded) straight into
the parameters the quant methods created, so peak memory stays near the size of the quantized
model. Checkpoint names map to runtime names: q/k/v -> ``qkv_proj`` shards, gate/up ->
``gate_up_proj`` shards, ModelOpt's ``k_proj.k_scale`` / ``v_proj.v_scale`` -> the attention
layer's KV-cache scales.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mopt.engine.inspect import FLOAT_DTYPES, CheckpointError, checkpoint_files, read_safetensors_header
from mopt.layers.parameter import BaseParameter, WeightLoadError
from mopt.models.registry import model_class
from mopt.quant.checkpoint_names import QUANT_TENSOR_RENAMES
from mopt.quant.config import load_quant_config

logger = logging.getLogger(__name__)

_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")


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
    if name.endswith(".k_proj.k_scale"):
        return name.replace(".k_proj.k_scale", ".attn.k_scale"), None
    if name.endswith(".v_proj.v_scale"):
        return name.replace(".v_proj.v_scale", ".attn.v_scale"), None
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            fused, shard = packed[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return name, None


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


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               kv_cache_dtype: str = "auto", progress: bool = False) -> torch.nn.Module:
    """A mopt model whose ``forward(input_ids [B, T]) -> logits [B, T, vocab]`` runs without a cache.

    ``progress`` shows a bar over the checkpoint's tensors on stderr.
    """
    from transformers import AutoConfig

    root = Path(path)
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root}: no config.json (is this a Hugging Face checkpoint folder?)")
    try:
        config = AutoConfig.from_pretrained(root)
    except Exception as e:  # transformers raises many kinds for a bad config
        raise CheckpointError(f"{root / 'config.json'}: cannot parse ({e})") from None
    cls = model_class(getattr(config, "architectures", None), str(root / "config.json"))
    quant = load_quant_config(root)
    files = checkpoint_files(root)
    headers = {}
    for f in files:
        headers.update({k: dict(v, file=f) for k, v in read_safetensors_header(f).items()})
    if quant is not None:
        stray = _unquantized_layers(headers, quant)
        if stray:
            logger.warning("layers stored unquantized although not excluded, run unquantized: %s", stray)
            quant.exclude_modules = list(quant.exclude_modules) + stray
    if kv_cache_dtype == "auto":
        kv_cache_dtype = "fp8" if quant is not None and quant.kv_cache_quantized else "auto"
    elif kv_cache_dtype == "fp8" and (quant is None or not quant.kv_cache_quantized):
        logger.warning("--kv-cache-dtype fp8 on a checkpoint without KV-cache scales: using scale 1.0")
    device = torch.device(device)
    with torch.device(device):
        model = cls(config, quant, dtype, kv_cache_dtype)
    params = dict(model.named_parameters())
    packed = {k: v for k, v in model.packed_modules_mapping.items()}
    from safetensors import safe_open
    from tqdm.auto import tqdm

    bar = tqdm(total=len(headers), desc=f"loading {root.name}", unit="tensor", disable=not progress)
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as reader:
            for name in reader.keys():
                bar.update(1)
                target, shard = _runtime_name(name, packed, model.expert_projections, model.module_renames)
                param = params.get(target)
                if param is None:
                    if name.endswith(_SCALE_SUFFIXES):
                        logger.warning("%s: ignoring %s (its layer runs unquantized)", f.name, name)
                    elif not name.endswith("rotary_emb.inv_freq"):
                        logger.warning("%s: ignoring unexpected tensor %s", f.name, name)
                    continue
                try:
                    tensor = reader.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from None
                try:
                    param.weight_loader(param, tensor.to(device), shard)
                except WeightLoadError as e:
                    where = f"{f.name}" if str(e).startswith(name) else f"{f.name}: {name}"
                    raise WeightLoadError(f"{where}: {e}") from None
    bar.close()
    if model.tie_word_embeddings and not model.lm_head.weight.loaded:
        model.lm_head.weight_loader(model.lm_head.weight, model.model.embed_tokens.weight.data)
    missing = [p.mopt_name for p in params.values() if isinstance(p, BaseParameter) and not p.loaded
               and not p.optional and not p.mopt_name.endswith(("k_scale", "v_scale"))]
    if missing:
        raise WeightLoadError(f"{root}: checkpoint has no tensor for: {', '.join(missing[:10])}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    for module in model.modules():
        if module is not model and hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    return model.eval()
