"""Compiles mopt's newer Triton kernels for Hopper (sm_90) on any machine, without a GPU.

Run by ``test_hopper_compile.py`` in a subprocess without ``TRITON_INTERPRET`` (the interpreter accepts
programs the compiler refuses, e.g. a variable whose tile shape changes inside a branch). Each entry:
kernel, argument types, constexpr variants (``num_warps`` among them is a launch option), optionally a
label. Kernels with a ``PDL`` constexpr are compiled with programmatic dependent launch unless a variant
says otherwise. Prints one line per compiled variant and its shared memory.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mopt.kernels import triton_allreduce_norm as tan
from mopt.kernels import triton_argmax as targ
from mopt.kernels import triton_peer_amax as tpa_max
from mopt.kernels import triton_attention as ta
from mopt.kernels import triton_prefill_attention as tpa
from mopt.kernels import triton_gemm as tgm
from mopt.kernels import triton_gemv as tg
from mopt.kernels import triton_quant as tq
from mopt.kernels import triton_route as troute
from mopt.kernels import triton_quant_mx as tqm
from mopt.kernels import triton_glue as tgl
from mopt.kernels import triton_moe as tmoe
from mopt.kernels import triton_moe_weight_only as tmwo
from mopt.kernels import triton_weight_decode as twd
from mopt.kernels import triton_two_shot_norm as tts
from mopt.kernels import triton_weight_only as two

P_BF16, P_F8, P_F32, P_I32, P_U8, P_I8 = "*bf16", "*fp8e4nv", "*fp32", "*i32", "*u8", "*i8"
HOPPER_SHARED_BYTES = 227 * 1024
NO_PUSH = dict(PUSH=False, RANK=0, WORLD=1, ROW_ELEMS=8192)
PUSH_2 = dict(PUSH=True, RANK=1, WORLD=2, ROW_ELEMS=8192)  # rank 1 of 2 sends its rows (triton_allreduce_norm)
UNGATED = dict(GATED=False, DTYPE=triton.language.bfloat16, FP8_OUT=False, **NO_PUSH)  # a plain GEMV
GATED = dict(GATED=True, DTYPE=triton.language.bfloat16, **NO_PUSH)
# one-token GEMVs load their first weight tiles before the PDL wait (triton_pdl): the PTX must keep them there
WEIGHTS_BEFORE_WAIT = {"_gemv_kernel": lambda c: not c["DOT"], "_nvfp4_gemv_kernel": lambda c: True}

MOE_FP8 = dict(FP8=True, IEEE=False, ROUND=triton.language.bfloat16)


def _moe_gemm(a: str, c: str) -> dict:
    """``triton_moe._moe_gemm_kernel``'s pointers and sizes for an ``a`` operand (E4M3 weights) and output ``c``."""
    return dict(a_ptr=a, b_ptr=P_F8, c_ptr=c, a_scale_ptr=P_F32, b_scale_ptr=P_F32, c_scale_ptr=P_F32, w_ptr=P_F32,
                pairs_ptr=P_I32, block_expert_ptr=P_I32, N="i32", K="i32", num_pairs="i32", stride_am="i32",
                stride_be="i32", stride_bn="i32", stride_cm="i32", stride_cs="i32")


