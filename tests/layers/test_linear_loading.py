"""Weight loading into parallel linear layers: fused partitions and TP shards for every format."""

import pytest
import torch

from mopt.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from mopt.layers.parameter import WeightLoadError
from mopt.quant.config import ModelOptFp8Config, ModelOptNvFp4Config
from mopt.quant.formats import fp8, nvfp4

FORMATS = {
    "unquantized": None,
    "fp8": lambda: ModelOptFp8Config("FP8"),
    "fp8-pcpt": lambda: ModelOptFp8Config("FP8_PER_CHANNEL_PER_TOKEN"),
    "fp8-pb-wo": lambda: ModelOptFp8Config("FP8_PB_WO"),
    "nvfp4": lambda: ModelOptNvFp4Config(),
}



@pytest.fixture(autouse=True)
def canonical_weights(monkeypatch):
    """These tests read the canonical processed weights, which the reference backend keeps."""
    monkeypatch.setenv("MOPT_BACKEND", "reference")


def checkpoint_tensors(fmt: str, n: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    """What ModelOpt would export for one linear shard W[n, k], made with our quantizers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + seed % 3)
    x_amax = torch.tensor(6.0)  # ModelOpt gives fused shards one input amax
    if fmt == "unquantized":
        return {"weight": w.to(torch.bfloat16)}
    if fmt == "fp8":
        q, s = fp8.quantize_per_tensor(w)
        return {"weight": q, "weight_scale": s, "input_scale": x_amax / 448}
    if fmt == "fp8-pcpt":
        q, s = fp8.quantize_per_channel(w)
        return {"weight": q, "weight_scale": s}
    if fmt == "fp8-pb-wo":
        q, s = fp8.quantize_blocks(w)
        return {"weight": q, "weight_scale": s[:, None, :, None]}
    g2 = nvfp4.global_scale_from_amax(w.abs().max())
    packed, bs = nvfp4.quantize(w, g2)
    return {"weight": packed, "weight_scale": bs, "weight_scale_2": g2,
            "input_scale": nvfp4.global_scale_from_amax(x_amax)}


def load(layer, tensors_by_shard):
    for shard_id, tensors in tensors_by_shard.items():
        for name, t in tensors.items():
            layer.weight_loader(getattr(layer, name), t, shard_id)
    layer.process_weights_after_loading()
    return layer


def qc(fmt):
    return FORMATS[fmt]() if FORMATS[fmt] else None


# Shard shapes: K=576 and q/k/v of 576/192/192 rows do not align to 128-row blocks.
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("hidden,heads,kv_heads", [(256, 4, 2), (576, 9, 3)])
def test_qkv_fused_equals_separate_layers(fmt, hidden, heads, kv_heads):
    shards = {s: checkpoint_tensors(fmt, n, hidden, i) for i, (s, n) in
              enumerate([("q", heads * 64), ("k", kv_heads * 64), ("v", kv_heads * 64)])}
    fused = load(QKVParallelLinear(hidden, 64, heads, kv_heads, quant_config=qc(fmt), prefix="qkv",
                                   params_dtype=torch.float32), shards)
    x = torch.randn(5, hidden)
    y = fused(x)
    start = 0
    for s, tensors in shards.items():
        n = tensors["weight"].shape[0]
        single = load(ReplicatedLinear(hidden, n, quant_config=qc(fmt), prefix=s,
                                       params_dtype=torch.float32), {None: tensors})
        ref = single(x)
        # Shards keep their own scales: only float32 accumulation order differs.
        torch.testing.assert_close(y[:, start:start + n], ref, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("tp_size", [2, 4])
def test_column_and_merged_tp_shards_concatenate_to_full(fmt, tp_size):
    k, sizes = 256, [512, 512]
    shards = {i: checkpoint_tensors(fmt, n, k, 10 + i) for i, n in enumerate(sizes)}
    full = load(MergedColumnParallelLinear(k, sizes, quant_config=qc(fmt), prefix="gate_up",
                                           params_dtype=torch.float32), shards)
    x = torch.randn(3, k)
    y = full(x)
    parts = [load(MergedColumnParallelLinear(k, sizes, quant_config=qc(fmt), prefix="gate_up",
                                             params_dtype=torch.float32, tp_rank=r, tp_size=tp_size),
                  shards)(x) for r in range(tp_size)]
    # Rank r holds rows [r*n/tp, (r+1)*n/tp) of gate and of up.
    per = [s // tp_size for s in sizes]
    for r, part in enumerate(parts):
        torch.testing.assert_close(part[:, :per[0]], y[:, r * per[0]:(r + 1) * per[0]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(part[:, per[0]:], y[:, sizes[0] + r * per[1]:sizes[0] + (r + 1) * per[1]],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_row_parallel_shards_hold_input_slices(fmt):
    k, n, tp = 512, 128, 2
    tensors = checkpoint_tensors(fmt, n, k, 3)
    full = load(RowParallelLinear(k, n, quant_config=qc(fmt), prefix="down", params_dtype=torch.float32),
                {None: tensors})
    for r in range(tp):
        part = load(RowParallelLinear(k, n, quant_config=qc(fmt), prefix="down", params_dtype=torch.float32,
                                      tp_rank=r, tp_size=tp), {None: tensors})
        for name, p in part.named_parameters():
            f = dict(full.named_parameters())[name]
            if p.dim() == 2:  # weight-like: input dim (bytes / blocks for packed / block scales)
                cols = p.shape[1]
                assert torch.equal(p.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p,
                                   (f.view(torch.uint8) if f.dtype == torch.float8_e4m3fn else f)[:, r * cols:(r + 1) * cols])
            else:  # per-tensor / per-channel scales are replicated
                assert torch.equal(p, f)
    if fmt in ("unquantized", "fp8", "nvfp4"):  # static activation scales: the shards sum to the full output
        x = torch.randn(4, k)
        parts = [load(RowParallelLinear(k, n, quant_config=qc(fmt), prefix="down", params_dtype=torch.float32,
                                        tp_rank=r, tp_size=tp), {None: tensors})(x[:, r * k // tp:(r + 1) * k // tp])
                 for r in range(tp)]
        torch.testing.assert_close(sum(parts), full(x), rtol=1e-4, atol=1e-4)


def test_kv_heads_replicated_when_fewer_than_ranks():
    shards = {s: checkpoint_tensors("fp8-pcpt", n, 128, i) for i, (s, n) in enumerate([("q", 256), ("k", 64), ("v", 64)])}
    for r in range(4):
        layer = load(QKVParallelLinear(128, 64, 4, 1, quant_config=qc("fp8-pcpt"), prefix="qkv",
                                       params_dtype=torch.float32, tp_rank=r, tp_size=4), shards)
        assert layer.weight.shape == (64 + 64 + 64, 128)
        assert torch.equal(layer.weight[64:128].view(torch.uint8), shards["k"]["weight"].view(torch.uint8))


def test_bias_is_sharded_and_added_once():
    w = torch.randn(8, 6)
    b = torch.randn(8)
    col = ColumnParallelLinear(6, 8, bias=True, params_dtype=torch.float32, prefix="c", tp_rank=1, tp_size=2)
    col.weight_loader(col.weight, w)
    col.weight_loader(col.bias, b)
    col.process_weights_after_loading()
    x = torch.randn(2, 6)
    torch.testing.assert_close(col(x), x @ w[4:].t() + b[4:])
    row = RowParallelLinear(6, 8, bias=True, params_dtype=torch.float32, prefix="r", tp_rank=1, tp_size=2)
    row.weight_loader(row.weight, w)
    row.weight_loader(row.bias, b)
    row.process_weights_after_loading()
    torch.testing.assert_close(row(x[:, 3:]), x[:, 3:] @ w[:, 3:].t())  # rank 1 adds no bias


ERRORS = [
    # (fmt, param, tensor maker, message)
    ("fp8", "weight", lambda: torch.zeros(64, 100, dtype=torch.float8_e4m3fn),
     r"qkv.weight: checkpoint tensor has shape \(64, 100\), expected \(64, 128\)"),
    ("fp8", "weight", lambda: torch.zeros(64, 128, dtype=torch.bfloat16),
     r"qkv.weight: checkpoint tensor has dtype torch.bfloat16, expected torch.float8_e4m3fn"),
    ("fp8", "weight_scale", lambda: torch.ones(3), r"qkv.weight_scale: expected a scalar"),
    ("nvfp4", "weight", lambda: torch.zeros(64, 128, dtype=torch.uint8),
     r"qkv.weight: checkpoint tensor has shape \(64, 128\), expected \(64, 64\)"),
    ("nvfp4", "weight_scale", lambda: torch.zeros(64, 8, dtype=torch.float32),
     r"qkv.weight_scale: checkpoint tensor has dtype torch.float32, expected torch.float8_e4m3fn"),
    ("fp8-pb-wo", "weight_scale", lambda: torch.ones(2, 1, 1, 1),
     r"qkv.weight_scale: checkpoint block scale has 2 row blocks, expected 1"),
    ("fp8-pcpt", "weight_scale", lambda: torch.ones(65), r"qkv.weight_scale: .*expected size 64"),
]


@pytest.mark.parametrize("fmt,param,make,message", ERRORS)
def test_loader_errors_name_parameter_and_shapes(fmt, param, make, message):
    layer = QKVParallelLinear(128, 64, 2, 1, quant_config=qc(fmt), prefix="qkv", params_dtype=torch.float32)
    with pytest.raises(WeightLoadError, match=message):
        layer.weight_loader(getattr(layer, param), make(), "k")


@pytest.mark.parametrize("loaded_for_1,message", [
    ((), r"mlp.gate_up_proj.weight \(rows 128..256 of 256\)"),  # loaded-ness is tracked per partition
    (("weight",), r"mlp.gate_up_proj.weight_scale: no checkpoint value for partition\(s\) \[1\]"),
])
def test_missing_partition_is_reported(loaded_for_1, message):
    layer = MergedColumnParallelLinear(128, [128, 128], quant_config=qc("fp8"), prefix="mlp.gate_up_proj",
                                       params_dtype=torch.float32)
    t = checkpoint_tensors("fp8", 128, 128, 0)
    for name, v in t.items():
        layer.weight_loader(getattr(layer, name), v, 0)
        if name in loaded_for_1:
            layer.weight_loader(getattr(layer, name), v, 1)
    with pytest.raises(WeightLoadError, match=message):
        layer.process_weights_after_loading()


def test_bad_shard_ids():
    layer = QKVParallelLinear(128, 64, 2, 1, prefix="qkv", params_dtype=torch.float32)
    with pytest.raises(WeightLoadError, match="must be 'q', 'k' or 'v'"):
        layer.weight_loader(layer.weight, torch.zeros(64, 128), "x")
    merged = MergedColumnParallelLinear(128, [64, 64], prefix="gu", params_dtype=torch.float32)
    with pytest.raises(WeightLoadError, match="out of range"):
        merged.weight_loader(merged.weight, torch.zeros(64, 128), 2)


def test_indivisible_tp_is_a_clear_error():
    with pytest.raises(ValueError, match=r"output size \(100\) is not divisible by the tensor-parallel size 3"):
        ColumnParallelLinear(16, 100, prefix="c", tp_rank=0, tp_size=3)
