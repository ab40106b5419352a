"""Triton GEMMs for Hopper: FP8 W8A8 (epilogue or 128-block scales) and exact NVFP4 W4A4.

``y[M, N] = x[M, K] @ W[N, K]^T`` with W in the canonical layouts of ``mopt.kernels.linear``.

* ``fp8_gemm``: FP8 E4M3 operands on the tensor cores, float32 accumulation. Scales either in the
  epilogue (per-row ``a_scale [M]`` or scalar, per-column ``b_scale [N]`` or scalar), or per 128-wide
  K block (``a_scale [M, Kb]``, ``b_scale [N, Kb]``) applied to each block's partial product, as
  ``mopt.kernels.reference.fp8_block_gemm`` does.
* ``nvfp4_gemm``: activations arrive as BF16 block values (E2M1 value times E4M3 block scale, exact;
  ``triton_quant.nvfp4_block_values``); packed FP4 weights are expanded to the same exact block
  values (in the kernel for small M, into a BF16 scratch copy for cuBLAS at large M) and multiplied
  with float32 accumulation; both global scales are applied after. Results equal Blackwell's W4A4
  up to float32 accumulation order.

Small M (decode) splits K across programs (``SPLIT_K``) so that enough programs stream the weights;
partial sums are added atomically into a float32 buffer.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mopt.kernels import triton_allreduce_norm
from mopt.kernels.triton_allreduce_norm import push_rows
from mopt.kernels.triton_pdl import launch_options, pdl_launch_dependents, pdl_wait
from mopt.kernels.triton_weight_decode import e2m1_pair as _e2m1_pair  # one E2M1 decode for every kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _store(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, bias_ptr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Writes the tile (plus the bias), or adds it atomically into the float32 split-K buffer. Returns
    ``(tile as written, mask)``."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    if SPLIT_K == 1:
        written = acc.to(c_ptr.dtype.element_ty)
        tl.store(ptrs, written, mask=mask)
    else:
        written = acc
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    return written, mask


@triton.jit
def scale_tile(acc, a_scale_ptr, b_scale_ptr, offs_m, offs_n, m_ok, n_ok, A_ROWWISE: tl.constexpr,
               B_ROWWISE: tl.constexpr):
    """``acc [BM, BN] * a_scale[m] * b_scale[n]``, each scale per row (``*_ROWWISE``) or one scalar."""
    if A_ROWWISE:
        sa = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
    else:
        sa = tl.load(a_scale_ptr + tl.zeros_like(offs_m))
    if B_ROWWISE:
        sb = tl.load(b_scale_ptr + offs_n, mask=n_ok, other=0.0)
    else:
        sb = tl.load(b_scale_ptr + tl.zeros_like(offs_n))
    return acc * sa[:, None] * sb[None, :]


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, stride_am, stride_bn,
                     stride_cm, num_kb, A_ROWWISE: tl.constexpr, B_ROWWISE: tl.constexpr,
                     BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = tl.program_id(1) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_rows = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn
    for t in range(first, last):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_rows + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if BLOCK_SCALES:  # BLOCK_K == 128: one scale per row and K block
            sa = tl.load(a_scale_ptr + offs_m * num_kb + t, mask=m_ok, other=0.0)
            sb = tl.load(b_scale_ptr + offs_n * num_kb + t, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        else:
            # Hopper's FP8 MMAs accumulate with ~14-bit precision; promote into the float32
            # accumulator every 128 products, as cuBLASLt does without fast accumulation.
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=128)
    if not BLOCK_SCALES:
        acc = scale_tile(acc, a_scale_ptr, b_scale_ptr, offs_m, offs_n, m_ok, n_ok, A_ROWWISE, B_ROWWISE)
    _store(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, bias_ptr, HAS_BIAS, SPLIT_K)


@triton.jit
def _scale_pairs(values, scale, BLOCK_N: tl.constexpr, HALF_K: tl.constexpr):
    """``values [BN, BK/2]`` (one parity of 8 blocks' elements per block) times ``scale [BN, BK/16]``."""
    v = tl.reshape(values, (BLOCK_N, HALF_K // 8, 8)) * scale[:, :, None]
    return tl.reshape(v, (BLOCK_N, HALF_K))


@triton.jit
def _load_fp4_tile(b_rows, s_rows, t, n_ok, K, HALF_K: tl.constexpr):
    offs_b = t * HALF_K + tl.arange(0, HALF_K)
    packed = tl.load(b_rows + offs_b[None, :], mask=n_ok[:, None] & (offs_b < K // 2)[None, :], other=0)
    offs_s = t * (HALF_K // 8) + tl.arange(0, HALF_K // 8)
    scale = tl.load(s_rows + offs_s[None, :], mask=n_ok[:, None] & (offs_s < K // 16)[None, :], other=0.0)
    return packed, scale.to(tl.float32) * 16384.0, offs_b


@triton.jit
def _nvfp4_dequant_kernel(b_ptr, bs_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Exact BF16 block values ``[N, K]`` of packed weights (``K`` padded to 16)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n[:, None].to(tl.int64)
    packed, scale, offs_b = _load_fp4_tile(b_ptr + rows * (K // 2), bs_ptr + rows * (K // 16), tl.program_id(1),
                                           n_ok, K, BLOCK_K // 2)
    even, odd = _e2m1_pair(packed)
    even = _scale_pairs(even, scale, BLOCK_N, BLOCK_K // 2)
    odd = _scale_pairs(odd, scale, BLOCK_N, BLOCK_K // 2)
    values = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = n_ok[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + rows * K + offs_k[None, :], values.to(tl.bfloat16), mask=mask)


@triton.jit
def _nvfp4_gemv_step(a_ptr, packed, scale, offs_b, acc, K, BLOCK_N: tl.constexpr, HALF_K: tl.constexpr):
    """Adds one weight tile's products, each 16-block's partial sum times its block scale."""
    even, odd = _e2m1_pair(packed)
    k_ok = offs_b < K // 2
    xe = tl.load(a_ptr + 2 * offs_b, mask=k_ok, other=0.0).to(tl.float32)
    xo = tl.load(a_ptr + 2 * offs_b + 1, mask=k_ok, other=0.0).to(tl.float32)
    prod = even * xe[None, :] + odd * xo[None, :]
    blocks = tl.sum(tl.reshape(prod, (BLOCK_N, HALF_K // 8, 8)), axis=2)
    return acc + tl.sum(blocks * scale, axis=1)


@triton.jit
def _nvfp4_gemv_kernel(a_ptr, b_ptr, bs_ptr, c_ptr, a_global_ptr, b_global_ptr, bias_ptr, bases_ptr, slots_ptr, N, K,
                       HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PUSH: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, ROW_ELEMS: tl.constexpr,
                       PDL: tl.constexpr):
    """One token: streams the packed weights once, FMA reductions per 16-block, the block scale applied to
    each block's partial sum. ``PUSH`` (``SPLIT_K == 1``): the output tile also goes to the peers' fused
    all-reduce (``push_rows``)."""
    pdl_launch_dependents(PDL)
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_m = tl.arange(0, 1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = tl.program_id(1) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    rows = offs_n[:, None].to(tl.int64)
    b_rows, s_rows = b_ptr + rows * (K // 2), bs_ptr + rows * (K // 16)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # the first weight tile is loaded before waiting for the activations (see triton_pdl); a split
    # past the last tile loads nothing and adds nothing
    first_ok = offs_n < tl.where(first < last, N, 0)
    packed, scale, offs_b = _load_fp4_tile(b_rows, s_rows, first, first_ok, K, HALF_K)
    pdl_wait(PDL)
    if first < last:
        acc = _nvfp4_gemv_step(a_ptr, packed, scale, offs_b, acc, K, BLOCK_N, HALF_K)
    for t in range(first + 1, last):
        packed, scale, offs_b = _load_fp4_tile(b_rows, s_rows, t, n_ok, K, HALF_K)
        acc = _nvfp4_gemv_step(a_ptr, packed, scale, offs_b, acc, K, BLOCK_N, HALF_K)
    scale = tl.load(a_global_ptr) * tl.load(b_global_ptr + offs_n, mask=n_ok, other=0.0)
    values, mask = _store(c_ptr, (acc * scale)[None, :], offs_m, offs_n, 1, N, N, bias_ptr, HAS_BIAS, SPLIT_K)
    if PUSH:  # SPLIT_K == 1: the tile as written
        push_rows(values, offs_m, offs_n, mask, bases_ptr, slots_ptr, RANK, WORLD, ROW_ELEMS)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(m: int, n: int, k: int, device: torch.device, block_k: int, block_scales: bool = False) -> dict:
    """Tile shape and split-K by M bucket: decode streams weights, prefill fills the tensor cores."""
    if m > 128 and block_scales:
        # Each 128-wide K block's product is scaled before it joins the accumulator, so the MMA
        # cannot accumulate in place; 64x256 tiles on 8 warps measured fastest on an H100
        # (2026-11-25 sweep at M=8192: 0.34-0.36x _scaled_mm against 0.24-0.27x for 128x128).
        bm, bn, warps, stages = 64, 256, 8, 3
    elif m <= 16:  # from a sweep on an H100 (2026-11-25): BLOCK_K 256, 4 warps, 3 stages
        bm, warps, stages = 16, 4, 3
        bn = (32 if n >= 16384 else 64) if m == 1 else (64 if k > 8192 else 128)
    elif m <= 128:
        bm, bn, warps, stages = 64, 128, 4, 4
    else:
        bm, bn, warps, stages = 128, 128, 8, 3
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_tiles = triton.cdiv(k, block_k)
    split = 1
    if tiles < 2 * _num_sms(device):
        split = max(1, min(k_tiles // 2, triton.cdiv(2 * _num_sms(device), tiles)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, SPLIT_K=split, GROUP_M=8, num_warps=warps,
                num_stages=stages)


def _output(m: int, n: int, dtype: torch.dtype, split: int, device) -> torch.Tensor:
    return (torch.zeros if split > 1 else torch.empty)((m, n), dtype=torch.float32 if split > 1 else dtype,
                                                       device=device)


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, block_scales: bool = False,
             config: dict | None = None) -> torch.Tensor:
    """``a [M, K]`` e4m3 (row-major), ``b [N, K]`` e4m3; scales as in the module docstring.
    ``config``: tile settings overriding ``_config`` (sweeps)."""
    m, k = a.shape
    n = b.shape[0]
    cfg = config or _config(m, n, k, a.device, 128 if block_scales or m > 16 else 256, block_scales)
    out = _output(m, n, out_dtype, cfg["SPLIT_K"], a.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _fp8_gemm_kernel[grid](
        a, b, out, a_scale.contiguous(), b_scale.contiguous(), bias if bias is not None else a_scale,
        m, n, k, a.stride(0), b.stride(0), out.stride(0), b_scale.shape[-1] if block_scales else 1,
        A_ROWWISE=a_scale.numel() > 1, B_ROWWISE=b_scale.numel() > 1, BLOCK_SCALES=block_scales,
        HAS_BIAS=bias is not None, **cfg)
    return out.to(out_dtype) if out.dtype != out_dtype else out


def nvfp4_gemv_tiles(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of the one-token NVFP4 kernel, from sweeps on an H100 over
    Llama-3-8B layer shapes (``bench/sweep_nvfp4_gemv.py``, 2026-11-26, whole layers and per rank of two):
    narrow tiles and no split-K, within 2% of each shape's best on average and 2-30% faster than 32-row
    tiles split over K (4096x2048: 5.4 us against 7.7, counting the split's zeroed buffer and cast;
    4096x14336, the one shape where split-K won: 28.8 against 28.1). Rows of up to 4096 values (``--wide``,
    same day) help only where a whole row of 4096 is one step and N is small: 3072x4096 7.6 us against 9.4,
    6144x4096 13.5 against 14.3; they lose elsewhere (4096x2048: 9.3 against 5.5)."""
    if n <= 6144 and 2048 < k <= 4096:
        return 4, 4096, 8, 4
    return (16, 512, 4, 4) if n >= 14336 else (8, 1024, 8, 4)


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BF16 x BF16 -> float32 output (cuBLAS keeps the float32 accumulator); float32 math on CPU and for
    float32 inputs."""
    if a.is_cuda:
        return torch.mm(a, b) if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def nvfp4_dequantize(b_packed: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """BF16 ``[N, Kp]`` block values of packed weights (exact; one pass)."""
    n, kp = b_packed.shape[0], b_packed.shape[1] * 2
    out = torch.empty((n, kp), dtype=torch.bfloat16, device=b_packed.device)
    grid = (triton.cdiv(n, 32), triton.cdiv(kp, 256))
    _nvfp4_dequant_kernel[grid](b_packed, b_scale, out, n, kp, BLOCK_N=32, BLOCK_K=256)
    return out


def nvfp4_alpha(a_global: torch.Tensor, b_global: torch.Tensor) -> float | None:
    """``a_global * b_global`` as a Python float when every weight row shares its global scale (one
    host sync; call once after loading), else None. Lets cuBLAS apply both global scales to its
    float32 accumulator and write BF16 directly (what the reference computes, rounded once)."""
    g = b_global.reshape(-1)
    if not bool((g == g[0]).all()):
        return None
    return float(a_global.float().reshape(()) * g[0].float())


def nvfp4_gemm(a_values: torch.Tensor, b_packed: torch.Tensor, b_scale: torch.Tensor, a_global: torch.Tensor,
               b_global: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
               alpha: float | None = None, config: tuple[int, int, int, int, int] | None = None,
               push: triton_allreduce_norm.PeerRows | None = None) -> torch.Tensor:
    """``a_values [M, Kp]`` BF16 block values, ``b_packed [N, Kp/2]``, ``b_scale [N, Kp/16]`` e4m3,
    ``a_global []``, ``b_global [N]``; ``alpha``: ``nvfp4_alpha(a_global, b_global)`` if known;
    ``config``: the one-token kernel's ``(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K)`` (sweeps);
    ``push``: also send the output row to the peers' fused all-reduce (one token, written once, see
    ``triton_allreduce_norm.push_rows``).

    One token: a Triton kernel streams the packed weights (0.5625 bytes per weight). More: the weights
    are expanded once per call into exact BF16 block values and multiplied by cuBLAS's BF16 GEMM (float32
    accumulation); the global scales are applied to the float32 accumulator, in cuBLAS's epilogue when
    they are one ``alpha`` and BF16 is asked for, else to a float32 output. The expansion costs one pass
    over N x K, small against a GEMM of many tokens (``triton_linear`` runs 2 to ``NVFP4_MMA_MAX_M`` tokens
    on the weight-decoding MMA kernel instead).
    """
    m, kp = a_values.shape
    n = b_packed.shape[0]
    if push is not None:
        if m != 1 or (config is not None and config[4] != 1):
            raise ValueError(f"nvfp4_gemm: only one token's output, written once, can be pushed (M={m})")
        triton_allreduce_norm.check_push(push, m, n, out_dtype)
    if m > 1:
        w = nvfp4_dequantize(b_packed, b_scale)
        if alpha is not None and a_values.is_cuda and out_dtype == torch.bfloat16:
            # beta=1 with a bias vector keeps cuBLASLt's fused epilogue: alpha * acc + bias, rounded once
            c = bias.to(out_dtype) if bias is not None else torch.zeros(n, dtype=out_dtype, device=w.device)
            return torch.addmm(c, a_values, w.t(), alpha=alpha)
        y = _mm_float32(a_values, w.t()) * (a_global.float() * b_global.float())
        if bias is not None:
            y += bias.float()
        return y.to(out_dtype)
    bn, bk, warps, stages = config[:4] if config else nvfp4_gemv_tiles(n, kp)
    split = config[4] if config else 1  # no split (see nvfp4_gemv_tiles)
    out = _output(m, n, out_dtype, split, a_values.device)
    push_pointers, push_constants = triton_allreduce_norm.push_arguments(push, b_global)
    _nvfp4_gemv_kernel[(triton.cdiv(n, bn), split)](
        a_values, b_packed, b_scale, out, a_global.float().reshape(1), b_global.float().contiguous(),
        bias if bias is not None else b_global, *push_pointers, n, kp, HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_N=bn, BLOCK_K=bk, **push_constants, num_warps=warps, num_stages=stages,
        **launch_options(a_values.device))
    return out.to(out_dtype) if out.dtype != out_dtype else out
