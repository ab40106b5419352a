"""mopt: run NVIDIA ModelOpt checkpoints, exact on CPU."""

from mopt.engine.loader import load_model

__all__ = ["load_model"]
