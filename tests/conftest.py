"""Shared fixtures: tiny models quantized and exported by real NVIDIA ModelOpt at test time."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@dataclass
class Export:
    """A ModelOpt export on disk plus ModelOpt's in-memory fake-quant model it came from."""

    path: Path
    fmt: str
    fake_quant_model: torch.nn.Module
    hf_config: object
    _equivalent: torch.nn.Module | None = None

    def export_equivalent(self) -> torch.nn.Module:
        """See :func:`export_equivalent`; made once per export."""
        if self._equivalent is None:
            self._equivalent = export_equivalent(self.fake_quant_model, self.fmt)
        return self._equivalent


def export_equivalent(fake_quant_model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """ModelOpt's fake-quant model after the rewrites its export applies to the model before it writes
    tensors (``requantize_resmooth_fused_llm_layers``: fused shards' amax unified, AWQ scales averaged
    over shards and folded into norms / preceding layers), so that it computes the function the export
    describes. One export step is not a rewrite: W4A8_NVFP4_FP8's export writes ``weight_scale_2 =
    amax / 448`` where the fake quantizer uses ``amax / (6 * 448)``; the weight quantizers' amax is
    multiplied by 6 to give them the export's global scale."""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    from mopt.quantize import cpu_block_quantization

    model = copy.deepcopy(fake_quant_model)
    model.config.architectures = [type(model).__name__]
    with warnings.catch_warnings(), cpu_block_quantization():
        warnings.simplefilter("ignore")
        requantize_resmooth_fused_llm_layers(model)
    if fmt == "w4a8-nvfp4-fp8":
        from modelopt.torch.quantization.nn import TensorQuantizer

        for name, q in model.named_modules():  # dense weight_quantizer and experts' weight_quantizers.N
            if isinstance(q, TensorQuantizer) and "weight_quantizer" in name and q.is_enabled and q.amax is not None:
                q.amax = q.amax * 6
    return model.eval()


# (hidden, intermediate, heads, kv_heads): one shape on multiples of 128, one like SmolLM2 (576).
SHAPES = {
    256: dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),
    576: dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
}


def tiny_llama(hidden: int, layers: int = 2, seed: int = 0, arch: str = "llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    shape = SHAPES[hidden]
    common = dict(vocab_size=320, num_hidden_layers=layers, max_position_embeddings=256,
                  tie_word_embeddings=False, **shape)
    if arch == "qwen3":
        cfg = Qwen3Config(head_dim=64, **common)
        model = Qwen3ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(**common)
        model = LlamaForCausalLM(cfg)
    # Random init is N(0, 0.02): give weights some outliers so scales and blocks differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(1 + 3 * torch.rand(p.shape[0], 1))
    return model.eval()


_CACHE: dict[tuple, Export] = {}
# AWQ's search over its smoothing exponent, 3 steps instead of 11: the same export format, calibrated
# more coarsely, a third of the time (these fixtures test layouts and numerics, not AWQ's search).
# Passed by keyword: quantize_model's fourth parameter is ``progress``.
FAST_CALIBRATION = {fmt: {"method": "awq_lite", "alpha_step": 0.5} for fmt in ("int4-awq", "w4a8-awq", "nvfp4-awq")}


def graphs_and_eager_gpu(fmt: str, max_model_len: int, max_num_seqs: int = 16, moe: bool = False, **engine_args):
    """Two engines of the tiny dummy preset (``moe``: its Qwen3-MoE twin) in ``fmt`` on the GPU, with CUDA
    graphs and eager (skips without a GPU): what the graphs-on/off tests compare."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from mopt import LLM
    from mopt.engine.dummy import tiny_moe_preset_config, tiny_preset_config

    config = tiny_moe_preset_config() if moe else tiny_preset_config()
    kw = dict(load_format="dummy", quantization=fmt, device="cuda", max_model_len=max_model_len,
              max_num_seqs=max_num_seqs, kv_cache_memory=64 << 20, **engine_args)
    return LLM(config, **kw), LLM(config, enforce_eager=True, **kw)


def make_export(tmp_root: Path, fmt: str, hidden: int, arch: str = "llama") -> Export:
    from mopt.quantize import export_checkpoint, quantize_model

    key = (fmt, hidden, arch)
    if key not in _CACHE:
        model = tiny_llama(hidden, arch=arch)
        torch.manual_seed(1)
        calib = [torch.randint(0, 320, (2, 48)) for _ in range(2)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_model(model, fmt, calib, algorithm=FAST_CALIBRATION.get(fmt))
            path = export_checkpoint(copy.deepcopy(model), tmp_root / f"{arch}-{hidden}-{fmt}")
        _CACHE[key] = Export(path, fmt, model, model.config)
    return _CACHE[key]


@pytest.fixture(scope="session")
def export_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("modelopt_exports")
    return lambda fmt, hidden, arch="llama": make_export(root, fmt, hidden, arch)


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory):
    """``MOPT_CACHE`` for the whole session, with the default model (FP8 + FP8 KV) built once."""
    from mopt.engine import default_model

    cache = tmp_path_factory.getbasetemp() / "mopt-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOPT_CACHE", str(cache))
        default_model.build_default_model("fp8-kv", progress=False)
        yield cache


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="session")
def plain_path(tmp_path_factory):
    """The unquantized tiny Llama (hidden 256, float32 weights, no tokenizer), saved once per session."""
    path = tmp_path_factory.mktemp("plain-llama")
    tiny_llama(256).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """A tiny random Llama (vocab 320) with a byte-level tokenizer (ids 0..256) and a simple chat
    template, saved once per session (the server tests)."""
    from tiny_tokenizer import save_byte_tokenizer
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tiny_llama(256).save_pretrained(path)
    save_byte_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path
