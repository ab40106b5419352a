"""Compiles mopt's newer Triton kernels for Hopper (sm_90) on any machine, without a GPU.

Run by ``test_hopper_compile.py`` in a subprocess without ``TRITON_INTERPRET`` (the interpreter accepts
programs the compiler refuses, e.g. a variable whose tile shape changes inside a branch). Each entry:
kernel, argument types, constexpr variants. Prints one line per compiled variant and its shared memory.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mopt.kernels import triton_argmax as targ
from mopt.kernels import triton_attention as ta
from mopt.kernels import triton_gemv as tg
from mopt.kernels import triton_glue as tgl

P_BF16, P_F8, P_F32, P_I32 = "*bf16", "*fp8e4nv", "*fp32", "*i32"
HOPPER_SHARED_BYTES = 227 * 1024

KERNELS = [
    (ta._rope_write_kernel,
     dict(q_ptr=P_BF16, k_ptr=P_BF16, v_ptr=P_BF16, q_out_ptr=P_BF16, pos_ptr=P_I32, cos_sin_ptr=P_F32, slot_ptr=P_I32,
          k_cache_ptr=P_F8, v_cache_ptr=P_F8, k_scale="fp32", v_scale="fp32", stride_qt="i32", stride_qh="i32",
          stride_kt="i32", stride_kh="i32", stride_vt="i32", stride_vh="i32", num_heads="i32", num_kv_heads="i32"),
     [dict(HALF=64, BLOCK_H=32, BLOCK_KV=8, FP8=True), dict(HALF=32, BLOCK_H=4, BLOCK_KV=2, FP8=False)]),
    (ta._decode_kernel,
     dict(q_ptr=P_BF16, k_cache_ptr=P_F8, v_cache_ptr=P_F8, bt_ptr=P_I32, seq_lens_ptr=P_I32, out_ptr=P_F8,
          part_ptr=P_F32, lse_ptr=P_F32, out_scale_ptr=P_F32, k_scale="fp32", v_scale="fp32",
          sm_scale="fp32", stride_qb="i32", stride_qh="i32", stride_bt="i32", num_heads="i32", num_kv_heads="i32",
          window="i32"),
     [dict(GROUP=4, BLOCK_H=16, D=128, PAGE=16, BLOCK_N=64, NUM_SPLITS=32, FP8=True, IEEE=False, FP8_OUT=True),
      dict(GROUP=8, BLOCK_H=16, D=128, PAGE=32, BLOCK_N=64, NUM_SPLITS=1, FP8=True, IEEE=False, FP8_OUT=False)]),
    (ta._decode_merge_kernel, dict(part_ptr=P_F32, lse_ptr=P_F32, out_ptr=P_F8, out_scale_ptr=P_F32),
     [dict(NUM_SPLITS=32, D=128, DTYPE=triton.language.bfloat16, FP8_OUT=True)]),
    (ta._prefill_kernel,
     dict(q_ptr=P_BF16, k_cache_ptr=P_F8, v_cache_ptr=P_F8, out_ptr=P_BF16, bt_ptr=P_I32, seq_lens_ptr=P_I32,
          qsl_ptr=P_I32, out_scale_ptr=P_F32, k_scale="fp32", v_scale="fp32", sm_scale="fp32", stride_qt="i32",
          stride_qh="i32", stride_bt="i32", num_heads="i32", num_kv_heads="i32", window="i32"),
     [dict(GROUP=4, D=128, PAGE=16, BLOCK_M=64, BLOCK_N=64, FP8=True, IEEE=False, FP8_OUT=False)]),
    (targ._chunk_max_kernel, dict(x_ptr=P_F32, val_ptr=P_F32, idx_ptr=P_I32, n="i32", stride="i32"),
     [dict(CHUNKS=32, BLOCK=4096)]),
    (targ._pick_chunk_kernel, dict(val_ptr=P_F32, idx_ptr=P_I32, out_ptr="*i64"), [dict(CHUNKS=32)]),
    (tgl._rms_norm_kernel,
     dict(x_ptr=P_BF16, res_ptr=P_BF16, w_ptr=P_F32, out_ptr=P_F8, res_out_ptr=P_BF16, scale_ptr=P_F32,
          stride_x="i32", stride_r="i32", n="i32", eps="fp32"),
     [dict(BLOCK=4096, HAS_RESIDUAL=True, FP8_OUT=True), dict(BLOCK=16384, HAS_RESIDUAL=False, FP8_OUT=False)]),
    (tgl._silu_mul_kernel, dict(x_ptr=P_BF16, out_ptr=P_F8, scale_ptr=P_F32, stride_x="i32", n="i32"),
     [dict(BLOCK=1024, FP8_OUT=True)]),
    (tg._gemv_kernel,
     dict(a_ptr=P_F8, b_ptr=P_F8, c_ptr=P_BF16, a_scale_ptr=P_F32, b_scale_ptr=P_F32, bias_ptr=P_F32, M="i32",
          N="i32", K="i32", stride_am="i32", stride_bn="i32", stride_cm="i32"),
     [dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, DOT=False),
      dict(A_ROWWISE=True, B_ROWWISE=True, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=512, DOT=True)]),
    (tg._gemv_kernel,
     dict(a_ptr=P_BF16, b_ptr=P_BF16, c_ptr=P_BF16, a_scale_ptr=P_F32, b_scale_ptr=P_F32, bias_ptr=P_BF16, M="i32",
          N="i32", K="i32", stride_am="i32", stride_bn="i32", stride_cm="i32"),
     [dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, DOT=False),
      dict(A_ROWWISE=False, B_ROWWISE=False, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, DOT=True)]),
]


def main() -> int:
    failures = 0
    for fn, types, variants in KERNELS:
        for constexprs in variants:
            name = f"{fn.fn.__name__}{constexprs}"
            signature = dict(types, **{k: "constexpr" for k in constexprs})
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
                shared = compiled.metadata.shared
                ok = shared <= HOPPER_SHARED_BYTES
                print(f"{'ok' if ok else 'FAIL'} {name}: {shared} B shared")
                failures += not ok
            except Exception as e:  # report every kernel, then fail
                print(f"FAIL {name}: {type(e).__name__}: {str(e)[-400:]}")
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
