"""Model classes by the Hugging Face ``architectures`` entry."""

from __future__ import annotations

from mopt.errors import MoptError
from mopt.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from mopt.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


class UnsupportedArchitectureError(MoptError):
    """config.json names no architecture mopt implements; the message lists the supported ones."""


def model_class(architectures: list[str] | None, source: str = "config.json") -> type:
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise UnsupportedArchitectureError(f"{source}: architectures must be a list of class names, "
                                           f"got {architectures!r}")
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise UnsupportedArchitectureError(
        f"{source}: unsupported architecture {architectures}; mopt supports {sorted(MODEL_REGISTRY)}"
    )
