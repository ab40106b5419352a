"""Row-wise argmax of logits in two small Triton kernels (torch's reduction runs one block per row:
28 us for one 128k-vocabulary row on an H100, more than a transformer layer's GEMV).

Each program finds the maximum of a ``BLOCK``-wide chunk of a row and its first position; a second
kernel picks, per row, the chunk with the largest maximum (the first one on ties). The result is
``torch.argmax``'s: the first index of the maximum (rows without NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_pdl import launch_options, pdl_prologue

BLOCK = 4096


@triton.jit
def _chunk_max_kernel(x_ptr, val_ptr, idx_ptr, n, stride, CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
    value, index = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * CHUNKS + chunk, value)
    tl.store(idx_ptr + row * CHUNKS + chunk, chunk * BLOCK + index)


@triton.jit
def _pick_chunk_kernel(val_ptr, idx_ptr, out_ptr, first, CHUNKS: tl.constexpr, KEY: tl.constexpr,
                       PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, CHUNKS)
    values = tl.load(val_ptr + row * CHUNKS + chunks)
    value, best = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    index = tl.load(idx_ptr + row * CHUNKS + best).to(tl.int64)
    if KEY:  # as sampler.argmax_keys_reference, which states the encoding
        bits = tl.where(value == 0.0, 0.0, value).to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        tl.store(out_ptr + row, ordered * 4294967296 + (4294967295 - (index + first)))
    else:
        tl.store(out_ptr + row, index)


def _argmax(x: torch.Tensor, first: int, key: bool) -> torch.Tensor:
    b, n = x.shape
    chunks = triton.next_power_of_2(triton.cdiv(n, BLOCK))
    out = torch.empty(b, dtype=torch.int64, device=x.device)
    if b:
        values = torch.full((b, chunks), float("-inf"), dtype=torch.float32, device=x.device)
        index = torch.zeros((b, chunks), dtype=torch.int32, device=x.device)
        _chunk_max_kernel[(b, triton.cdiv(n, BLOCK))](x, values, index, n, x.stride(0), CHUNKS=chunks, BLOCK=BLOCK,
                                                      num_warps=8, **launch_options(x.device))
        _pick_chunk_kernel[(b,)](values, index, out, first, CHUNKS=chunks, KEY=key, **launch_options(x.device))
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: the index of each row's maximum of ``x [B, V]`` (last dim contiguous)."""
    return _argmax(x, 0, False)


def argmax_keys(x: torch.Tensor, first: int) -> torch.Tensor:
    """int64 ``[B]``: each row's maximum and its first index plus ``first`` as one ordered key
    (``mopt.engine.sampler.argmax_keys_reference``; ``x [B, V]``, ``V >= 1``, last dim contiguous; rows
    without NaN, as for :func:`argmax_rows`)."""
    return _argmax(x, first, True)
