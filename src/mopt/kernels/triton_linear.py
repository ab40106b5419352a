"""GPU linear kernels (Triton and cuBLASLt through ``torch._scaled_mm``), registered for CUDA.

Selection (``mopt.kernels.linear.select_linear_kernel``), in order:

* ``hopper-fp8`` (backend ``auto``): FP8 per-tensor and per-channel x per-token; by M bucket,
  the decode GEMV (``triton_gemv``) for M <= ``fp8_gemv_rows(layer)`` and ``_scaled_mm`` above it
  (cuBLASLt).
  Per-tensor layers also take activations the kernel before them already quantized (E4M3 codes
  under the layer's static input scale: ``fp8_input_scale``);
* ``triton-fp8-block``: 128x128-block FP8 weights with 1x128 activation groups;
* ``triton-nvfp4``: exact W4A4 on the activations' NVFP4 block values, by M bucket: the packed-weight
  GEMV for one token and weights expanded for cuBLAS above ``NVFP4_MMA_MAX_M`` (``triton_gemm.nvfp4_gemm``),
  the weight-decoding MMA kernel between (``triton_weight_prefill.wo_mma``, both global scales as one
  row scale). Also takes block values the kernel before it already wrote (``nvfp4_input_scale``,
  ``kernels.quantized_input``);
* ``cublas-fp8`` / ``triton-fp8``: one engine for every M, for ``MOPT_BACKEND=cublas|triton``;
* ``triton-gemv`` (backend ``auto``): unquantized BF16/FP16 layers (and the excluded ``lm_head``),
  the decode GEMV up to 32 tokens (cuBLAS's split-K GEMV adds a reduction launch), cuBLAS above.

Where a fused gate/up layer runs on the decode GEMV (``hopper-fp8``, ``triton-fp8``, ``triton-gemv``),
``apply_silu_gated`` also applies the SiLU-gated product in the same kernel (``triton_gemv.silu_gated_gemv``).

A row-parallel layer whose partial sums go to the fused all-reduce + RMSNorm names it as ``layer.partials_to``
for the call; the decode GEMVs (BF16/FP16, FP8, NVFP4 up to ``NVFP4_MMA_MAX_M`` tokens) then send their output rows to the peers
from their epilogue (``triton_allreduce_norm.push_rows``) wherever that norm takes them.

Activations are quantized by ``triton_quant`` (bit-exact with the reference formats). All need
compute capability >= 8.9 (FP8 tensor cores); NVFP4 >= 8.0 (BF16 tensor cores).
"""

from __future__ import annotations

import torch

from mopt.kernels import triton_gemm, triton_gemv, triton_quant
from mopt.kernels.quantized_input import nvfp4_block_values_of
from mopt.kernels.triton_weight_decode import NVFP4
from mopt.kernels.triton_weight_prefill import wo_mma
from mopt.kernels.linear import (LinearKernel, LinearScheme, LinearShape, cuda_capability, flatten_tokens,
                                 layer_per_token_fp8, register_linear_kernel)
from mopt.quant.formats.fp8 import FP8_DTYPE

