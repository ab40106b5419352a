"""Independent dequantize-and-simulate references, written from the raw checkpoint tensors.

No mopt code: these re-derive each ModelOpt format's meaning (with ModelOpt's own NVFP4QTensor for
NVFP4 activations) so mopt's layers and models can be checked against them.
"""

from __future__ import annotations

import torch

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])

# Formats whose weights decode like these (the KV-cache and MIXED variants reuse the weights' rule).
FP8_TENSOR_FORMATS = ("fp8", "fp8-kv", "fp8-nvfp4-kv", "fp8-nvfp4-affine-kv")
NVFP4_FORMATS = ("nvfp4", "nvfp4-kv", "nvfp4-awq", "nvfp4-svdquant", "w4a16-nvfp4", "w4a8-nvfp4-fp8")
WEIGHT_ONLY = ("fp8-pb-wo", "fp8-pb-real", "int4-awq", "int8-wo", "w4a16-nvfp4")


def simulate_fp8_act(x, scale):
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def _fp4_codes(w):
    low, high = (w & 0xF).long(), (w >> 4).long()
    return torch.stack([low, high], dim=-1).reshape(w.shape[0], -1)


def _pow2(e8m0, k):
    return torch.pow(2.0, e8m0.double() - 127).float().repeat_interleave(32, dim=1)[:, :k]


def _int4_rows(w):
    nib = torch.stack([w & 0xF, w >> 4], dim=1).reshape(-1, w.shape[1]).to(torch.int16)
    return torch.where(nib > 7, nib - 16, nib).float()


def dequantize_weight(fmt, t):
    """Dequantize one exported shard from its raw tensors, written independently of mopt."""
    w = t["weight"]
    if fmt == "mixed-fp8-nvfp4":
        fmt = "fp8-kv" if w.dtype == torch.float8_e4m3fn else "nvfp4"
    if fmt in FP8_TENSOR_FORMATS or fmt == "fp8-pcpt":
        scale = t["weight_scale"].float()
        return w.float() * (scale[:, None] if scale.dim() == 1 else scale)
    if fmt in ("fp8-pb-wo", "fp8-pb-real"):
        s = t["weight_scale"].float()
        s = s.reshape(s.shape[0], s.shape[2]) if s.dim() == 4 else s.reshape(-1, 1) if s.dim() == 0 else s
        full = torch.kron(s, torch.ones(128, 128))[: w.shape[0], : w.shape[1]]
        return w.float() * full
    if fmt in ("int4-awq", "w4a8-awq"):
        q = _int4_rows(w)
        value = q * t["weight_scale"].float().repeat_interleave(q.shape[1] // t["weight_scale"].shape[1], dim=1)
        if fmt == "w4a8-awq":  # INT4 values re-quantized to FP8 per tensor by ModelOpt's second quantizer
            value = simulate_fp8_act(value, t["weight_scale_2"].float())
        return value
    if fmt in ("int8-wo", "int8-sq"):
        return w.float() * t["weight_scale"].float()[:, None]
    if fmt == "mxfp8":
        return w.float() * _pow2(t["weight_scale"], w.shape[1])
    if fmt in ("mxfp4", "w4a8-mxfp4-fp8"):
        codes = _fp4_codes(w)
        return E2M1[codes] * _pow2(t["weight_scale"], codes.shape[1])
    codes = _fp4_codes(w)
    block = codes.shape[1] // t["weight_scale"].shape[1]
    scales = t["weight_scale"].float().repeat_interleave(block, dim=1)
    return E2M1[codes] * scales * t["weight_scale_2"].float()


def _round_half_even_table(mag, grid):
    """Nearest grid value, ties to the even index (grid sorted ascending)."""
    dist = (mag.unsqueeze(-1) - grid).abs()
    best = dist.min(dim=-1, keepdim=True).values
    candidates = dist == best
    index = torch.arange(len(grid)).expand_as(dist)
    prefer = torch.where(candidates & (index % 2 == 0), index, len(grid))
    even = prefer.min(dim=-1).values
    any_idx = torch.where(candidates, index, len(grid)).min(dim=-1).values
    return grid[torch.where(even < len(grid), even, any_idx)]


def simulate_mx_act(x, elem_max, fp4):
    """Dynamic MX quantization per 32 elements: exponent ceil(log2(amax / elem_max)), ties to even."""
    blocks = x.double().unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / elem_max)), torch.full_like(amax, -127)).clamp(-127, 127)
    scaled = (blocks / torch.pow(2.0, exp)).float()
    if fp4:
        q = _round_half_even_table(scaled.abs(), E2M1[:8]) * torch.sign(scaled)
    else:
        q = scaled.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (q.double() * torch.pow(2.0, exp)).flatten(-2).float()


