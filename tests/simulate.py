"""Independent dequantize-and-simulate references, written from the raw checkpoint tensors.

No mopt code: these re-derive each ModelOpt format's meaning (with ModelOpt's own NVFP4QTensor for
NVFP4 activations) so mopt's layers and models can be checked against them.
"""

from __future__ import annotations

import torch

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])

def simulate_fp8_act(x, scale):
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def dequantize_weight(fmt, t):
    """Dequantize one exported shard from its raw tensors, written independently of mopt."""
    w = t["weight"]
    if fmt in ("fp8-kv", "fp8-pcpt"):
        scale = t["weight_scale"].float()
        return w.float() * (scale[:, None] if scale.dim() == 1 else scale)
    if fmt == "fp8-pb-wo":
        s = t["weight_scale"].float()[:, 0, :, 0]
        full = torch.kron(s, torch.ones(128, 128))[: w.shape[0], : w.shape[1]]
        return w.float() * full
    low, high = (w & 0xF).long(), (w >> 4).long()
    codes = torch.stack([low, high], dim=-1).reshape(w.shape[0], -1)
    scales = t["weight_scale"].float().repeat_interleave(16, dim=1)
    return E2M1[codes] * scales * t["weight_scale_2"].float()


def simulate_linear(fmt, x, shard_tensors):
    """y = act_quant(x) @ dequant(W)^T for the shards of one (possibly fused) layer."""
    outs = []
    for t in shard_tensors:
        w = dequantize_weight(fmt, t)
        if fmt == "fp8-kv":
            xq = simulate_fp8_act(x, t["input_scale"].float())
        elif fmt == "fp8-pcpt":
            amax = x.abs().amax(dim=-1, keepdim=True)
            xq = simulate_fp8_act(x, torch.where(amax > 0, amax / 448, torch.ones_like(amax)))
        elif fmt == "fp8-pb-wo":
            xq = torch.cat([
                simulate_fp8_act(g, torch.clamp_min(g.abs().amax(-1, keepdim=True) / 448, 1e-30))
                for g in x.split(128, dim=-1)], dim=-1)
        else:
            from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

            s2 = t["input_scale"].float()
            qt, s, _ = NVFP4QTensor.quantize(x.clone(), 16, weights_scaling_factor_2=s2)
            xq = qt.dequantize(dtype=torch.float32, scale=s, double_scale=s2, block_sizes={-1: 16})
        outs.append(xq.double() @ w.double().t())
    return torch.cat(outs, dim=-1).float()


class SimulatedLinear(torch.nn.Module):
    """One exported linear layer as ``act_quant(x) @ dequant(W)^T`` in float64."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.fmt, self.tensors, self.bias = fmt, tensors, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = simulate_linear(self.fmt, x.reshape(-1, x.shape[-1]), [self.tensors]).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


_KV_SCALES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    k_scale, v_scale = _KV_SCALES[module.layer_idx]
    key, value = simulate_fp8_act(key, k_scale), simulate_fp8_act(value, v_scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def simulated_model(export, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A transformers model (unfused q/k/v and gate/up) running the export's quantized function.

    Every linear layer with scales in the checkpoint becomes a :class:`SimulatedLinear`; with FP8
    KV-cache scales, keys and values after RoPE are fake-quantized in the attention function.
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
            tensors = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")
                       and not k.endswith(("k_scale", "v_scale", ".bias"))}
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, SimulatedLinear(export.fmt, tensors, module.bias))
    kv = {i: (state_dict[f"model.layers.{i}.self_attn.k_proj.k_scale"].float(),
              state_dict[f"model.layers.{i}.self_attn.v_proj.v_scale"].float())
          for i in range(config.num_hidden_layers) if f"model.layers.{i}.self_attn.k_proj.k_scale" in state_dict}
    if kv:
        _KV_SCALES.clear()
        _KV_SCALES.update(kv)
        AttentionInterface.register("sim_fp8_kv", _fp8_kv_attention)
        model.set_attn_implementation("sim_fp8_kv")
    return model