# Rows (tokens) up to which the decode GEMV runs, cuBLAS above; from sweeps and end-to-end decode (2026-11-26,
# bench/results/gemv-m64-h100-2026-11-26.txt, sweep-fp8-rowwise-h100-2026-11-26.txt, gemv-bf16-m64-h200x2-2026-11-26.txt):
# BF16 up to 32. At 64 the GEMV gave Llama-3-8B decode +2.2% over cuBLAS on one H100, but on 2x H200 (same run)
# -0.4% at TP=1 and -6.7% at TP=2, whose per-rank matrices are half as large (at 32: +0.4% and +0.7%). FP8 up to
# 16 where the weight has one scale: above, cuBLASLt's one-scale GEMM streams faster than the GEMV (H200,
# 2026-11-27, bench/results/sweep-fp8-gemv-rows-h200-2026-11-27.txt: 4096x14336 at 64 rows 18.3 us, the GEMV's
# best 30.1). Up to 64 where it has one per output row (fused shards keeping their own scales, per-channel
# checkpoints): cuBLASLt's rowwise GEMM costs 1.3-2.1x its one-scale GEMM, and the GEMV's 64-row tiles take
# 0.6-0.8x its time (3072x4096: 10.7 us against 15.1; 28672x4096: 32.7 against 44.1).
BF16_GEMV_MAX_M = 32
FP8_GEMV_MAX_M = 16
FP8_ROWWISE_GEMV_MAX_M = 64
# The SiLU-gated FP8 GEMV up to 16 tokens only: on its 64-row tiles (17-64 tokens) it took Llama-3-8B decode at
# TP=2 from 10851 / 20431 tok/s (gate/up on the plain GEMV, then the SiLU kernel) to 9703 / 19048 at batch
# 32 / 64 (2x H100, bench/results/fp8-gemv-rows-h100x2-2026-11-27-gated.txt). A likely cause, not profiled further:
# with two weight tiles a stage one gated program fills an SM's shared memory, where two plain ones fit.
FP8_SILU_GATED_MAX_M = 16
ROWWISE_SCALE_ROWS = 1024  # static activation scales expanded once for the rowwise GEMM, sliced per call
# NVFP4 from 2 tokens up to here on the weight-decoding MMA kernel: on an H200 (2026-11-26,
# bench/results/sweep-nvfp4-mma-h200-2026-11-26.txt, Llama-3-8B shapes whole and per rank of two) 1.04-2.26x
# nvfp4_gemm (its 16-row tiles up to 16 tokens, expansion for cuBLAS above) at 2-64 tokens, 0.90-1.28x at
# 128, 0.59-0.82x at 256.
NVFP4_MMA_MAX_M = 128


def _push_target(layer, rows: int, n: int, dtype: torch.dtype):
    """``(norm, peers)``: where the decode GEMV of a row-parallel ``layer`` sends its partial sums itself (the
    fused all-reduce + norm its output goes to, ``layer.partials_to``), or ``(None, None)``."""
    norm = getattr(layer, "partials_to", None)
    peers = norm.push_peers(rows, n, dtype) if norm is not None else None
    return (norm, peers) if peers is not None else (None, None)


def _pushed(norm, y: torch.Tensor) -> torch.Tensor:
    if norm is not None:
        norm.pushed(y)
    return y


def fp8_gemv_rows(layer) -> int:
    """The most tokens for which ``hopper-fp8`` runs ``layer`` on the decode GEMV."""
    return FP8_ROWWISE_GEMV_MAX_M if layer.weight_scale.numel() > 1 else FP8_GEMV_MAX_M


FP8_SCHEMES = (LinearScheme.FP8_TENSOR, LinearScheme.FP8_CHANNEL_TOKEN)


def _schemes(shape: LinearShape, schemes: tuple[LinearScheme, ...]) -> tuple[bool, str]:
    if shape.scheme not in schemes:
        return False, f"implements {', '.join(s.value for s in schemes)}, not {shape.scheme.value}"
    return True, ""


