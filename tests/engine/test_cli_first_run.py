"""What a new user sees: bad options fail fast, stdout carries only the answer, every long step shows
progress, libraries stay quiet, `mopt inspect` lists layers in numeric order."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings

import pytest

from mopt import cli
from mopt.console import quiet_libraries, status
from mopt.engine import default_model

CHATTER = ("Inserted", "Registered <class", "quantizers", "torch_dtype", "deprecated", "Loading a GGUF",
           "UserWarning", "Writing model shards")


@pytest.mark.parametrize("args,option", [
    (["generate", "--prompt", "hi", "--max-tokens", "-3"], "--max-tokens"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", "hi", "--top-k", "-2"], "--top-k"),
    (["generate", "--prompt", "hi", "--seed", "one"], "--seed"),
    (["generate", "--prompt", "hi", "--max-model-len", "0"], "--max-model-len"),
    (["generate", "--prompt", "hi", "--stop", ""], "stop"),
    (["chat", "--temperature", "nan"], "--temperature"),
    (["eval", "--context", "0"], "--context"),
    (["bench", "generate", "--tokens", "0"], "--tokens"),
    (["bench", "generate", "--batch", "1,x"], "--batch"),
    (["bench", "kernels", "--formats", "fp8,bogus"], "--formats"),
    (["inspect", "--max-layers", "-1"], "--max-layers"),
    (["generate", "--prompt", "hi", "-tp", "0"], "--tensor-parallel-size"),
    (["bench", "generate", "--tensor-parallel-size", "two"], "--tensor-parallel-size"),
])
def test_bad_options_fail_fast_without_loading(args, option, tmp_path):
    """Checked before any model is built or loaded: well under 2 s on a 2-core machine (a model load
    takes 10-20 s), the option named, and the model cache left untouched."""
    env = dict(os.environ, MOPT_CACHE=str(tmp_path / "cache"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mopt.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode in (1, 2), proc.stderr
    assert option in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "cache").exists()
    assert elapsed < 2.0, f"{args}: {elapsed:.2f} s"


@pytest.mark.parametrize("args", [["chat"], ["generate", "--chat", "--prompt", "hi"]], ids=["chat", "generate"])
def test_a_missing_chat_template_fails_before_the_model_loads(args, tmp_path, monkeypatch, capsys):
    from conftest import tiny_llama
    from tiny_tokenizer import save_byte_tokenizer

    from mopt.engine.llm import LLM

    tiny_llama(256, layers=1).save_pretrained(tmp_path)
    save_byte_tokenizer(tmp_path)  # a tokenizer without a chat template
    monkeypatch.setattr(LLM, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main([*args, str(tmp_path), "--device", "cpu", "-tp", "2"]) == 1
    assert f"mopt: error: {tmp_path}: --chat needs a tokenizer with a chat template" in capsys.readouterr().err


def test_quiet_libraries_silences_prints_warnings_and_library_logs(capfd):
    def chatter():
        print("Inserted 756 quantizers")
        warnings.warn("`torch_dtype` is deprecated!", UserWarning)
        logging.getLogger("transformers.modeling_utils").warning("Loading a GGUF checkpoint ...")

    with quiet_libraries(verbose=False):
        chatter()
    out, err = capfd.readouterr()
    assert out == "" and not any(c in err for c in CHATTER)
    with quiet_libraries(verbose=True):
        print("Inserted 756 quantizers")
    out, err = capfd.readouterr()
    assert out == "" and "Inserted 756 quantizers" in err  # verbose: shown, but never on stdout


def test_status_line_names_the_step_and_its_time(capsys):
    with status("exporting the checkpoint"):
        time.sleep(0.05)
    err = capsys.readouterr().err
    assert "exporting the checkpoint ..." in err and "exporting the checkpoint: done in" in err


def test_default_build_is_quiet_and_shows_each_step(tmp_path, monkeypatch, capfd):
    """A build through the CLI (ModelOpt quantizing and exporting a tiny stand-in for SmolLM2): every
    step has a status line or a bar on stderr, nothing reaches stdout, no library chatter."""
    from conftest import tiny_llama

    class _Tok:
        def __call__(self, text, return_tensors=None):
            import torch

            return {"input_ids": torch.randint(0, 320, (1, 300), generator=torch.Generator().manual_seed(0))}

        def save_pretrained(self, path):
            (path / "tokenizer_config.json").write_text("{}")

    monkeypatch.setenv("MOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "fetch_gguf", lambda cache=None: tmp_path / "stand-in.gguf")
    monkeypatch.setattr(default_model, "load_gguf_model", lambda gguf, dtype=None: (tiny_llama(256, layers=1), _Tok()))
    path = cli._model_path("smollm2:fp8", "fp8-kv")
    out, err = capfd.readouterr()
    assert (path / "config.json").is_file() and out == ""
    for step in ("downloading", "reading the GGUF", "quantizing with NVIDIA ModelOpt", "calibrating", "exporting"):
        assert step in err, step
    assert not any(c in err for c in CHATTER), err


@pytest.mark.slow
def test_generate_prints_only_the_answer(default_model_cache):
    env = dict(os.environ, MOPT_CACHE=str(default_model_cache))
    proc = subprocess.run([sys.executable, "-m", "mopt.cli", "generate", "--prompt", "What is the capital of France?",
                           "--max-tokens", "12"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [proc.stdout.strip()] and "Paris" in proc.stdout
    assert not any(c in proc.stdout + proc.stderr for c in CHATTER), proc.stderr


def test_inspect_lists_layers_in_numeric_order(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    layers = 12
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.zeros(4, 4) for i in range(layers)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert cli.main(["inspect", str(tmp_path), "--max-layers", "20"]) == 0
    out = capsys.readouterr().out
    positions = [out.index(f"model.layers.{i}.mlp.down_proj") for i in range(layers)]
    assert positions == sorted(positions)


@pytest.mark.parametrize("quant", [
    {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}},
    {"quantization": {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None, "exclude_modules": []}},
    {"quantization": {"quant_algo": "W4A16_AWQ", "group_size": 128, "kv_cache_quant_algo": None,
                      "exclude_modules": []}},
    {"quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "exclude_modules": [],
                      "quantized_layers": {"model.layers.0.mlp.down_proj": {"quant_algo": "FP8"}}}},
], ids=["fp8", "nvfp4", "int4-awq", "mixed"])
def test_inspect_names_methods_without_importing_torch(tmp_path, quant):
    """`mopt inspect` reads headers and the quant config only: the per-layer table names each method from
    the config without importing it, so torch (about 2.4 s of a 2-core machine's start) never loads."""
    import torch
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, **quant}))
    code = ("import sys; from mopt import cli; rc = cli.main(['inspect', sys.argv[1]]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("NO-TORCH"), run.stdout
    assert "Method" in run.stdout