def _moe_weight_decode_entries() -> list:
    """``triton_moe_weight_only._moe_wo_kernel`` per weight format (and activation scales: W8A8 SmoothQuant,
    W4A8): the gate/up GEMM on 64-pair runs (BF16 out) and the down GEMM on 16-pair runs (float32 partials,
    router weights, K split)."""
    formats = [("INT8", P_I8, P_F32, 128, True, False), ("NVFP4", P_U8, P_F8, 16, True, False),
               ("MXFP4", P_U8, P_U8, 32, False, False), ("MXFP8", P_F8, P_U8, 32, False, False),
               ("FP8_BLOCK", P_F8, P_F32, 128, False, False), ("INT8", P_I8, P_F32, 128, True, True),
               ("NVFP4", P_U8, P_F8, 32, True, True), ("MXFP4", P_U8, P_U8, 32, False, True)]
    entries = []
    for name, weight, scale, group, row_scale, x_scale in formats:
        for gated, out in ((True, P_BF16), (False, P_F32)):
            types = dict(a_ptr=P_BF16, b_ptr=weight, s_ptr=scale, r_ptr=P_F32, x_scale_ptr=P_F32, c_ptr=out,
                         w_ptr=P_F32, pairs_ptr=P_I32,
                         block_expert_ptr=P_I32, N="i32", K="i32", num_pairs="i32", num_groups="i32",
                         stride_am="i32", stride_be="i32", stride_bn="i32", stride_se="i32", stride_re="i32",
                         stride_cm="i32", stride_cs="i32")
            tiles = (tmwo.moe_wo_tiles(getattr(twd, name), group, None)
                     | {"BLOCK_M": 64 if gated else 16})  # the longest gate/up runs; the down GEMM at decode
            tiles.pop("num_stages")
            entries.append((tmwo._moe_wo_kernel, types,
                            [dict(A_ROW_DIV=1 if x_scale or not gated else 8, FORMAT=getattr(twd, name),
                                  GROUP=group, HAS_ROW_SCALE=row_scale, HAS_X_SCALE=x_scale, GATED=gated,
                                  MUL_WEIGHT=not gated, ROUND=triton.language.bfloat16, DOT_F32=False,
                                  SPLIT_K=1 if gated else 4, **tiles)],
                            f"{name} experts{', scaled activations' if x_scale else ''}, "
                            f"{'gate/up' if gated else 'down'}"))
    return entries


def _kv_ptrs(cache: str) -> dict:
    """The KV-cache pointers of the attention kernels for a cache of element type ``cache`` (NVFP4's
    block scales are E4M3, its biases float32; other formats pass the cache for them, never read)."""
    side = (P_F8, P_F32) if cache == P_U8 else (cache, cache)
    return dict(k_cache_ptr=cache, v_cache_ptr=cache, k_bs_ptr=side[0], v_bs_ptr=side[0], k_bias_ptr=side[1],
                v_bias_ptr=side[1])


def _rope(cache: str) -> dict:
    return dict(q_ptr=P_BF16, k_ptr=P_BF16, v_ptr=P_BF16, q_out_ptr=P_BF16, pos_ptr=P_I32, cos_sin_ptr=P_F32,
                slot_ptr=P_I32, **_kv_ptrs(cache), k_scale="fp32", v_scale="fp32", stride_qt="i32", stride_qh="i32",
                stride_kt="i32", stride_kh="i32", stride_vt="i32", stride_vh="i32", num_heads="i32",
                num_kv_heads="i32")


def _decode(cache: str) -> dict:
    return dict(q_ptr=P_BF16, **_kv_ptrs(cache), bt_ptr=P_I32, seq_lens_ptr=P_I32, out_ptr=P_F8, part_ptr=P_F32,
                lse_ptr=P_F32, out_scale_ptr=P_F32, k_new_ptr=P_BF16, v_new_ptr=P_BF16, pos_ptr=P_I32,
                cos_sin_ptr=P_F32, slot_ptr=P_I32, k_scale="fp32", v_scale="fp32", sm_scale="fp32",
                stride_qb="i32", stride_qh="i32", stride_kt="i32", stride_kh="i32", stride_vt="i32", stride_vh="i32",
                stride_bt="i32", num_heads="i32", num_kv_heads="i32", window="i32")


def _gemv(operands: str, out: str, bias: str) -> dict:
    return dict(a_ptr=operands, b_ptr=operands, c_ptr=out, a_scale_ptr=P_F32, b_scale_ptr=P_F32, bias_ptr=bias,
                out_scale_ptr=P_F32, bases_ptr="*i64", slots_ptr=P_I32, ws_ptr=P_F32, locks_ptr=P_I32, M="i32",
                N="i32", K="i32", stride_am="i32",
                stride_bn="i32", stride_cm="i32")


def _peer_norm(out: str) -> dict:
    """The fused all-reduce + RMSNorm kernels' arguments (one-shot and two-shot), ``out`` the output's type."""
    return dict(x_ptr=P_BF16, res_ptr=P_BF16, w_ptr=P_F32, out_ptr=out, res_out_ptr=P_BF16, scale_ptr=P_F32,
                bases_ptr="*i64", slots_ptr=P_I32, stride_x="i32", stride_r="i32", n="i32", eps="fp32")


