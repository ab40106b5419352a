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
from mopt.quant.config_algos import (ModelOptFp4Config, ModelOptInt4AwqConfig, ModelOptInt8Config,
                                     ModelOptMxFp4Config, ModelOptMxFp8Config)
from mopt.quant.formats import fp8, int4, int8, mx, nvfp4

FORMATS = {
    "unquantized": None,
    "fp8": lambda: ModelOptFp8Config("FP8"),
    "fp8-pcpt": lambda: ModelOptFp8Config("FP8_PER_CHANNEL_PER_TOKEN"),
    "fp8-pb-wo": lambda: ModelOptFp8Config("FP8_PB_WO"),
    "fp8-pb-real": lambda: ModelOptFp8Config("FP8_PB_REAL"),
    "nvfp4": lambda: ModelOptNvFp4Config(),
    "int4-awq": lambda: ModelOptInt4AwqConfig("W4A16_AWQ"),
    "w4a8-awq": lambda: ModelOptInt4AwqConfig("W4A8_AWQ"),
    "int8-wo": lambda: ModelOptInt8Config("W8A16"),
    "int8-sq": lambda: ModelOptInt8Config("W8A8_SQ_PER_CHANNEL"),
    "mxfp8": lambda: ModelOptMxFp8Config("MXFP8"),
    "mxfp4": lambda: ModelOptMxFp4Config("MXFP4"),
    "w4a8-mxfp4-fp8": lambda: ModelOptMxFp4Config("W4A8_MXFP4_FP8"),
    "w4a16-nvfp4": lambda: ModelOptFp4Config("W4A16_NVFP4"),
    "w4a8-nvfp4-fp8": lambda: ModelOptFp4Config("W4A8_NVFP4_FP8"),
    "nvfp4-awq": lambda: ModelOptFp4Config("NVFP4_AWQ"),
    "nvfp4-svdquant": lambda: ModelOptFp4Config("NVFP4_SVD"),
}
# Output of row-parallel shards sums to the full layer's: no dynamic per-row/per-tensor activation scale.
ROW_SUMS = ("unquantized", "fp8", "nvfp4", "fp8-pb-wo", "fp8-pb-real", "int4-awq", "w4a8-awq", "int8-wo", "int8-sq",
            "mxfp8", "mxfp4", "w4a16-nvfp4", "w4a8-nvfp4-fp8", "nvfp4-awq", "nvfp4-svdquant")



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
    if fmt in ("fp8-pb-wo", "fp8-pb-real"):
        q, s = fp8.quantize_blocks(w)
        return {"weight": q, "weight_scale": s[:, None, :, None] if fmt == "fp8-pb-wo" else s}
    # Smoothing and SVDQuant's lora_a multiply the layer's input: one per K, shared by fused shards.
    shared = torch.Generator().manual_seed(k)
    smoothing = {"pre_quant_scale": 0.5 + torch.rand(k, generator=shared)}
    if fmt in ("int4-awq", "w4a8-awq"):
        q, s = int4.quantize(w, 128)
        out = {"weight": int4.pack_rows(q), "weight_scale": s, **smoothing}
        if fmt == "w4a8-awq":
            out.update(weight_scale_2=int4.dequantize(q, s).abs().max() / 448, input_scale=x_amax / 448)
        return out
    if fmt in ("int8-wo", "int8-sq"):
        q, s = int8.quantize_per_channel(w)
        return {"weight": q, "weight_scale": s, **({"input_scale": x_amax / 127, **smoothing} if fmt == "int8-sq" else {})}
    if fmt == "mxfp8":
        q, s = mx.quantize_mxfp8(w)
        return {"weight": q, "weight_scale": s}
    if fmt in ("mxfp4", "w4a8-mxfp4-fp8"):
        q, s = mx.quantize_mxfp4(w)
        return {"weight": q, "weight_scale": s, **({"input_scale": x_amax / 448} if fmt == "w4a8-mxfp4-fp8" else {})}
    block = 32 if fmt == "w4a8-nvfp4-fp8" else 16
    g2 = w.abs().max() / 448 if fmt == "w4a8-nvfp4-fp8" else nvfp4.global_scale_from_amax(w.abs().max())
    packed, bs = nvfp4.quantize(w, g2, block_size=block)
    out = {"weight": packed, "weight_scale": bs, "weight_scale_2": g2}
    if fmt != "w4a16-nvfp4":
        out["input_scale"] = x_amax / 448 if fmt == "w4a8-nvfp4-fp8" else nvfp4.global_scale_from_amax(x_amax)
    if fmt in ("nvfp4-awq", "nvfp4-svdquant"):
        out.update(smoothing)
    if fmt == "nvfp4-svdquant":
        out.update(svdquant_lora_a=torch.randn(8, k, generator=shared) * 0.01,
                   svdquant_lora_b=torch.randn(n, 8, generator=g) * 0.01)
    return out


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
    if hidden % 128 and fmt in ("int4-awq", "w4a8-awq"):
        pytest.skip("INT4 groups of 128 need K % 128 == 0 (ModelOpt cannot export K=576 either)")
    shards = {s: checkpoint_tensors(fmt, n, hidden, i) for i, (s, n) in
              enumerate([("q", heads * 64), ("k", kv_heads * 64), ("v", kv_heads * 64)])}
    fused = load(QKVParallelLinear(hidden, 64, heads, kv_heads, quant_config=qc(fmt), prefix="qkv",
                                   params_dtype=torch.float32), shards)
    x = torch.randn(5, hidden)
    y = fused(x)
    start = 0
    for s, tensors in shards.items():
        n = tensors["weight"].shape[0] * (2 if fmt in ("int4-awq", "w4a8-awq") else 1)  # INT4 packs row pairs
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
    if fmt in ROW_SUMS:  # no dynamic per-row activation scale: the shards sum to the full output
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


