"""mopt: run NVIDIA ModelOpt checkpoints, exact on CPU.

The names below load on first use (PEP 562), so ``import mopt`` and ``mopt --help`` do not pay for
torch, transformers or triton.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "mopt.engine.llm",
    "RequestOutput": "mopt.engine.sequence",
    "SamplingParams": "mopt.engine.sequence",
    "load_model": "mopt.engine.loader",
    # Errors: every one is a MoptError, which is a ValueError.
    "MoptError": "mopt.errors",
    "CheckpointError": "mopt.engine.checkpoint",
    "EngineArgumentError": "mopt.errors",
    "ModelConfigError": "mopt.errors",
    "QuantConfigError": "mopt.quant.config",
    "RequestError": "mopt.errors",
    "UnsupportedArchitectureError": "mopt.models.registry",
    "WeightLoadError": "mopt.layers.parameter",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