def _quantize_fp8(layer, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.linear_shape.scheme is LinearScheme.FP8_TENSOR:
        return triton_quant.fp8_static(x2, layer.input_scale), layer.input_scale.reshape(1)
    q, scale = layer_per_token_fp8(layer, x2, triton_quant.fp8_per_token)
    return q, scale.reshape(-1)


def _scaled_mm(layer, xq: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    w_scale = layer.weight_scale
    m = xq.shape[0]
    if x_scale.numel() == 1 and w_scale.numel() == 1:
        return torch._scaled_mm(xq, layer.weight.t(), scale_a=x_scale.reshape(()), scale_b=w_scale.reshape(()),
                                out_dtype=out_dtype)
    rows = getattr(layer, "input_scale_rows", None)
    if x_scale.numel() > 1:
        a = x_scale.reshape(m, 1)
    elif rows is not None and m <= rows.shape[0] and x_scale.data_ptr() == layer.input_scale.data_ptr():
        a = rows[:m]  # no copy kernel per call
    else:
        a = x_scale.reshape(-1, 1).expand(m, 1).contiguous()
    b = w_scale.reshape(1, -1).expand(1, layer.weight.shape[0]).contiguous()
    # cuBLASLt's rowwise FP8 GEMM produces BF16 only.
    out = torch._scaled_mm(xq, layer.weight.t(), scale_a=a, scale_b=b, out_dtype=torch.bfloat16)
    return out.to(out_dtype)


class _CudaKernel(LinearKernel):
    """Support declared as data: the compute capability it needs (and for what), the schemes it runs."""

    capability: tuple[int, int] = (8, 9)
    capability_for = "FP8"
    schemes: tuple[LinearScheme, ...] = ()

    @classmethod
    def is_supported(cls, device):
        return cuda_capability(device, cls.capability, cls.capability_for)

    @classmethod
    def can_implement(cls, shape):
        return _schemes(shape, cls.schemes)


class _Fp8Base(_CudaKernel):
    schemes = FP8_SCHEMES

    def process_weights(self, layer):
        if layer.linear_shape.scheme is LinearScheme.FP8_TENSOR and layer.weight_scale.numel() > 1:
            scale = layer.input_scale.float().reshape(1, 1)
            layer.input_scale_rows = scale.expand(ROWWISE_SCALE_ROWS, 1).contiguous()

    @classmethod
    def can_implement(cls, shape):
        ok, why = super().can_implement(shape)
        if ok and shape.in_features % 16:
            return False, f"K={shape.in_features} is not a multiple of 16"
        return ok, why

    def run(self, layer, xq, x_scale, bias, out_dtype) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def fp8_input_scale(self, layer):
        return layer.input_scale if layer.linear_shape.scheme is LinearScheme.FP8_TENSOR else None

    def apply(self, layer, x, bias):
        x2, restore = flatten_tokens(x)
        if x2.dtype == FP8_DTYPE:  # already quantized under layer.input_scale
            return restore(self.run(layer, x2, layer.input_scale.reshape(1), bias, layer.params_dtype))
        xq, x_scale = _quantize_fp8(layer, x2)
        return restore(self.run(layer, xq, x_scale, bias, x.dtype))


class _Fp8SiluOnGemv:
    """``apply_silu_gated`` for FP8 kernels whose decode GEMV runs ``layer``, up to ``FP8_SILU_GATED_MAX_M`` tokens."""

    def silu_gated_rows(self, layer):
        return min(FP8_SILU_GATED_MAX_M, fp8_gemv_rows(layer))

    def apply_silu_gated(self, layer, x, bias, fp8_scale):
        x2, restore = flatten_tokens(x)
        if x2.shape[0] > self.silu_gated_rows(layer):
            return None
        if x2.dtype == FP8_DTYPE:  # already quantized under layer.input_scale
            xq, x_scale, out_dtype = x2, layer.input_scale.reshape(1), layer.params_dtype
        else:
            (xq, x_scale), out_dtype = _quantize_fp8(layer, x2), x.dtype
        return restore(triton_gemv.silu_gated_gemv(xq, layer.weight, x_scale, layer.weight_scale.reshape(-1), bias,
                                                   out_dtype, fp8_scale))


class TritonFp8Kernel(_Fp8SiluOnGemv, _Fp8Base):
    name, backend = "triton-fp8", "triton"

    def run(self, layer, xq, x_scale, bias, out_dtype):
        if xq.shape[0] <= fp8_gemv_rows(layer):  # decode: no split-K, output written once
            norm, peers = _push_target(layer, xq.shape[0], layer.weight.shape[0], out_dtype)
            return _pushed(norm, triton_gemv.fp8_gemv(xq, layer.weight, x_scale, layer.weight_scale.reshape(-1),
                                                      bias, out_dtype, push=peers))
        return triton_gemm.fp8_gemm(xq, layer.weight, x_scale, layer.weight_scale.reshape(-1), bias, out_dtype)


class CublasFp8Kernel(_Fp8Base):
    name, backend = "cublas-fp8", "cublas"

    def run(self, layer, xq, x_scale, bias, out_dtype):
        y = _scaled_mm(layer, xq, x_scale, out_dtype)
        return y if bias is None else y + bias.to(y.dtype)


class HopperFp8Kernel(_Fp8SiluOnGemv, _Fp8Base):
    """The decode GEMV up to ``fp8_gemv_rows(layer)`` tokens, cuBLASLt from there on."""

    name, backend = "hopper-fp8", "auto"

    def __init__(self) -> None:
        self.small, self.large = TritonFp8Kernel(), CublasFp8Kernel()

    def run(self, layer, xq, x_scale, bias, out_dtype):
        engine = self.small if xq.shape[0] <= fp8_gemv_rows(layer) else self.large
        return engine.run(layer, xq, x_scale, bias, out_dtype)


class TritonFp8BlockKernel(_CudaKernel):
    name, backend = "triton-fp8-block", "triton"
    schemes = (LinearScheme.FP8_BLOCK,)

    def apply(self, layer, x, bias):
        x2, restore = flatten_tokens(x)
        xq, x_scale = triton_quant.fp8_groups(x2)
        y = triton_gemm.fp8_gemm(xq, layer.weight, x_scale, layer.weight_scale, bias, x.dtype, block_scales=True)
        return restore(y)


class TritonNvfp4Kernel(_CudaKernel):
    name, backend = "triton-nvfp4", "triton"
    capability, capability_for = (8, 0), "the BF16 W4A4 path"
    schemes = (LinearScheme.NVFP4,)

    def process_weights(self, layer):
        layer.nvfp4_alpha = triton_gemm.nvfp4_alpha(layer.input_scale, layer.weight_scale_2)
        n = layer.weight.shape[0]
        # a_global * b_global per output row, the product nvfp4_gemm scales its float32 accumulator by
        alpha = layer.input_scale.float().reshape(()) * layer.weight_scale_2.float().reshape(-1)
        layer.nvfp4_row_alpha = torch.broadcast_to(alpha, (n,)).contiguous()

    def nvfp4_input_scale(self, layer):
        return layer.input_scale

    def apply(self, layer, x, bias):
        prequantized = nvfp4_block_values_of(x)  # written by the kernel before, under layer.input_scale
        if prequantized is not None:
            values, restore = flatten_tokens(prequantized)
            out_dtype = layer.params_dtype
        else:
            x2, restore = flatten_tokens(x)
            values, out_dtype = triton_quant.nvfp4_block_values(x2, layer.input_scale), x.dtype
        m, n = values.shape[0], layer.weight.shape[0]
        norm = peers = None
        if m <= NVFP4_MMA_MAX_M:  # these kernels write each output tile once: they can send it too
            norm, peers = _push_target(layer, m, n, out_dtype)
        if 1 < m <= NVFP4_MMA_MAX_M:
            y = wo_mma(values, NVFP4, layer.weight, layer.weight_scale, layer.nvfp4_row_alpha, bias, n,
                       values.shape[1], 0, 16, None, out_dtype, triton_gemm.INTERPRETED, push=peers)
        else:
            y = triton_gemm.nvfp4_gemm(values, layer.weight, layer.weight_scale, layer.input_scale,
                                       layer.weight_scale_2, bias, out_dtype, layer.nvfp4_alpha, push=peers)
        return restore(_pushed(norm, y))


class TritonGemvKernel(_CudaKernel):
    name, backend = "triton-gemv", "auto"
    capability, capability_for = (8, 0), "the BF16 decode GEMV"
    schemes = (LinearScheme.UNQUANTIZED,)

    @staticmethod
    def _gemv_input(layer, x):
        """``(rows, restore)`` for the decode GEMV: ``x``'s tokens as contiguous rows, or None where they
        take cuBLAS (too many tokens, or dtypes other than one 16-bit dtype for both)."""
        x2, restore = flatten_tokens(x)
        w = layer.weight
        if x2.shape[0] > BF16_GEMV_MAX_M or x2.dtype != w.dtype or w.element_size() != 2:
            return None
        return (x2 if x2.stride(-1) == 1 else x2.contiguous()), restore

    def apply(self, layer, x, bias):
        on_gemv = self._gemv_input(layer, x)
        if on_gemv is not None:
            x2, restore = on_gemv
            norm, peers = _push_target(layer, x2.shape[0], layer.weight.shape[0], x2.dtype)
            return restore(_pushed(norm, triton_gemv.gemv(x2, layer.weight, bias, push=peers)))
        w = layer.weight
        return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def silu_gated_rows(self, layer):
        return BF16_GEMV_MAX_M if layer.weight.element_size() == 2 else 0

    def apply_silu_gated(self, layer, x, bias, fp8_scale):
        on_gemv = self._gemv_input(layer, x)
        if on_gemv is None:
            return None
        x2, restore = on_gemv
        return restore(triton_gemv.silu_gated_gemv(x2, layer.weight, None, None, bias, x2.dtype, fp8_scale))

for _kernel in (HopperFp8Kernel, TritonFp8BlockKernel, TritonNvfp4Kernel, TritonGemvKernel, CublasFp8Kernel,
                TritonFp8Kernel):
    register_linear_kernel("cuda", _kernel)
