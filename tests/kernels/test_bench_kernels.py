"""``mopt bench kernels``: a row per linear scheme the GPU selector serves, layers built in each format's
checkpoint layout, the whole benchmark's code run on a CPU (timings there mean nothing), and its options.

Accuracy bound of a bench layer against the unquantized layer it was made from (``W ~ N(0, 0.02)``, inputs
``N(0, 1)``, 384x256, relative L2, measured 2026-11-27 on the CPU backend): 8-bit formats 0.007-0.038
(bound 0.06), 4-bit formats 0.096-0.170 (bound 0.25). A wrong packing order, scale layout or scale
convention gives ~1 or more.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from mopt import cli
from mopt.bench import kernel_formats, kernels
from mopt.quant import synthetic
from mopt.kernels.linear import LinearScheme

# format: (scheme the method runs, bound against the unquantized layer)
EXPECTED = {
    "fp8": ("fp8_tensor", 0.06), "fp8-pcpt": ("fp8_channel_token", 0.06),
    "fp8-pb-wo": ("fp8_block_weight_only", 0.06), "fp8-pb-wo-a8": ("fp8_block", 0.06),
    "nvfp4": ("nvfp4", 0.25), "nvfp4-svdquant": ("nvfp4", 0.25), "w4a16-nvfp4": ("nvfp4_weight_only", 0.25),
    "w4a8-nvfp4-fp8": ("w4a8_nvfp4_fp8", 0.25), "int4-awq": ("int4_weight_only", 0.25),
    "w4a8-awq": ("fp8_tensor", 0.25), "int8-wo": ("int8_weight_only", 0.06), "int8-sq": ("int8_smoothquant", 0.06),
    "mxfp8": ("mxfp8", 0.06), "mxfp4": ("mxfp4", 0.25), "mxfp4-wo": ("mxfp4_weight_only", 0.25),
    "w4a8-mxfp4-fp8": ("w4a8_mxfp4_fp8", 0.25),
}
W = torch.randn(384, 256, generator=torch.Generator().manual_seed(0)) * 0.02
X = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))


def test_table_lists_every_format():
    assert set(EXPECTED) == set(kernel_formats.FORMATS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bench_layer_runs_its_format(name):
    """Loaded through the method's loaders: the scheme the selector sees, and the layer's function."""
    layer = kernel_formats.build_layer(name, W, torch.float32)
    scheme, bound = EXPECTED[name]
    assert layer.linear_shape.scheme.value == scheme
    x = X * layer.pre_quant_scale if getattr(layer, "pre_quant_scale", None) is not None else X
    want = x @ W.t()
    if hasattr(layer, "svdquant_lora_a"):
        want = want + x @ layer.svdquant_lora_a.t() @ layer.svdquant_lora_b.t()
    with torch.no_grad():
        got = layer(X)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= bound, f"{name}: {rel:.3f}"


def test_every_gpu_scheme_has_a_bench_row():
    """Every quantized scheme a registered CUDA kernel implements is one bench format's scheme."""
    pytest.importorskip("triton")
    from mopt.kernels.linear import candidate_kernels

    served = {s for k in candidate_kernels("cuda") for s in getattr(k, "schemes", ())} - {LinearScheme.UNQUANTIZED}
    benched = {LinearScheme(scheme) for scheme, _ in EXPECTED.values()}
    assert served and served <= benched, sorted(s.value for s in served - benched)


def test_bench_kernels_code_runs_on_cpu(tmp_path):
    """The GPU run's code path (layers, baselines incl. ``_scaled_mm``, rows, table, partial JSON) on a CPU."""
    saved = []
    rows = kernels.bench_kernels([(256, 384)], [1, 3], list(EXPECTED), iters=1, repeats=1, device="cpu",
                                 timer=kernels.wall_time, on_rows=lambda r: saved.append(len(r)), l2_bytes=0)
    assert [r for r in rows if "error" in r] == []
    assert {(r["format"], r["m"]) for r in rows} == {(f, m) for f in EXPECTED for m in (1, 3)}
    assert saved == [2 * (i + 1) for i in range(len(EXPECTED))]
    for r in rows:
        assert r["scheme"] == EXPECTED[r["format"]][0]
        assert (r["scaled_mm_us"] is None) == (kernel_formats.FORMATS[r["format"]].scaled_mm is None)
    table = kernels.format_rows(rows, "cpu")
    assert all(f" {name} " in table for name in EXPECTED)
    json.dumps(rows)