def simulate_activation(fmt, x, t):
    """What the layer multiplies with: the smoothed input, quantized as the format quantizes it."""
    if "pre_quant_scale" in t:
        x = x * t["pre_quant_scale"].float()
    if fmt == "mixed-fp8-nvfp4":
        fmt = "fp8-kv" if t["weight"].dtype == torch.float8_e4m3fn else "nvfp4"
    if fmt in WEIGHT_ONLY:
        return x
    if fmt in FP8_TENSOR_FORMATS or fmt in ("w4a8-awq", "w4a8-nvfp4-fp8"):
        return simulate_fp8_act(x, t["input_scale"].float())
    if fmt in ("fp8-pcpt", "w4a8-mxfp4-fp8"):
        amax = x.abs().amax(dim=-1, keepdim=True)
        return simulate_fp8_act(x, torch.where(amax > 0, amax / 448, torch.ones_like(amax)))
    if fmt == "int8-sq":
        s = t["input_scale"].float()
        return (x / s).round().clamp(-128, 127) * s
    if fmt in ("mxfp8", "mxfp4"):
        return simulate_mx_act(x, 448.0 if fmt == "mxfp8" else 6.0, fp4=fmt == "mxfp4")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    s2 = t["input_scale"].float()
    qt, s, _ = NVFP4QTensor.quantize(x.clone(), 16, weights_scaling_factor_2=s2)
    return qt.dequantize(dtype=torch.float32, scale=s, double_scale=s2, block_sizes={-1: 16})


def simulate_linear(fmt, x, shard_tensors):
    """y = act_quant(x) @ dequant(W)^T (+ SVDQuant's low-rank branch) for the shards of one layer."""
    outs = []
    for t in shard_tensors:
        w = dequantize_weight(fmt, t)
        y = simulate_activation(fmt, x, t).double() @ w.double().t()
        if "_svdquant_lora_a" in t:
            smoothed = x * t["pre_quant_scale"].float()
            y = y + (smoothed.double() @ t["_svdquant_lora_a"].double().t()) @ t["_svdquant_lora_b"].double().t()
        outs.append(y)
    return torch.cat(outs, dim=-1).float()


class SimulatedLinear(torch.nn.Module):
    """One exported linear layer as ``act_quant(x) @ dequant(W)^T`` in float64."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.fmt, self.tensors, self.bias = fmt, tensors, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = simulate_linear(self.fmt, x.reshape(-1, x.shape[-1]), [self.tensors]).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


_KV: dict[int, tuple] = {}  # layer -> (kv format, k_scale, v_scale, k_bias, v_bias)


def simulate_kv(fmt, x, scale, bias):
    """Keys/values ``[B, Hkv, T, D]`` as a cache of ``fmt`` returns them (ModelOpt's NVFP4 for NVFP4)."""
    if fmt == "FP8":
        return simulate_fp8_act(x, scale)
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    shifted = x - bias if bias is not None else x
    g = scale / 6  # exported scale is amax / 448; NVFP4's global scale is amax / (6 * 448)
    qt, s, _ = NVFP4QTensor.quantize(shifted.contiguous().clone(), 16, weights_scaling_factor_2=g)
    out = qt.dequantize(dtype=torch.float32, scale=s, double_scale=g, block_sizes={-1: 16}).reshape(x.shape)
    return out + bias if bias is not None else out


def _kv_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fmt, k_scale, v_scale, k_bias, v_bias = _KV[module.layer_idx]
    key, value = simulate_kv(fmt, key, k_scale, k_bias), simulate_kv(fmt, value, v_scale, v_bias)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def simulated_model(export, state_dict: dict[str, torch.Tensor], kv_format: str = "FP8") -> torch.nn.Module:
    """A transformers model (unfused q/k/v and gate/up) running the export's quantized function.

    Every linear layer with scales in the checkpoint becomes a :class:`SimulatedLinear`; with KV-cache
    scales, keys and values after RoPE pass through ``kv_format`` (FP8, NVFP4, NVFP4_AFFINE) in the
    attention function.
    """
    import copy

    from transformers import AttentionInterface, AutoModelForCausalLM

    config = copy.deepcopy(export.hf_config)
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config).eval()
    plain = {k: v.float() for k, v in state_dict.items() if v.dtype in (torch.float32, torch.bfloat16, torch.float16)}
    model.load_state_dict({k: v for k, v in plain.items() if k in model.state_dict()}, strict=False)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and f"{name}.weight_scale" in state_dict:
            tensors = {k[len(name) + 1:].rsplit(".", 1)[-1]: v for k, v in state_dict.items()
                       if k.startswith(name + ".") and not k.endswith(("k_scale", "v_scale", "k_bias", "v_bias", ".bias"))}
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, SimulatedLinear(export.fmt, tensors, module.bias))
    prefix = "model.layers.{}.self_attn."
    kv = {i: (kv_format, state_dict[prefix.format(i) + "k_proj.k_scale"].float(),
              state_dict[prefix.format(i) + "v_proj.v_scale"].float(),
              state_dict.get(prefix.format(i) + "k_proj.k_bias"), state_dict.get(prefix.format(i) + "v_proj.v_bias"))
          for i in range(config.num_hidden_layers) if prefix.format(i) + "k_proj.k_scale" in state_dict}
    if kv:
        _KV.clear()
        _KV.update(kv)
        AttentionInterface.register("sim_kv", _kv_attention)
        model.set_attn_implementation("sim_kv")
    return model
