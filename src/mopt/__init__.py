"""mopt: run NVIDIA ModelOpt checkpoints, exact on CPU."""

from mopt.engine.llm import LLM
from mopt.engine.loader import load_model
from mopt.engine.sequence import RequestOutput, SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "load_model"]