def test_failed_format_is_a_row_not_a_crash(monkeypatch):
    def broken(w):
        raise ValueError("no such layout")

    monkeypatch.setitem(kernel_formats.FORMATS, "int8-wo", kernel_formats.BenchFormat("W8A16", broken))
    rows = kernels.bench_kernels([(64, 128)], [1], ["int8-wo", "fp8"], iters=1, repeats=1, device="cpu",
                                 timer=kernels.wall_time, l2_bytes=0)
    assert rows[0]["error"] == "ValueError: no such layout" and rows[1]["format"] == "fp8"
    assert "error: ValueError: no such layout" in kernels.format_rows(rows, "cpu")


@pytest.mark.parametrize("args,message", [
    (["--formats", "int4-awq,nope"], "--formats: unknown format(s) nope"),
    (["--shapes", "4096"], "--shapes: expected comma-separated NxK"),
    (["--tokens", "1,0"], "--tokens: expected comma-separated positive integers"),
])
def test_bad_options_are_named(args, message, capsys):
    assert cli.main(["bench", "kernels", *args]) == 1
    assert message in capsys.readouterr().err


def test_refuses_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["bench", "kernels", "--formats", "int4-awq,mxfp8", "--tokens", "1"]) == 1
    assert "mopt bench kernels needs a CUDA GPU" in capsys.readouterr().err


