"""Llama-family decoders: Llama 2/3.x, Mistral, SmolLM2, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norms).

Fused q/k/v and gate/up projections; checkpoint names map onto them through
``packed_modules_mapping`` (``q_proj -> (qkv_proj, "q")``). Each family reads the config fields
transformers' own modeling of it reads (biases, activation, sliding window), no more and no less;
``mopt.models.validate`` checks them before a model is built.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from mopt.errors import ModelConfigError
from mopt.kernels.glue import silu_mul
from mopt.layers.attention import Attention, AttentionMetadata
from mopt.layers.basic import RMSNorm, RotaryEmbedding, VocabEmbedding
from mopt.layers.linear import MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear

# hidden_act -> function, as transformers' ACT2FN computes them ("gelu_new" is the tanh
# approximation written out; the fused tanh form differs from it by float rounding only).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": nn.functional.silu,
    "swish": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "gelu_new": partial(nn.functional.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(nn.functional.gelu, approximate="tanh"),
}

# Which layers attend over a sliding window of ``config.sliding_window`` tokens, by family:
# none; all of them (Mistral, Mixtral, Qwen3-MoE; null means no window); those ``layer_types``
# marks "sliding_attention" (Qwen2, Qwen3, Qwen2-MoE, whose configs derive it from
# use_sliding_window and max_window_layers).
def _window_by_layer_type(config, layer: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    return config.sliding_window if layer_types and layer_types[layer] == "sliding_attention" else None


SLIDING_WINDOW_RULES: dict[str, Callable[[object, int], "int | None"]] = {
    "none": lambda config, layer: None,
    "all_layers": lambda config, layer: getattr(config, "sliding_window", None),
    "layer_types": _window_by_layer_type,
}


def config_flag(config, source: str | bool) -> bool:
    """A family's bias setting: a constant, or a config field (absent means false)."""
    return source if isinstance(source, bool) else bool(getattr(config, source, False))


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttentionBlock(nn.Module):
    def __init__(self, config, quant_config, prefix: str, params_dtype, kv_cache_dtype: str, qk_norm: bool,
                 qkv_bias: bool, o_bias: bool, rotary: RotaryEmbedding, sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads,
                                          bias=qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
                                          params_dtype=params_dtype)
        # Under tensor parallelism this rank computes its share of the heads (KV heads may be replicated).
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(self.qkv_proj.total_num_heads * self.head_dim, config.hidden_size,
                                        bias=o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj", params_dtype=params_dtype)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, f"{prefix}.q_norm") if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, f"{prefix}.k_norm") if qk_norm else None
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim**-0.5, rotary,
                              quant_config, f"{prefix}.attn", kv_cache_dtype, sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata | None,
                reduce: bool = True) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(positions, q, k, v, meta, self.o_proj.fp8_input_scale, self.o_proj.nvfp4_input_scale)
        return self.o_proj(out, reduce)


class LlamaMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with ``act`` from ``config.hidden_act``."""

    def __init__(self, config, quant_config, prefix: str, params_dtype, intermediate_size: int | None = None,
                 bias: bool = False) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ModelConfigError(f"{prefix}: hidden_act {act!r} is not supported; supported: {list(ACTIVATIONS)}")
        self.act_fn = ACTIVATIONS[act]
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
                                                       params_dtype=params_dtype)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj", params_dtype=params_dtype)

    @property
    def fp8_input_scale(self) -> torch.Tensor | None:
        return self.gate_up_proj.fp8_input_scale

    @property
    def nvfp4_input_scale(self) -> torch.Tensor | None:
        return self.gate_up_proj.nvfp4_input_scale

    partial_output = True  # forward(x, reduce=False) returns the down projection's partial sums

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        if self.act_fn is nn.functional.silu:  # writing the down projection's FP8 codes if it takes them
            scale = self.down_proj.fp8_input_scale
            act = self.gate_up_proj.silu_gated(x, scale)  # decode: one kernel for both
            if act is None:  # or its NVFP4 block values
                act = silu_mul(self.gate_up_proj(x), scale, self.down_proj.nvfp4_input_scale)
            return self.down_proj(act, reduce)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up, reduce)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block. The residual stream travels beside the hidden states so that each RMSNorm
    adds it in the same kernel: ``forward(positions, x, residual, meta) -> (x, residual)``, where the
    block's output is ``x + residual``.

    Under tensor parallelism the row-parallel o_proj and down_proj hand their partial sums to the norm
    after them, which all-reduces them (in its own kernel on one node's GPUs): ``input_group`` is set
    (by :class:`LlamaModel`) when ``x`` arrives as partial sums of the layer before (the first layer's:
    the vocabulary-parallel embedding's rows, and no residual yet), and
    ``output_group`` when this layer returns them (an MLP whose ``partial_output`` is true: dense ones,
    and mixture-of-experts blocks without a shared expert)."""

    def __init__(self, config, quant_config, prefix: str, params_dtype, kv_cache_dtype: str, flags: dict,
                 rotary: RotaryEmbedding, mlp: nn.Module | None = None, sliding_window: int | None = None,
                 mlp_bias: bool = False) -> None:
        super().__init__()
        self.self_attn = LlamaAttentionBlock(config, quant_config, f"{prefix}.self_attn", params_dtype,
                                             kv_cache_dtype, rotary=rotary, **flags, sliding_window=sliding_window)
        self.mlp = mlp if mlp is not None else LlamaMLP(config, quant_config, f"{prefix}.mlp", params_dtype,
                                                        bias=mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, f"{prefix}.input_layernorm")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                f"{prefix}.post_attention_layernorm")
        self.tp_group = self.self_attn.o_proj.tp_group
        self.input_group = None
        self.output_group = self.tp_group if getattr(self.mlp, "partial_output", False) else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Norms write E4M3 codes or NVFP4 block values when the GEMM after them takes those (static-scale
        # FP8 and W4A4 NVFP4 kernels on GPUs).
        qkv = self.self_attn.qkv_proj
        qkv_scale, qkv_nvfp4 = qkv.fp8_input_scale, qkv.nvfp4_input_scale
        if residual is None and self.input_group is None:
            x, residual = self.input_layernorm(x, fp8_scale=qkv_scale, nvfp4_scale=qkv_nvfp4), x
        else:  # the residual stream so far, or (first layer) the embedding's partial rows to sum
            x, residual = self.input_layernorm(x, residual, qkv_scale, self.input_group, qkv_nvfp4)
        x = self.self_attn(positions, x, meta, reduce=self.tp_group is None)
        x, residual = self.post_attention_layernorm(x, residual, getattr(self.mlp, "fp8_input_scale", None),
                                                    self.tp_group, getattr(self.mlp, "nvfp4_input_scale", None))
        if self.output_group is not None:
            return self.mlp(x, reduce=False), residual
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, quant_config, params_dtype, kv_cache_dtype: str, flags: dict, make_mlp=None,
                 sliding_window_of=None, mlp_bias: bool = False) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, params_dtype, "model.embed_tokens")
        self.rotary = RotaryEmbedding(config, head_dim_of(config))  # one table for every layer
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, quant_config, f"model.layers.{i}", params_dtype, kv_cache_dtype, flags,
                              self.rotary, make_mlp(i) if make_mlp is not None else None,
                              sliding_window_of(i) if sliding_window_of is not None else None, mlp_bias)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "model.norm")
        for before, layer in zip(self.layers, self.layers[1:]):
            layer.input_group = before.output_group
        if len(self.layers):  # the first norm sums the vocabulary-parallel embedding's rows
            self.layers[0].input_group = self.embed_tokens.tp_group
        self.norm_group = self.layers[-1].output_group if len(self.layers) else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                meta: AttentionMetadata | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        first = self.layers[0].input_group if len(self.layers) else None
        x, residual = self.embed_tokens(input_ids, reduce=first is None), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual, reduce_group=self.norm_group)[0]


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids [B, T]) -> logits [B, T, vocab]`` (float32), no cache.

    The engine calls ``compute_hidden(input_ids [1, N], positions [1, N], meta)`` on packed new
    tokens with a paged cache, then ``compute_logits`` on the rows it samples from.
    """

    qk_norm = False
    # Biases of q/k/v, o_proj and the MLP: a config field (absent: false) or a constant, as
    # transformers' modeling of the family has them.
    qkv_bias: str | bool = "attention_bias"
    o_bias: str | bool = "attention_bias"
    mlp_bias: str | bool = "mlp_bias"
    sliding_window_rule = "none"  # a key of SLIDING_WINDOW_RULES
    activations: tuple[str, ...] = tuple(ACTIVATIONS)
    config_fields: dict = {}  # family-specific config.json fields and their rules (models.validate)
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
                              "v_proj": ("qkv_proj", "v"), "gate_proj": ("gate_up_proj", 0),
                              "up_proj": ("gate_up_proj", 1)}
    # Mixture-of-experts checkpoints: per-expert projection name -> FusedMoE shard; module renames.
    expert_projections: dict[str, str] = {}
    module_renames: dict[str, str] = {}

    def make_mlp(self, config, quant_config, layer: int, params_dtype) -> nn.Module | None:
        """The feed-forward block of decoder layer ``layer``; ``None``: the dense Llama MLP."""
        return None

    @classmethod
    def layer_sliding_window(cls, config, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer`` (None: full causal attention)."""
        return SLIDING_WINDOW_RULES[cls.sliding_window_rule](config, layer)

    def __init__(self, config, quant_config=None, params_dtype=torch.float32, kv_cache_dtype: str = "auto") -> None:
        super().__init__()
        self.config = config
        flags = dict(qk_norm=self.qk_norm, qkv_bias=config_flag(config, self.qkv_bias),
                     o_bias=config_flag(config, self.o_bias))
        self.model = LlamaModel(config, quant_config, params_dtype, kv_cache_dtype, flags,
                                lambda i: self.make_mlp(config, quant_config, i, params_dtype),
                                lambda i: self.layer_sliding_window(config, i), config_flag(config, self.mlp_bias))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, quant_config=quant_config,
                                      prefix="lm_head", params_dtype=params_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(self.model(input_ids))

    def compute_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Float32 logits; ``gather=False`` under tensor parallelism: this rank's vocabulary columns only
        (``ParallelLMHead.shard_columns``; ``lm_head.gather`` joins them)."""
        return self.lm_head(hidden, gather).float()


class MistralForCausalLM(LlamaForCausalLM):
    qkv_bias = o_bias = mlp_bias = False
    sliding_window_rule = "all_layers"


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias, o_bias, mlp_bias = True, False, False
    sliding_window_rule = "layer_types"


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
    mlp_bias = False
    sliding_window_rule = "layer_types"