def _prefill(cache: str) -> dict:
    return dict(q_ptr=P_BF16, **_kv_ptrs(cache), out_ptr=P_BF16, bt_ptr=P_I32, seq_lens_ptr=P_I32, qsl_ptr=P_I32,
                out_scale_ptr=P_F32, k_scale="fp32", v_scale="fp32", sm_scale="fp32", stride_qt="i32",
                stride_qh="i32", stride_bt="i32", num_heads="i32", num_kv_heads="i32", window="i32")


KERNELS = [
    (ta._rope_write_kernel, _rope(P_F8),
     [dict(HALF=64, BLOCK_H=32, BLOCK_KV=8, FMT=1, AFFINE=False), dict(HALF=32, BLOCK_H=4, BLOCK_KV=2, FMT=0,
                                                                        AFFINE=False)]),
    (ta._rope_write_kernel, _rope(P_I8), [dict(HALF=64, BLOCK_H=32, BLOCK_KV=8, FMT=2, AFFINE=False)], "INT8 KV"),
    (ta._rope_write_kernel, _rope(P_U8),
     [dict(HALF=64, BLOCK_H=32, BLOCK_KV=8, FMT=3, AFFINE=False), dict(HALF=8, BLOCK_H=4, BLOCK_KV=1, FMT=3,
                                                                        AFFINE=True)], "NVFP4 KV"),
    (ta._decode_kernel, _decode(P_F8),
     [dict(GROUP=4, BLOCK_H=16, D=128, PAGE=16, TILE_S=32, TILE_M=64, NUM_SPLITS=32, FMT=1, AFFINE=False, IEEE=False,
           FP8_OUT=True, NVFP4_OUT=False, ROPE=True),
      dict(GROUP=8, BLOCK_H=16, D=128, PAGE=32, TILE_S=32, TILE_M=64, NUM_SPLITS=1, FMT=1, AFFINE=False, IEEE=False,
           FP8_OUT=False, NVFP4_OUT=False, ROPE=False)]),
    (ta._decode_kernel, dict(_decode(P_F8), out_ptr=P_BF16),
     [dict(GROUP=4, BLOCK_H=16, D=128, PAGE=16, TILE_S=32, TILE_M=64, NUM_SPLITS=1, FMT=1, AFFINE=False, IEEE=False,
           FP8_OUT=False, NVFP4_OUT=True, ROPE=True)], "NVFP4 block values out"),
    (ta._decode_kernel, _decode(P_I8),
     [dict(GROUP=4, BLOCK_H=16, D=128, PAGE=16, TILE_S=32, TILE_M=64, NUM_SPLITS=32, FMT=2, AFFINE=False, IEEE=False,
           FP8_OUT=True, NVFP4_OUT=False, ROPE=True)], "INT8 KV"),
    (ta._decode_kernel, _decode(P_U8),
     [dict(GROUP=4, BLOCK_H=16, D=128, PAGE=16, TILE_S=32, TILE_M=64, NUM_SPLITS=32, FMT=3, AFFINE=False, IEEE=False,
           FP8_OUT=True, NVFP4_OUT=False, ROPE=True),
      dict(GROUP=8, BLOCK_H=16, D=64, PAGE=16, TILE_S=32, TILE_M=64, NUM_SPLITS=1, FMT=3, AFFINE=True, IEEE=False,
           FP8_OUT=False, NVFP4_OUT=False, ROPE=False)], "NVFP4 KV"),
    (ta._decode_merge_kernel, dict(part_ptr=P_F32, lse_ptr=P_F32, out_ptr=P_F8, out_scale_ptr=P_F32),
     [dict(NUM_SPLITS=32, D=128, DTYPE=triton.language.bfloat16, FP8_OUT=True, NVFP4_OUT=False)]),
    (ta._decode_merge_kernel, dict(part_ptr=P_F32, lse_ptr=P_F32, out_ptr=P_BF16, out_scale_ptr=P_F32),
     [dict(NUM_SPLITS=32, D=128, DTYPE=triton.language.bfloat16, FP8_OUT=False, NVFP4_OUT=True)],
     "NVFP4 block values out"),
    (tpa._prefill_kernel, _prefill(P_F8),
     [dict(GROUP=4, D=128, PAGE=16, BLOCK_M=64, BLOCK_N=64, FMT=1, AFFINE=False, IEEE=False, FP8_OUT=False)]),
    (tpa._prefill_kernel, _prefill(P_I8),
     [dict(GROUP=4, D=128, PAGE=16, BLOCK_M=64, BLOCK_N=64, FMT=2, AFFINE=False, IEEE=False, FP8_OUT=False)],
     "INT8 KV"),
    (tpa._prefill_kernel, _prefill(P_U8),
     [dict(GROUP=4, D=128, PAGE=16, BLOCK_M=64, BLOCK_N=64, FMT=3, AFFINE=True, IEEE=False, FP8_OUT=False)],
     "NVFP4 KV"),
    (targ._chunk_max_kernel, dict(x_ptr=P_F32, val_ptr=P_F32, idx_ptr=P_I32, n="i32", stride="i32"),
     [dict(CHUNKS=32, BLOCK=4096)]),
    (targ._pick_chunk_kernel, dict(val_ptr=P_F32, idx_ptr=P_I32, out_ptr="*i64", first="i32"),
     [dict(CHUNKS=32, KEY=False), dict(CHUNKS=16, KEY=True)]),
    (tgl._rms_norm_kernel,
     dict(x_ptr=P_BF16, res_ptr=P_BF16, w_ptr=P_F32, out_ptr=P_F8, res_out_ptr=P_BF16, scale_ptr=P_F32,
          stride_x="i32", stride_r="i32", n="i32", eps="fp32"),
     [dict(BLOCK=4096, HAS_RESIDUAL=True, FP8_OUT=True, NVFP4_OUT=False),
      dict(BLOCK=16384, HAS_RESIDUAL=False, FP8_OUT=False, NVFP4_OUT=False)]),
    (tgl._rms_norm_kernel,  # NVFP4 block values out (kernels.quantized_input)
     dict(x_ptr=P_BF16, res_ptr=P_BF16, w_ptr=P_F32, out_ptr=P_BF16, res_out_ptr=P_BF16, scale_ptr=P_F32,
          stride_x="i32", stride_r="i32", n="i32", eps="fp32"),
     [dict(BLOCK=4096, HAS_RESIDUAL=True, FP8_OUT=False, NVFP4_OUT=True, num_warps=16)]),
    (tan._allreduce_rms_norm_kernel,
     _peer_norm(P_F8),
     [dict(RANK=0, WORLD=2, ROW_ELEMS=8192, BLOCK=4096, SPLIT=1, HAS_RESIDUAL=True, FP8_OUT=True, NVFP4_OUT=False,
           PUSHED=False),
      dict(RANK=1, WORLD=2, ROW_ELEMS=8192, BLOCK=4096, SPLIT=4, HAS_RESIDUAL=True, FP8_OUT=True, NVFP4_OUT=False,
           PUSHED=True),
      dict(RANK=0, WORLD=2, ROW_ELEMS=8192, BLOCK=4096, SPLIT=4, HAS_RESIDUAL=True, FP8_OUT=False, NVFP4_OUT=False,
           PUSHED=False),
      dict(RANK=5, WORLD=8, ROW_ELEMS=8192, BLOCK=8192, SPLIT=1, HAS_RESIDUAL=True, FP8_OUT=False, NVFP4_OUT=False,
           PUSHED=False),
      dict(RANK=1, WORLD=2, ROW_ELEMS=8192, BLOCK=4096, SPLIT=4, FP8_OUT=True, NVFP4_OUT=False, PUSHED=False,
           HAS_RESIDUAL=False),  # the first layer's norm of the embedding's rows
      dict(RANK=0, WORLD=2, ROW_ELEMS=8192, BLOCK=4096, SPLIT=1, FP8_OUT=False, NVFP4_OUT=False, PUSHED=False,
           HAS_RESIDUAL=False)]),
    (tan._allreduce_rms_norm_kernel,
     _peer_norm(P_BF16),
     [dict(RANK=1, WORLD=2, ROW_ELEMS=8192, BLOCK=4096, SPLIT=4, HAS_RESIDUAL=True, FP8_OUT=False, NVFP4_OUT=True,
           PUSHED=True, num_warps=16),
      dict(RANK=0, WORLD=2, ROW_ELEMS=8192, BLOCK=4096, SPLIT=1, HAS_RESIDUAL=True, FP8_OUT=False, NVFP4_OUT=True,
           PUSHED=False, num_warps=16)]),
    (tts._two_shot_rms_norm_kernel,
     _peer_norm(P_F8),
     [dict(RANK=1, WORLD=4, ROW_ELEMS=8192, GATHER_AT=tan.gather_offset(4), BLOCK=4096, HAS_RESIDUAL=True,
           FP8_OUT=True, NVFP4_OUT=False, num_warps=16),
      dict(RANK=7, WORLD=8, ROW_ELEMS=8192, GATHER_AT=tan.gather_offset(8), BLOCK=8192, HAS_RESIDUAL=False,
           FP8_OUT=True, NVFP4_OUT=False, num_warps=32)]),
    (tts._two_shot_rms_norm_kernel,
     _peer_norm(P_BF16),
     [dict(RANK=0, WORLD=4, ROW_ELEMS=8192, GATHER_AT=tan.gather_offset(4), BLOCK=4096, HAS_RESIDUAL=True,
           FP8_OUT=False, NVFP4_OUT=True, num_warps=16),
      dict(RANK=2, WORLD=4, ROW_ELEMS=8192, GATHER_AT=tan.gather_offset(4), BLOCK=4096, HAS_RESIDUAL=True,
           FP8_OUT=False, NVFP4_OUT=False, num_warps=8)]),
    (tpa_max._per_token_fp8_over_peers_kernel,
     dict(x_ptr=P_BF16, q_ptr=P_F8, scale_ptr=P_F32, bases_ptr="*i64", stride_x="i32", n="i32"),
     [dict(AMAX_AT=tan.amax_offset(2), COUNTERS_AT=tan.amax_counters_offset(2), RANK=1, WORLD=2, BLOCK=8192,
           num_warps=32),
      dict(AMAX_AT=tan.amax_offset(4), COUNTERS_AT=tan.amax_counters_offset(4), RANK=0, WORLD=4, BLOCK=2048,
           num_warps=8)]),
    (tgl._vocab_rows_kernel, dict(ids_ptr="*i64", w_ptr=P_BF16, out_ptr=P_BF16, start="i32", count="i32", n="i32"),
     [dict(BLOCK=1024)]),
    (tgl._silu_mul_kernel, dict(x_ptr=P_BF16, out_ptr=P_F8, scale_ptr=P_F32, stride_x="i32", n="i32"),
     [dict(BLOCK=1024, FP8_OUT=True, NVFP4_OUT=False)]),
    (tgl._silu_mul_kernel, dict(x_ptr=P_BF16, out_ptr=P_BF16, scale_ptr=P_F32, stride_x="i32", n="i32"),
     [dict(BLOCK=1024, FP8_OUT=False, NVFP4_OUT=True, num_warps=4)]),
    (tg._gemv_kernel,
     _gemv(P_F8, P_BF16, P_F32),
     [dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=2048, DOT=False, **UNGATED),
      dict(A_ROWWISE=True, B_ROWWISE=True, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=512, DOT=True, **UNGATED),
      dict(A_ROWWISE=False, B_ROWWISE=True, HAS_BIAS=False, BLOCK_M=32, BLOCK_N=16, BLOCK_K=256, DOT=True,
           PDL=False, **UNGATED),
      dict(A_ROWWISE=False, B_ROWWISE=True, HAS_BIAS=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, DOT=True,
           **UNGATED),
      dict(A_ROWWISE=False, B_ROWWISE=True, HAS_BIAS=True, BLOCK_M=64, BLOCK_N=32, BLOCK_K=256, DOT=True,
           SPLIT_K=4, **UNGATED),
      dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=False, BLOCK_M=64, BLOCK_N=32, BLOCK_K=256, DOT=True,
           GATED=False, DTYPE=triton.language.bfloat16, FP8_OUT=False, SPLIT_K=2, **PUSH_2),
      dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=2048, DOT=False,
           GATED=False, DTYPE=triton.language.bfloat16, FP8_OUT=False, **PUSH_2),
      dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=512, DOT=True,
           GATED=False, DTYPE=triton.language.bfloat16, FP8_OUT=False, **PUSH_2)]),
    (tg._gemv_kernel,
     _gemv(P_F8, P_F8, P_F32),
     [dict(A_ROWWISE=False, B_ROWWISE=True, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=2048, DOT=False,
           FP8_OUT=True, **GATED),
      dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=512, DOT=True,
           FP8_OUT=True, **GATED),
      dict(A_ROWWISE=False, B_ROWWISE=True, HAS_BIAS=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, DOT=True,
           FP8_OUT=True, **GATED)], "gated, E4M3 out"),
    (tg._gemv_kernel,
     _gemv(P_BF16, P_BF16, P_BF16),
     [dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, DOT=False, **UNGATED),
      dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, DOT=True, **UNGATED),
      dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, DOT=True,
           FP8_OUT=False, **GATED),
      dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, DOT=False,
           GATED=False, DTYPE=triton.language.bfloat16, FP8_OUT=False, **PUSH_2)]),
    (tgm._nvfp4_gemv_kernel,
     dict(a_ptr=P_BF16, b_ptr=P_U8, bs_ptr=P_F8, c_ptr=P_BF16, a_global_ptr=P_F32, b_global_ptr=P_F32, bias_ptr=P_BF16,
          bases_ptr="*i64", slots_ptr=P_I32, N="i32", K="i32"),
     [dict(HAS_BIAS=False, SPLIT_K=1, BLOCK_N=4, BLOCK_K=4096, **NO_PUSH),
      dict(HAS_BIAS=True, SPLIT_K=1, BLOCK_N=8, BLOCK_K=1024, **PUSH_2)], "NVFP4, one token"),
    (troute._softmax_topk_kernel,
     dict(logits_ptr=P_BF16, w_ptr=P_F32, ids_ptr="*i64", E="i32", stride_t="i32", scale="fp32", local_start="i32",
          local_count="i32"),
     [dict(TOP_K=8, K_BLOCK=8, BLOCK_E=128, RENORM=True, LOCAL=True, num_warps=1),
      dict(TOP_K=6, K_BLOCK=8, BLOCK_E=1024, RENORM=False, LOCAL=False, num_warps=4)]),
    (tq._int8_static_kernel, dict(x_ptr=P_BF16, out_ptr=P_BF16, scale_ptr=P_F32, n="i32"), [dict(BLOCK=1024)],
     "INT8 values"),
    (tq._expert_static_kernel,
     dict(x_ptr=P_BF16, experts_ptr="*i64", scale_ptr=P_F32, smooth_ptr=P_F32, out_ptr=P_BF16, out_scale_ptr=P_F32,
          k="i32", stride_x="i32"),
     [dict(ROW_DIV=8, INT8=True, SMOOTH=True, BLOCK=1024), dict(ROW_DIV=1, INT8=False, SMOOTH=False, BLOCK=512)],
     "MoE pairs under their experts' static scales"),
    (tq._int8_static_kernel, dict(x_ptr=P_F32, out_ptr=P_I8, scale_ptr=P_F32, n="i32"), [dict(BLOCK=1024)],
     "INT8 codes"),
    (tqm._mx_values_kernel, dict(x_ptr="*i16", out_ptr="*i16", k="i32", stride_x="i32"),
     [dict(BLOCKS=8, FP4=False, BF16_BITS=True), dict(BLOCKS=8, FP4=True, BF16_BITS=True)], "bf16 bits"),
    (tqm._mx_values_kernel, dict(x_ptr=P_F32, out_ptr=P_F32, k="i32", stride_x="i32"),
     [dict(BLOCKS=8, FP4=False, BF16_BITS=False), dict(BLOCKS=8, FP4=True, BF16_BITS=False)], "float32"),
    (tmoe._moe_gemm_kernel, _moe_gemm(P_F8, P_BF16),  # per-token FP8: gate/up out in BF16, per-row scales
     [dict(A_ROW_DIV=8, ROW_SCALES=True, GATED=True, C_FP8=False, MUL_WEIGHT=False, SPLIT_K=1, BLOCK_M=16,
           BLOCK_N=32, BLOCK_K=256, **MOE_FP8),
      dict(A_ROW_DIV=1, ROW_SCALES=True, GATED=True, C_FP8=False, MUL_WEIGHT=False, SPLIT_K=1, BLOCK_M=64,
           BLOCK_N=128, BLOCK_K=128, num_warps=8, **MOE_FP8)], "FP8 per token, gate/up"),
    (tmoe._moe_gemm_kernel, _moe_gemm(P_F8, P_F32),
     [dict(A_ROW_DIV=1, ROW_SCALES=True, GATED=False, C_FP8=False, MUL_WEIGHT=True, SPLIT_K=4, BLOCK_M=16,
           BLOCK_N=64, BLOCK_K=256, **MOE_FP8),
      dict(A_ROW_DIV=1, ROW_SCALES=False, GATED=False, C_FP8=False, MUL_WEIGHT=True, SPLIT_K=1, BLOCK_M=64,
           BLOCK_N=128, BLOCK_K=128, num_warps=8, **MOE_FP8)], "FP8 down"),
    *_moe_weight_decode_entries(),
    (tmoe._moe_gemm_kernel, _moe_gemm(P_F8, P_F8),
     [dict(A_ROW_DIV=8, ROW_SCALES=False, GATED=True, C_FP8=True, MUL_WEIGHT=False, SPLIT_K=1, BLOCK_M=16,
           BLOCK_N=32, BLOCK_K=256, **MOE_FP8)], "FP8 per tensor, gate/up"),
]