def test_cli_prints_progress_table_and_json(monkeypatch, tmp_path, capsys):
    """The command end to end, on a CPU posing as a GPU (the CPU runs the same code, see above)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(kernels, "bench_kernels", functools.partial(kernels.bench_kernels, device="cpu",
                                                                    timer=kernels.wall_time, l2_bytes=0))
    out = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--formats", "int4-awq,fp8", "--shapes", "128x256", "--tokens", "1,2",
                     "--iters", "1", "--repeats", "1", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "bench kernels: 128x256 int4-awq: cpu-decoded" in captured.err
    assert "mopt bench kernels on fake GPU" in captured.out and "x BF16 cuBLAS" in captured.out
    data = json.loads(out.read_text())
    assert data["device"] == "fake GPU" and [(r["format"], r["m"]) for r in data["rows"]] == \
        [("int4-awq", 1), ("int4-awq", 2), ("fp8", 1), ("fp8", 2)]


def test_interrupted_run_prints_and_keeps_what_it_measured(monkeypatch, tmp_path, capsys):
    """The script's timeouts send SIGINT: the rows measured so far are printed and stay in the JSON."""
    bench = kernels.bench_kernels

    def bench_until_interrupted(*args, on_rows=None, **kwargs):
        rows = bench([(128, 256)], [1], ["int8-wo"], iters=1, repeats=1, device="cpu", timer=kernels.wall_time,
                     l2_bytes=0)
        on_rows(rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(kernels, "bench_kernels", bench_until_interrupted)
    out = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--json", str(out)]) == 130
    captured = capsys.readouterr()
    assert "mopt bench kernels on fake GPU (interrupted)" in captured.out and "mopt: interrupted" in captured.err
    assert [r["format"] for r in json.loads(out.read_text())["rows"]] == ["int8-wo"]


SCRIPT = Path(__file__).parents[2] / "bench" / "formats_gpu.sh"


def test_gpu_script_benches_every_format_once(capsys):
    """bench/formats_gpu.sh: valid bash; its two halves cover every format once; its bench options parse."""
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    halves = [re.search(rf"FORMATS_{i}=\$\{{FORMATS_{i}:-([^}}]+)\}}", text).group(1).split(",") for i in (1, 2)]
    assert sorted(halves[0] + halves[1]) == sorted(kernel_formats.FORMATS)
    bench_args = re.search(r"BENCH_ARGS:-([^}]+)\}", text).group(1).split()
    if not torch.cuda.is_available():
        for half in halves:
            assert cli.main(["bench", "kernels", "--formats", ",".join(half), *bench_args]) == 1
            assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_kernels_every_format_on_gpu():
    """Every format runs (CUDA graphs included) on its CUDA kernel, never the reference fallback."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    rows = kernels.bench_kernels([(1024, 512)], [1, 40], None, iters=2, repeats=1)
    assert [r for r in rows if "error" in r] == []
    kernel_of = {r["format"]: r["kernel"] for r in rows}
    assert set(kernel_of.values()).isdisjoint({"reference", "cpu-decoded"}), kernel_of


def _bench_moe_plain(fmt: str, e: int, k: int, h: int, i: int):
    """The unquantized experts a bench MoE layer was made from (the same draws as ``bench.moe._layer``), their
    input columns times the smoothing where the format has one, so that both compute the same function."""
    from mopt.bench import moe

    torch.manual_seed(0)
    plain = moe.FusedMoE(e, k, h, i, torch.bfloat16, prefix="bench.experts")
    for x in range(e):
        for name, rows, cols in (("w1", i, h), ("w3", i, h), ("w2", h, i)):
            w = torch.randn(rows, cols) * 0.02
            if fmt == "int8-sq":
                w = w * synthetic._smoothing(cols, w)
            plain.weight_loader(plain.w2_weight if name == "w2" else plain.w13_weight, w.bfloat16(), (name, x))
    plain.process_weights_after_loading()
    return plain


# Two quantized GEMMs in series with the SiLU product between them, against the BF16 experts (4 experts,
# H = I = 128, top-2, 6 tokens; measured 2026-11-27 on the CPU): 8-bit formats 0.012-0.067 (bound 0.1),
# 4-bit 0.17-0.30 (bound 0.4). INT8 SmoothQuant 0.27: the bench's static INT8 scale (4/127, for N(0, 1) inputs,
# bench.kernel_formats) is an order of magnitude coarser than the down projection's input (the SiLU product of
# 0.02-scale weights), so that input lands on a few INT8 levels; the timing does not depend on it.
MOE_BOUND = {"int8-wo": 0.1, "fp8": 0.1, "fp8-pcpt": 0.1, "fp8-pb-wo": 0.1, "mxfp8": 0.1, "bf16": 0.01}


@pytest.mark.parametrize("fmt", __import__("mopt.bench.moe", fromlist=["ALL_FORMATS"]).ALL_FORMATS)
def test_bench_moe_builds_every_expert_format(fmt):
    """``mopt bench moe --formats``: each format's experts load and process from the bench's checkpoint tensors
    (here on the CPU, where the reference loop runs them) and compute what the unquantized experts do, to
    within the format's bound."""
    from mopt.bench import moe

    e, k, h, i = 4, 2, 128, 128
    torch.manual_seed(0)
    layer = moe._layer(fmt, e, k, h, i, "cpu")
    plain = _bench_moe_plain(fmt, e, k, h, i)
    x = torch.randn(6, h, generator=torch.Generator().manual_seed(2)).bfloat16()
    weights, ids = layer.select_experts(torch.randn(6, e, generator=torch.Generator().manual_seed(3)))
    got, want = (m.quant_method.apply(m, x, weights, ids).float() for m in (layer, plain))
    assert ((got - want).norm() / want.norm()).item() <= MOE_BOUND.get(fmt, 0.4)


def test_bench_moe_refuses_unknown_formats_before_any_gpu_work():
    from mopt.bench import moe

    with pytest.raises(ValueError, match="unknown MoE bench format.*int4-awq.*choose from"):
        moe.bench_moe(formats=["fp8", "int4-awq"])
