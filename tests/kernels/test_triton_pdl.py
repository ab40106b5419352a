"""Programmatic dependent launch: the switch, and that the decode chain's results do not change with it."""

from __future__ import annotations

import pytest
import torch

from mopt.engine.args import check_engine_args
from mopt.errors import EngineArgumentError
from mopt.kernels import env

triton_pdl = pytest.importorskip("mopt.kernels.triton_pdl")

ENGINE_ARGS = dict(model="m", device="cpu", dtype=None, kv_cache_dtype="auto", max_model_len=None, block_size=16,
                   max_num_seqs=8, max_num_batched_tokens=None, kv_cache_memory=None)


@pytest.mark.parametrize("value,want", [(None, True), ("1", True), ("0", False), (" 0 ", False)])
def test_setting(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(env.PDL_ENV, raising=False)
    else:
        monkeypatch.setenv(env.PDL_ENV, value)
    assert env.pdl_setting() is want


@pytest.mark.parametrize("value", ["yes", "2", ""])
def test_bad_setting_is_refused_before_loading(monkeypatch, value):
    monkeypatch.setenv(env.PDL_ENV, value)
    with pytest.raises(ValueError, match="MOPT_PDL"):
        env.pdl_setting()
    with pytest.raises(EngineArgumentError, match="MOPT_PDL"):
        check_engine_args(**ENGINE_ARGS)


def test_cpu_launches_without_pdl():
    assert triton_pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    assert not triton_pdl.enabled(torch.device("cpu"))


def _decode_chain(x, residual, norm_w, w_gate_up, w_down, lm_head, fp4, moe):
    """One MLP block (plain, with the SiLU fused into gate/up, an NVFP4 layer after its activation
    quantizer, and a mixture-of-experts block: routing, alignment, FP8 input quantizer, both expert GEMMs
    and the pair sum) and the logits' argmax, as decode runs them (norm -> GEMV -> SiLU -> GEMV -> argmax).
    The NVFP4 layer only for one token: from 2 tokens it runs on other kernels (the MMA kernel splits K and
    adds the splits atomically, in no fixed order)."""
    from mopt.kernels import route, triton_argmax, triton_gemm, triton_gemv, triton_glue, triton_moe, triton_quant
    h, s = triton_glue.rms_norm(x, norm_w, 1e-5, residual)
    y = triton_gemv.gemv(triton_glue.silu_mul(triton_gemv.gemv(h, w_gate_up)), w_down)
    y_fused = triton_gemv.gemv(triton_gemv.silu_gated_gemv(h, w_gate_up, None, None, None, h.dtype), w_down)
    if h.shape[0] == 1:
        z = triton_gemm.nvfp4_gemm(triton_quant.nvfp4_block_values(h, fp4[2]), *fp4, None, torch.bfloat16)
    else:
        z = h
    router, w13, w2 = moe
    weights, ids = route.softmax_topk(triton_gemv.gemv(h, router), 2, True)
    e = triton_moe.fused_moe(h, weights, ids, w13, w2)
    logits = triton_gemv.gemv(triton_glue.rms_norm(y, norm_w, 1e-5), lm_head)
    sums = torch.stack([y.float().sum(1), y_fused.float().sum(1), z.float().sum(1), s.float().sum(1), e.float().sum(1)])
    return sums, triton_argmax.argmax_rows(logits)


def _moe_block(experts: int, hidden: int, inter: int, g: torch.Generator) -> tuple:
    """A router and FP8 experts (per-tensor scales, one static input scale)."""
    from mopt.kernels.triton_moe import ExpertWeights
    from mopt.quant.formats import fp8

    def stacked(rows: int, cols: int) -> ExpertWeights:
        w = torch.randn(experts, rows, cols, device="cuda", generator=g) * 0.02
        scale = w.abs().amax(dim=(1, 2)) / 448
        return ExpertWeights((w / scale[:, None, None]).to(fp8.FP8_DTYPE), scale, None,
                             torch.tensor(4.0 / 448, device="cuda"))

    router = torch.randn(experts, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
    return router, stacked(2 * inter, hidden), stacked(hidden, inter)


def _fp4_layer(n: int, k: int, g: torch.Generator) -> tuple:
    from mopt.quant.formats import nvfp4
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    w_global = nvfp4.global_scale_from_amax(w.abs().amax())
    packed, scale = nvfp4.quantize(w, w_global)
    return packed, scale, torch.tensor(1.0, device="cuda"), w_global.reshape(1).expand(n).contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
def test_pdl_graph_equals_plain_launches(monkeypatch, m):
    """The same chain replayed from a CUDA graph, launched with and without PDL: the same bits."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs an sm_90 GPU")
    g = torch.Generator(device="cuda").manual_seed(m)
    args = [torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16) * scale
            for shape, scale in (((m, 4096), 1), ((m, 4096), 1), ((4096,), 1), ((28672, 4096), 0.02),
                                 ((4096, 14336), 0.02), ((32000, 4096), 0.02))]
    args.append(_fp4_layer(6144, 4096, g))
    args.append(_moe_block(16, 4096, 512, g))
    results = {}
    for on in (False, True):
        monkeypatch.setattr(triton_pdl, "_ENABLED", {torch.cuda.current_device(): on})
        _decode_chain(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _decode_chain(*args)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        results[on] = [t.clone() for t in out]
    for plain, pdl in zip(results[False], results[True]):
        assert torch.equal(plain, pdl)