# The weight-only family (``triton_weight_only``): each weight FORMAT once, with its scheme's pointer types
# and flags, on each of its paths: one token (``triton_weight_gemv``), the MMA kernel at the tiles of the
# given M (split K into a float32 buffer, or not), and for formats exact in BF16 the expansion for cuBLAS
# (and its epilogue).
WEIGHT_ONLY = [  # (scheme, FORMAT, weight, scale, row scale, x scale, FP4_GROUP, group, (M, SPLIT_K, activations))
    ("fp8_block_wo", two.FP8_BLOCK, P_F8, P_F32, None, None, 16, 128, (16, 4, "bf16")),
    ("int4_wo", two.INT4, P_U8, P_F32, None, None, 16, 128, (4096, 1, "bf16")),
    ("int8_sq", two.INT8, P_I8, None, P_F32, None, 16, 0, (4, 1, "fp32")),
    ("nvfp4_wo", two.NVFP4, P_U8, P_F8, P_F32, None, 16, 0, (16, 2, "bf16")),
    ("w4a8_nvfp4", two.NVFP4, P_U8, P_F8, P_F32, None, 32, 0, (200, 1, "bf16")),
    ("mxfp4", two.MXFP4, P_U8, P_U8, None, None, 16, 0, (48, 4, "bf16")),
    ("w4a8_mxfp4 per token", two.MXFP4, P_U8, P_U8, None, P_F32, 16, 0, (16, 2, "fp32")),
    ("mxfp8", two.MXFP8, P_F8, P_U8, None, None, 16, 0, (100, 1, "bf16")),
]
TORCH_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _weight_only_entries() -> list:
    import torch

    from mopt.kernels import triton_weight_gemv as twg
    from mopt.kernels import triton_weight_prefill as twp
    from mopt.kernels.triton_weight_decode import GROUP_SCALED, group_bytes, scale_group

    entries = []
    for i, (name, fmt, weight, scale, rows, x_scale, fp4_group, group, (m, split, act)) in enumerate(WEIGHT_ONLY):
        pointers = dict(a_ptr=f"*{act}", b_ptr=weight, s_ptr=scale or weight, r_ptr=rows or weight,
                        x_scale_ptr=x_scale or weight, bias_ptr=f"*{act}")
        flags = dict(HAS_ROW_SCALE=rows is not None, HAS_X_SCALE=x_scale is not None, HAS_BIAS=i % 2 == 0)
        g = scale_group(fmt, group, fp4_group)
        t = twp.mma_tiles(fmt, m, group, getattr(torch, TORCH_DTYPES[act]))
        entries.append((twp._wo_mma_kernel,
                        dict(pointers, c_ptr=f"*{act}", ws_ptr=P_F32, locks_ptr=P_I32, bases_ptr="*i64",
                             slots_ptr=P_I32, M="i32", N="i32", K="i32", stride_am="i32", stride_b="i32",
                             stride_cm="i32", num_groups="i32"),
                        [dict(flags, FORMAT=fmt, GROUP=g, SPLIT_K=split, DOT_F32=act == "fp32", BLOCK_M=t.block_m,
                              BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=8, num_warps=t.num_warps,
                              **(PUSH_2 if fmt == two.NVFP4 and act == "bf16" else NO_PUSH))], f"{name} M={m}"))
        gt = twg.gemv_tiles(fmt, 4096)
        groups = max(1, gt.row_bytes // group_bytes(fmt, g))
        entries.append((twg._wo_gemv_kernel,
                        dict(pointers, c_ptr=f"*{act}", N="i32", K="i32", stride_b="i32", num_groups="i32"),
                        [dict(flags, FORMAT=fmt, GROUP=g, EVEN_K=i % 2 == 1, BLOCK_N=gt.block_n, GROUPS=groups,
                              SUM_GROUPS=gt.sum_groups, num_warps=gt.num_warps)], f"{name} one token"))
        if fmt not in GROUP_SCALED:
            out = P_BF16 if act == "bf16" else P_F32
            entries.append((twp._wo_expand_kernel,
                            dict(b_ptr=weight, s_ptr=scale or weight, out_ptr=out, N="i32", K="i32", num_groups="i32"),
                            [dict(FORMAT=fmt, GROUP=g, BLOCK_N=16, GROUPS=max(1, 512 // group_bytes(fmt, g)), num_warps=4)],
                            f"{name} expansion"))
    entries.append((twp._epilogue_kernel,
                    dict(y_ptr=P_F32, r_ptr=P_F32, x_scale_ptr=P_F32, bias_ptr=P_BF16, c_ptr=P_BF16, M="i32", N="i32"),
                    [dict(HAS_ROW_SCALE=True, HAS_X_SCALE=True, HAS_BIAS=True, BLOCK_M=32, BLOCK_N=128, num_warps=4)]))
    return entries


def main() -> int:
    failures = 0
    for fn, types, variants, *label in KERNELS + _weight_only_entries():
        for variant in variants:
            constexprs = {k: v for k, v in variant.items() if k != "num_warps"}
            options = {"num_warps": variant["num_warps"]} if "num_warps" in variant else {}
            if "IMPRECISE" in fn.arg_names and "BLOCK_K" in constexprs:  # as the GEMVs launch it
                constexprs.setdefault("IMPRECISE", min(128, constexprs["BLOCK_K"]))
            if fn is tg._gemv_kernel:
                constexprs.setdefault("SPLIT_K", 1)
            if "PDL" in fn.arg_names:  # decode-path kernels: compiled as the GPU launches them, with PDL
                constexprs.setdefault("PDL", True)
                options["launch_pdl"] = constexprs["PDL"]
            name = f"{fn.fn.__name__}{f' [{label[0]}]' if label else ''}{variant}"
            signature = dict(types, **{k: "constexpr" for k in constexprs})
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                          options=options or None)
                shared = compiled.metadata.shared
                ok = shared <= HOPPER_SHARED_BYTES
                ptx = compiled.asm["ptx"]
                waits = "griddepcontrol.wait" in ptx
                ok = ok and waits == bool(constexprs.get("PDL"))
                early = ""
                if waits and WEIGHTS_BEFORE_WAIT.get(fn.fn.__name__, lambda c: False)(constexprs):
                    loads = ptx[:ptx.index("griddepcontrol.wait")].count("ld.global")
                    ok = ok and loads > 0
                    early = f", {loads} weight loads before it"
                print(f"{'ok' if ok else 'FAIL'} {name}: {shared} B shared, PDL wait {'in' if waits else 'not in'} "
                      f"its PTX{early}")
                failures += not ok
            except Exception as e:  # report every kernel, then fail
                root = e
                while root.__cause__ is not None:  # Triton chains one CompilationError per call level
                    root = root.__cause__
                cause = f" (caused by {type(root).__name__}: {str(root)[-300:]})" if root is not e else ""
                print(f"FAIL {name}: {type(e).__name__}: {str(e)[-400:]}{cause}")
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
