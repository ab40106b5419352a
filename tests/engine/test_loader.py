"""`mopt.load_model`: full-sequence logits against transformers and ModelOpt, and clear errors."""

import copy
import json
import shutil

import pytest
import torch

from mopt.engine.inspect import CheckpointError
from mopt.engine.loader import load_model
from mopt.layers.parameter import WeightLoadError
from mopt.models.registry import UnsupportedArchitectureError
from mopt.quantize import cpu_block_quantization


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    from conftest import tiny_llama

    out = {}
    for arch in ("llama", "qwen3"):
        for hidden in (256, 576):
            model = tiny_llama(hidden, arch=arch)
            path = tmp_path_factory.mktemp(f"{arch}{hidden}")
            model.save_pretrained(path)
            out[arch, hidden] = (model, path)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("hidden", [256, 576])
def test_unquantized_logits_equal_transformers(plain, arch, hidden):
    model, path = plain[arch, hidden]
    ids = torch.randint(0, 320, (3, 21))
    with torch.no_grad():
        # Same float32 ops in the same order: equal up to 1e-5 relative (SDPA kernels may differ).
        torch.testing.assert_close(load_model(path)(ids), model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8-kv", "fp8-pcpt", "fp8-pb-wo", "nvfp4"])
@pytest.mark.parametrize("hidden", [256, 576])
def test_quantized_logits_track_modelopt(export_factory, fmt, hidden):
    """Closer to ModelOpt's fake-quant logits than the unquantized model is, by a wide margin."""
    export = export_factory(fmt, hidden)
    ours = load_model(export.path)
    fake_model = copy.deepcopy(export.fake_quant_model)
    if fmt == "nvfp4":  # what ModelOpt's export does: one global weight scale per fused layer
        for layer in fake_model.model.layers:
            for group in ([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                          [layer.mlp.gate_proj, layer.mlp.up_proj]):
                amax = torch.stack([m.weight_quantizer.amax.float().max() for m in group]).max()
                for m in group:
                    m.weight_quantizer.amax = amax
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), cpu_block_quantization():
        fake = fake_model(ids).logits
        from mopt.quantize import _modelopt

        mtq, _ = _modelopt()
        mtq.disable_quantizer(fake_model, "*")
        plain_logits = fake_model(ids).logits
        got = ours(ids)
    d_ours = ((got - fake).norm() / fake.norm()).item()
    d_plain = ((plain_logits - fake).norm() / fake.norm()).item()
    # FP8_PB_WO: ModelOpt simulates weight-only, mopt also quantizes activations in 1x128 groups
    # (as FP8 block GEMMs do), so it is only required to be closer; the others run ModelOpt's
    # exported function and must be much closer.
    margin = 1 if fmt == "fp8-pb-wo" else 5
    assert d_ours * margin < d_plain, f"{fmt}: ours {d_ours:.2e} vs unquantized {d_plain:.2e}"


def _copy(export, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(export.path, dst)
    return dst


def test_unsupported_architecture(export_factory, tmp_path):
    ckpt = _copy(export_factory("fp8-kv", 256), tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=r"unsupported architecture \['GPT2LMHeadModel'\]; mopt supports \["):
        load_model(ckpt)


def test_missing_tensor_is_named(export_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _copy(export_factory("fp8-kv", 256), tmp_path)
    sd = load_file(ckpt / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match="no tensor for: model.layers.1.mlp.down_proj.weight"):
        load_model(ckpt)


def test_wrong_shape_names_file_and_tensor(export_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _copy(export_factory("nvfp4", 256), tmp_path)
    sd = load_file(ckpt / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.weight"] = sd["model.layers.0.self_attn.o_proj.weight"][:, :64].contiguous()
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"^model.safetensors: model.layers.0.self_attn.o_proj.weight: checkpoint tensor has shape \(256, 64\), expected size 128 along dim 1"):
        load_model(ckpt)


def test_corrupt_and_missing_files(export_factory, tmp_path):
    ckpt = _copy(export_factory("fp8-kv", 256), tmp_path)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ckpt)
    (ckpt / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(ckpt)


def test_stray_scales_and_unlisted_bf16_layers_load_with_warnings(export_factory, tmp_path, caplog):
    """lm_head.input_scale beside a float lm_head (broke vLLM) and an unquantized layer missing
    from the exclusion list both load, with warnings."""
    from safetensors.torch import load_file, save_file

    export = export_factory("fp8-kv", 256)
    ckpt = _copy(export, tmp_path)
    sd = load_file(ckpt / "model.safetensors")
    sd["lm_head.input_scale"] = torch.tensor(0.01)
    w = sd.pop("model.layers.1.mlp.down_proj.weight").float() * sd.pop("model.layers.1.mlp.down_proj.weight_scale")
    sd.pop("model.layers.1.mlp.down_proj.input_scale")
    sd["model.layers.1.mlp.down_proj.weight"] = w.to(torch.bfloat16)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    model = load_model(ckpt)
    assert "lm_head.input_scale" in caplog.text and "model.layers.1.mlp.down_proj" in caplog.text
    assert type(model.model.layers[1].mlp.down_proj.quant_method).__name__ == "UnquantizedLinearMethod"
    assert model(torch.randint(0, 320, (1, 5))).isfinite().all()
