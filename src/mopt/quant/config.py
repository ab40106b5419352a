"""ModelOpt quantization configs: detection, parsing, validation and the per-layer policy.

ModelOpt describes a checkpoint's quantization in one of two places:

* ``hf_quant_config.json``: ``{"producer": {...}, "quantization": {"quant_algo": "FP8",
  "kv_cache_quant_algo": "FP8", "exclude_modules": [...], "group_size": 16}}``;
* ``config.json``'s ``quantization_config``: ``{"quant_method": "modelopt", "quant_algo": ...,
  "ignore": [...], "kv_cache_scheme": {...} | "NVFP4", ...}``.

A config decides for every layer which method runs it (:meth:`get_quant_method`). Layers say
what they are through a ``quant_kind`` class attribute (``"linear"``, ``"attention"``,
``"moe"``), so this module imports no layer code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from mopt.jsonio import read_json_object
from mopt.quant import validate
from mopt.quant.config_base import (KV_CACHE_QUANT_ALGOS, QUANT_ALGOS, ModelOptQuantConfigBase,  # noqa: F401
                                    QuantConfigError, is_layer_skipped, register_quant_config)
from mopt.quant.config_fp8_nvfp4 import ModelOptFp8Config, ModelOptNvFp4Config  # noqa: F401
from mopt.quant import config_algos  # noqa: F401  (registers every other quant_algo)


def config_from_dict(config: Mapping[str, Any], source: str = "quantization config") -> ModelOptQuantConfigBase:
    """Pick the config class by ``quant_algo`` and parse ``config`` (either form)."""
    try:
        return ModelOptQuantConfigBase.from_config(config)
    except QuantConfigError as e:
        raise QuantConfigError(f"{source}: {e}") from None


def load_quant_config(checkpoint_dir: str | os.PathLike) -> ModelOptQuantConfigBase | None:
    """The quant config of a checkpoint folder, or ``None`` when it is not quantized.

    Reads ``hf_quant_config.json`` when present, else ``config.json``'s ``quantization_config``.
    A checkpoint quantized by another tool (GPTQ, AWQ, bitsandbytes, ...) is an error.
    """
    root = Path(checkpoint_dir)
    hf_quant = root / "hf_quant_config.json"
    if hf_quant.is_file():
        data = read_json_object(hf_quant, QuantConfigError)
        try:
            producer = validate.optional_dict(data.get("producer"), "producer") or {}
            name = validate.optional_str(producer.get("name"), "producer.name")
        except QuantConfigError as e:
            raise QuantConfigError(f"{hf_quant}: {e}") from None
        if name is not None and name.lower() != "modelopt":
            raise QuantConfigError(
                f"{hf_quant}: produced by {name!r}; mopt runs checkpoints made by NVIDIA ModelOpt"
            )
        if "quantization" not in data:
            raise QuantConfigError(f"{hf_quant}: missing the 'quantization' section")
        return config_from_dict(data, str(hf_quant))
    config_json = root / "config.json"
    if not config_json.is_file():
        raise QuantConfigError(f"{root}: no config.json (is this a Hugging Face checkpoint folder?)")
    quant = read_json_object(config_json, QuantConfigError).get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise QuantConfigError(f"{config_json}: quantization_config must be an object")
    method = quant.get("quant_method")
    if not isinstance(method, str) or method.lower() != "modelopt":
        raise QuantConfigError(
            f"{config_json}: quantization_config.quant_method is {quant.get('quant_method')!r}; "
            "mopt runs checkpoints quantized by NVIDIA ModelOpt (quant_method 'modelopt')"
        )
    return config_from_dict(quant, f"{config_json} quantization_config")
