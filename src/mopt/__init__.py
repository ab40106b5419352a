"""mopt: run NVIDIA ModelOpt checkpoints, exact on CPU."""

from mopt.engine.checkpoint import CheckpointError
from mopt.engine.llm import LLM
from mopt.engine.loader import load_model
from mopt.engine.sequence import RequestOutput, SamplingParams
from mopt.errors import EngineArgumentError, ModelConfigError, MoptError, RequestError
from mopt.layers.parameter import WeightLoadError
from mopt.models.registry import UnsupportedArchitectureError
from mopt.quant.config import QuantConfigError

__all__ = [
    "LLM", "RequestOutput", "SamplingParams", "load_model",
    # Errors: every one is a MoptError, which is a ValueError.
    "MoptError", "CheckpointError", "EngineArgumentError", "ModelConfigError", "QuantConfigError",
    "RequestError", "UnsupportedArchitectureError", "WeightLoadError",
]
