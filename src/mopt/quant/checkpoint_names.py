"""Checkpoint tensor names of quantization data that differ from the runtime parameter names.

ModelOpt 0.47's LLM export writes SVDQuant's low-rank factors under the weight quantizer
(``q_proj.weight_quantizer._svdquant_lora_a``; its diffusers export promotes them to
``svdquant_lora_a``) and NVFP4_AFFINE's KV-cache biases beside the scales on k/v projections
(``k_proj.k_bias``); the loader applies these renames before its own (fused shards, experts).
"""

from __future__ import annotations

from mopt.names import NameMapper

QUANT_TENSOR_RENAMES = NameMapper(suffix={
    ".weight_quantizer._svdquant_lora_a": ".svdquant_lora_a",
    ".weight_quantizer._svdquant_lora_b": ".svdquant_lora_b",
    ".k_proj.k_bias": ".attn.k_bias",
    ".v_proj.v_bias": ".attn.v_bias",
})
