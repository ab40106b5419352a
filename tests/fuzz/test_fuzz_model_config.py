"""Fuzz config.json of tiny real checkpoints: a mopt error, or logits equal to transformers' own model
(unquantized checkpoints), or finite logits (a ModelOpt NVFP4 export, which transformers cannot run)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given

from mopt.engine.loader import load_model
from mopt.errors import MoptError
from fuzzlib import dumps, fuzz_settings, mutated, outcome

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
# Fields the families read, added to what the saved config.json already has.
KEYS = ["hidden_act", "mlp_bias", "attention_bias", "sliding_window", "use_sliding_window", "max_window_layers",
        "layer_types", "rope_theta", "rope_parameters", "rope_type", "head_dim", "rms_norm_eps", "num_hidden_layers",
        "vocab_size", "tie_word_embeddings", "architectures", "partial_rotary_factor", "factor"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, export_factory):
    import transformers as tf

    out = {"nvfp4": export_factory("nvfp4", 256).path}
    for kind, config in (("llama", tf.LlamaConfig(**SMALL)), ("qwen3", tf.Qwen3Config(head_dim=16, **SMALL))):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = path
    return out


def transformers_logits(path: Path, ids: torch.Tensor) -> torch.Tensor | None:
    """transformers' logits for the checkpoint, or None when transformers cannot load it exactly
    (it may refuse the config, or fill in weights the checkpoint lacks: no reference then)."""
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
            if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
                return None
            if type(model).__name__ not in (model.config.architectures or []):
                return None
            with torch.no_grad():
                return model(ids).logits
    except Exception:
        return None


@pytest.mark.parametrize("kind,examples", [("llama", 40), ("qwen3", 25), ("nvfp4", 20)])
def test_fuzz_model_config(checkpoints, kind, examples):
    base = json.loads((checkpoints[kind] / "config.json").read_text())
    ids = torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(0))
    quantized = "quantization_config" in base
    logging.disable(logging.WARNING)  # transformers and mopt warn about many of these configs

    @fuzz_settings(max_examples=examples)
    @given(config=mutated(base, KEYS))
    def run(config):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            os.symlink(checkpoints[kind] / "model.safetensors", root / "model.safetensors")
            if quantized:
                os.symlink(checkpoints[kind] / "hf_quant_config.json", root / "hf_quant_config.json")
            (root / "config.json").write_text(dumps(config))
            model = outcome(lambda: load_model(root))
            if isinstance(model, MoptError):
                return
            with torch.no_grad():
                logits = model(ids)
            assert logits.shape == (1, 11, model.config.vocab_size) and bool(logits.isfinite().all())
            want = None if quantized else transformers_logits(root, ids)
            if want is not None:
                # Same float32 math up to summation order (see tests/engine/test_loader.py).
                torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)

    try:
        run()
    finally:
        logging.disable(logging.NOTSET)
