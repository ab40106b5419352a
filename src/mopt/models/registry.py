"""Model classes by the Hugging Face ``architectures`` entry."""

from __future__ import annotations

from mopt.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from mopt.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


class UnsupportedArchitectureError(ValueError):
    """config.json names no architecture mopt implements; the message lists the supported ones."""


def model_class(architectures: list[str] | None, source: str = "config.json") -> type:
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise UnsupportedArchitectureError(
        f"{source}: unsupported architecture {architectures}; mopt supports {sorted(MODEL_REGISTRY)}"
    )