@pytest.mark.parametrize("fmt", ["w4a8-awq", "nvfp4-svdquant"])
def test_smoothed_layers_never_take_codes_from_the_layer_before(fmt):
    """On a GPU, W4A8_AWQ runs the per-tensor FP8 kernels, which also take E4M3 codes a norm/SiLU/attention
    kernel wrote under their input scale; a layer that smooths its input first (``pre_quant_scale``, as
    ModelOpt exports o_proj / down_proj) or adds SVDQuant's low-rank branch must get the unquantized input."""
    from mopt.kernels.reference import ReferenceLinearKernel

    class TakesCodes(ReferenceLinearKernel):  # stands in for hopper-fp8 on a CPU
        def fp8_input_scale(self, layer):
            return layer.input_scale

    tensors = checkpoint_tensors(fmt, 64, 128, 0)
    for smoothed in (True, False):
        if fmt == "nvfp4-svdquant" and not smoothed:
            continue
        kept = {k: v for k, v in tensors.items() if smoothed or k != "pre_quant_scale"}
        layer = load(ReplicatedLinear(128, 64, quant_config=qc(fmt), prefix="down", params_dtype=torch.float32),
                     {None: kept})
        layer.quant_method.kernel = TakesCodes()
        assert (layer.fp8_input_scale is None) == smoothed, (fmt, smoothed)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_silu_gated_reaches_the_kernel_with_the_layers_input(fmt):
    """``MergedColumnParallelLinear.silu_gated`` (the decode GEMV fused with the SiLU on GPUs) hands the
    kernel what ``apply`` would: the input smoothed first where the method smooths it. A kernel that does
    not fuse (the reference, every CPU kernel) and SVDQuant's low-rank branch give None: the model then
    runs the layer and the SiLU kernel."""
    from mopt.kernels.glue import silu_mul_reference
    from mopt.kernels.reference import ReferenceLinearKernel

    class Fuses(ReferenceLinearKernel):  # stands in for the GPU's decode GEMV, up to `rows` tokens
        rows = 3

        def silu_gated_rows(self, layer):
            return self.rows

        def apply_silu_gated(self, layer, x, bias, fp8_scale):
            assert x.numel() // x.shape[-1] <= self.rows
            return silu_mul_reference(self.apply(layer, x, bias), fp8_scale)

    layer = load(MergedColumnParallelLinear(128, [64, 64], quant_config=qc(fmt), prefix="gate_up",
                                            params_dtype=torch.float32),
                 {i: checkpoint_tensors(fmt, 64, 128, i) for i in range(2)})
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    assert layer.silu_gated(x) is None
    layer.quant_method.kernel = Fuses()
    got = layer.silu_gated(x)
    if fmt == "nvfp4-svdquant":
        assert got is None
    else:
        assert torch.equal(got, silu_mul_reference(layer(x)))
    Fuses.rows = 2  # beyond the kernel's rows: declined before any work (no smoothing pass)
    assert layer.silu_gated(x) is None
    Fuses.rows = 3
    three = MergedColumnParallelLinear(128, [64, 64, 64], prefix="three", params_dtype=torch.float32)
    uneven = MergedColumnParallelLinear(128, [64, 32], prefix="uneven", params_dtype=torch.float32)
    for other in (three, uneven):
        other.quant_method.kernel = Fuses()
        assert other.silu_gated(x) is None


def test_llama_mlp_takes_the_fused_gate_up_where_offered(monkeypatch):
    from types import SimpleNamespace

    from mopt.kernels.glue import silu_mul_reference
    from mopt.models.llama import LlamaMLP

    config = SimpleNamespace(hidden_act="silu", hidden_size=64, intermediate_size=96)
    mlp = LlamaMLP(config, None, "mlp", torch.float32)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.weight, torch.randn(96, 64, generator=g), i)
    mlp.down_proj.weight_loader(mlp.down_proj.weight, torch.randn(64, 96, generator=g))
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        layer.process_weights_after_loading()
    x = torch.randn(2, 64, generator=g)
    unfused = mlp(x)
    calls = []
    monkeypatch.setattr(mlp.gate_up_proj, "silu_gated",
                        lambda x, scale: calls.append(scale) or silu_mul_reference(mlp.gate_up_proj(x), scale))
    assert torch.equal(mlp(x), unfused) and calls == [None]
