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


def make_export(tmp_root: Path, fmt: str, hidden: int, arch: str = "llama") -> Export:
    from mopt.quantize import export_checkpoint, quantize_model

    key = (fmt, hidden, arch)
    if key not in _CACHE:
        model = tiny_llama(hidden, arch=arch)
        torch.manual_seed(1)
        calib = [torch.randint(0, 320, (2, 48)) for _ in range(2)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_model(model, fmt, calib)
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
