"""Fused MoE for experts whose weights decode in registers (``triton_weight_decode``'s formats): W8A16 (INT8
channels), W4A16 NVFP4, MXFP4 weight-only and FP8 128x128 blocks over unquantized activations; MXFP8 / MXFP4 W4A4
over activations quantized to their exact MX values per token; W4A8 (NVFP4 or MXFP4 weights, FP8 activations
under a static scale per expert or each token's own) and W8A8 SmoothQuant (INT8 activations, smoothed and
scaled per expert).

The same five steps as ``triton_moe.fused_moe`` (its routing kernel and its per-token sum): the pairs aligned by
expert; the activation quantizer, where the scheme has one (``ExpertActivation``: per token, or per pair where
it depends on the expert); the gate/up GEMM with the SiLU product, in ``x``'s dtype; the quantizer again, per
pair; the down GEMM times each pair's router weight into float32 partials (K split across programs at decode);
the sum over each token's pairs. The GEMMs compute ``C^T = W . A^T`` as the
dense MMA kernel does (``triton_weight_prefill``): decoded weights are the MMA's register operand, exact in BF16
(group-scaled formats: codes, the group's scale applied to its partial product), and accumulate in float32. Row
scales (INT8's channel scales, NVFP4's ``weight_scale_2``), then the activations' scales, come in the epilogue,
in the reference's order.

MX activations quantize 32-element blocks along K, so under tensor parallelism a rank's slice of the down GEMM's
input (a multiple of 32 wide) quantizes as the whole row would: no exchange between ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_moe import (_ROUND, _expert_run, _silu_mul, _split_k, _sum_pairs_kernel, align_tokens,
                                     block_m_for)
from mopt.kernels.triton_pdl import launch_options, pdl_prologue
from mopt.kernels.triton_weight_decode import GROUP_SCALED, mma_tile_product

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _moe_wo_kernel(a_ptr, b_ptr, s_ptr, r_ptr, x_scale_ptr, c_ptr, w_ptr, pairs_ptr, block_expert_ptr, N, K,
                   num_pairs, num_groups, stride_am, stride_be, stride_bn, stride_se, stride_re, stride_cm, stride_cs,
                   A_ROW_DIV: tl.constexpr, FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                   HAS_X_SCALE: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, ROUND: tl.constexpr,
                   DOT_F32: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """``C[pair, n] = A[pair // A_ROW_DIV] . W[e, n]`` for one ``BLOCK_M`` run of expert ``e``'s pairs; ``W[e]``:
    ``b [E, R, ...]`` stored codes, ``s [E, R, groups]`` their scales, ``r [E, R]`` row scales (``R = 2N``, gate
    then up rows, if ``GATED``: then ``C = silu(gate) * up`` rounded as the reference rounds); ``x_scale``: one
    scale per row of ``A``. Program axis 2 is the K split (``C`` then holds float32 partials
    ``[SPLIT_K, pairs, N]``)."""
    pdl_prologue(PDL)
    expert, pair, valid, offs_n, n_ok, first, stop = _expert_run(block_expert_ptr, pairs_ptr, num_pairs, N, K, BLOCK_M,
                                                                 BLOCK_N, BLOCK_K, SPLIT_K)
    a_cols = a_ptr + (pair // A_ROW_DIV).to(tl.int64)[None, :] * stride_am
    rows = offs_n.to(tl.int64)
    b_e = b_ptr + expert * stride_be
    s_e = s_ptr + expert * stride_se
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(first, stop):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x_t = tl.load(a_cols + offs_k[:, None], mask=(offs_k < K)[:, None] & valid[None, :], other=0.0)
        acc = mma_tile_product(acc, x_t, b_e, s_e, rows, n_ok, t, K, stride_bn, num_groups, FORMAT, GROUP, BLOCK_N,
                               BLOCK_K, DOT_F32)
        if GATED:
            acc_up = mma_tile_product(acc_up, x_t, b_e, s_e, rows + N, n_ok, t, K, stride_bn, num_groups, FORMAT,
                                      GROUP, BLOCK_N, BLOCK_K, DOT_F32)
    if HAS_ROW_SCALE:
        row_scales = r_ptr + expert * stride_re + offs_n
        acc = acc * tl.load(row_scales, mask=n_ok, other=0.0)[:, None]
        if GATED:
            acc_up = acc_up * tl.load(row_scales + N, mask=n_ok, other=0.0)[:, None]
    if HAS_X_SCALE:
        x_scale = tl.load(x_scale_ptr + pair // A_ROW_DIV, mask=valid, other=0.0)[None, :]
        acc = acc * x_scale
        acc_up = acc_up * x_scale
    if GATED:
        acc = _silu_mul(acc, acc_up, ROUND)
    if MUL_WEIGHT:
        acc = acc * tl.load(w_ptr + pair, mask=valid, other=0.0)[None, :]
    c = c_ptr + tl.program_id(2) * stride_cs + pair[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & valid[None, :])


@dataclass(frozen=True)
class ExpertActivation:
    """How a scheme's activations enter an expert GEMM: ``quantize(rows, experts, row_div)`` gives values exact in
    BF16 (in the rows' dtype) and a scale per row applied after the GEMM, or None. ``per_expert``: the
    quantization depends on the expert (static scales or smoothing per expert), so the results' rows are
    pairs: pair ``p`` quantizes row ``p // row_div`` of ``rows`` for expert ``experts[p]`` (the gate/up GEMM
    passes the tokens and ``row_div = top_k``); otherwise each row is quantized once, ``experts`` is None and
    ``row_div`` 1."""

    quantize: Callable[[torch.Tensor, torch.Tensor | None, int], tuple[torch.Tensor, torch.Tensor | None]]
    per_expert: bool = False


@dataclass(frozen=True)
class DecodedExperts:
    """One stacked projection in a weight-decoding format (``triton_weight_decode``): ``weight [E, R, ...]``
    stored codes; ``scale [E, R, groups]`` its block / group scales (None for INT8); ``row_scale [E, R]``
    float32 or None; ``group``: elements per scale along K (``scale_group``)."""

    fmt: int
    weight: torch.Tensor
    scale: torch.Tensor | None
    row_scale: torch.Tensor | None
    group: int


def moe_wo_tiles(fmt: int, group: int, dtype: torch.dtype) -> dict:
    """As the dense MMA kernel's up to a few hundred tokens (``triton_weight_prefill.mma_tiles``, H200 sweeps of
    dense shapes): 64 weight rows and 4 warps a program; a group-scaled format's K tile is its group. Runs
    stop at 64 pairs (``block_m_for``'s NVFP4 rule): the gate/up program holds two accumulators besides the
    decoded weight tile. Not yet swept on expert shapes."""
    block_k = group if fmt in GROUP_SCALED else 128
    return dict(BLOCK_N=64, BLOCK_K=block_k, num_warps=4, num_stages=2 if dtype == torch.float32 else 3)


def _gemm(a: torch.Tensor, a_scale: torch.Tensor | None, w: DecodedExperts, out: torch.Tensor,
          sorted_pairs: torch.Tensor, block_expert: torch.Tensor, block_m: int, a_row_div: int, num_pairs: int,
          gated: bool, round_dtype: torch.dtype, router_weights: torch.Tensor | None = None) -> None:
    """One expert GEMM; ``a_scale``: one per row of ``a``, or None; ``out [SPLIT_K, pairs, N]`` (float32) splits
    K, ``out [pairs, N]`` does not."""
    rows = w.weight.shape[1]
    n, k = (rows // 2 if gated else rows), a.shape[-1]
    split = out.shape[0] if out.dim() == 3 else 1
    out2 = out.view(-1, out.shape[-1])
    tiles = moe_wo_tiles(w.fmt, w.group, a.dtype)
    dummy = w.weight
    scale = w.scale if w.scale is not None else dummy
    _moe_wo_kernel[(block_expert.numel(), triton.cdiv(n, tiles["BLOCK_N"]), split)](
        a, w.weight, scale, w.row_scale if w.row_scale is not None else dummy,
        a_scale.reshape(-1).float().contiguous() if a_scale is not None else dummy, out2,
        router_weights if router_weights is not None else dummy, sorted_pairs, block_expert, n, k, num_pairs,
        w.scale.shape[-1] if w.scale is not None else 1, a.stride(0), w.weight.stride(0), w.weight.stride(1),
        w.scale.stride(0) if w.scale is not None else 0, w.row_scale.stride(0) if w.row_scale is not None else 0,
        out2.stride(0), out.stride(0) if out.dim() == 3 else 0, A_ROW_DIV=a_row_div, FORMAT=w.fmt, GROUP=w.group,
        HAS_ROW_SCALE=w.row_scale is not None, HAS_X_SCALE=a_scale is not None, GATED=gated,
        MUL_WEIGHT=router_weights is not None, ROUND=_ROUND[round_dtype],
        DOT_F32=INTERPRETED or a.dtype == torch.float32, SPLIT_K=split, BLOCK_M=block_m, **tiles,
        **launch_options(a.device))


def fused_moe_weight_only(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: DecodedExperts,
                          w2: DecodedExperts, act13: ExpertActivation | None = None,
                          act2: ExpertActivation | None = None, foreign_pairs: bool = False) -> torch.Tensor:
    """``x [T, H]`` through the routed experts (``ids [T, k]``, router ``weights [T, k]``): gated SiLU MLPs
    ``w13`` (gate rows, then up rows) and ``w2``. ``act13`` / ``act2``: how the scheme quantizes each GEMM's
    input (None: multiplied as it is). ``foreign_pairs``: as ``triton_moe.fused_moe`` (expert parallelism)."""
    t, k = ids.shape
    num_experts, inter, hidden = w13.weight.shape[0], w13.weight.shape[1] // 2, x.shape[-1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    pairs = t * k
    block_m = block_m_for(pairs, num_experts, nvfp4=True)  # decoded weights fill registers as NVFP4's do
    sorted_pairs, block_expert = align_tokens(ids, num_experts, block_m)
    experts = (ids.clamp_max(num_experts - 1) if foreign_pairs else ids).reshape(-1)  # real experts' scales only
    a, a_scale, a_row_div = x, None, k
    if act13 is not None and act13.per_expert:
        (a, a_scale), a_row_div = act13.quantize(x, experts, k), 1
    elif act13 is not None:
        a, a_scale = act13.quantize(x, None, 1)
    act = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    _gemm(a, a_scale, w13, act, sorted_pairs, block_expert, block_m, a_row_div, pairs, True, x.dtype)
    act_scale = None
    if act2 is not None:
        act, act_scale = act2.quantize(act, experts if act2.per_expert else None, 1)
    tiles = moe_wo_tiles(w2.fmt, w2.group, act.dtype)
    split = _split_k(block_expert.numel() * triton.cdiv(hidden, tiles["BLOCK_N"]), inter, tiles["BLOCK_K"], x.device)
    down = (torch.zeros if foreign_pairs else torch.empty)((split, pairs, hidden), dtype=torch.float32, device=x.device)
    _gemm(act, act_scale, w2, down, sorted_pairs, block_expert, block_m, 1, pairs, False, x.dtype,
          router_weights=weights.reshape(-1).float().contiguous())
    out = torch.empty((t, hidden), dtype=x.dtype, device=x.device)
    _sum_pairs_kernel[(t, triton.cdiv(hidden, 1024))](down, out, hidden, down.stride(0), TOP_K=k, SPLIT_K=split,
                                                       BLOCK=1024, **launch_options(x.device))
    return out
