"""All-reduce fused with the residual add and RMSNorm, over peer memory (one node's GPUs).

After a row-parallel layer each rank holds partial sums; the next thing the model does is add the
residual stream and normalize. This kernel does the three in one launch: each program takes one row,
pushes the rank's partial sums into every peer's buffer, waits for the peers' rows to arrive in its
own, adds every rank's row in rank order (float32, rounded to the activation dtype once, so every rank
gets the same bits, and two ranks get exactly the rounded sum NCCL gives), then adds the residual and
normalizes as ``triton_glue._rms_norm_kernel`` does (same rounding steps, same reduction tree),
optionally writing the next GEMM's E4M3 codes. Without a residual (the first layer's norm, given the
vocabulary-parallel embedding's rows: one rank's row and zeros) the sum itself is normalized.

No flags and no memory fences: the data is its own signal (the "Lamport" one-shot all-reduce of
TensorRT-LLM). Every free slot holds negative zero (``SENTINEL``, 0x8000 in BF16 and FP16); a rank
sends its values with negative zeros made positive, so a peer knows a row has arrived when none of
its values is the sentinel. Rows rotate through three slots: in its e-th call (counted per row) a
program writes into the peers' slot ``e % 3``, reads its own slot ``e % 3`` and puts the sentinel back
into its slot ``(e - 1) % 3``, which no peer writes until its call e + 2 -- and a peer cannot get there
before this rank has sent it row e + 1, after this call has ended.

The push can come earlier, from the kernel that computes the partial sums (a decode GEMV calls
:func:`push_rows` in its epilogue, with the row counters as they stand before this call; the call
then runs with ``PUSHED``): the rows then travel while the GEMV's last programs still run instead of
after the fused kernel has started and loaded them. The argument above holds unchanged, shifted by
one kernel: a rank's GEMV for call e + 2 runs after its call e + 1, which needed the peer's row e + 1,
which the peer pushes only after its call e (and its freeing of slot ``(e - 1) % 3``) has ended.

Each rank's buffer (``buffer_bytes(world)``, the same layout on every rank; ``bases[r]`` is rank r's
buffer as mapped on this GPU): ``rows[3][world][MAX_ROWS][ROW_BYTES]`` (slot, sending rank, row), then
``slot[MAX_ROWS][SPLIT_MAX]`` (int32, each row's next slot: 0, 1, 2, 0, ...; one copy per program a row
may be split over, all equal between calls), then the two-shot kernel's
``gathered[3][MAX_ROWS][GATHER_ROW_BYTES]`` (``triton_two_shot_norm``, which shares the rows and the counters
with this kernel, call by call), then ``amax[3][world][MAX_ROWS]`` (int16) and its own ``[MAX_ROWS]`` int32
counters (``triton_peer_amax``, the same protocol on calls of its own). The waits have no time limit: a peer that died leaves the GPU spinning,
which the engine detects from the host (``TensorParallelModel.wait_step``).

One row (batch-1 decode) is split over ``ONE_ROW_SPLIT`` programs: each sends, frees and writes its
quarter of the columns (and moves its own copy of the row's counter), but waits for the whole row and
reduces all of it for the norm, with the same reduction tree as an unsplit program (the same warps), so
the bits do not change. Spreading the epilogue (the E4M3 quantization's divisions above all) over four
SMs took a 4096-wide FP8 call from 4.2 to 3.5 us on 2x H200 (``bench/results/tp-allreduce-variants-h200x2-
2026-11-26.txt``); at 16 rows and more, splitting was slower. The argument above holds part by part: a part
frees only its own columns of the slot every part of the row read in the call before.

Sign of zero: a partial sum of -0.0 is sent as +0.0, so where every rank's partial is -0.0 the sum is
+0.0 where NCCL's is -0.0 -- equal values, and every rank still agrees bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_glue import _store_out, _warps, marked, output_format
from mopt.kernels.triton_pdl import launch_options, pdl_prologue

MAX_ROWS = 128
ROW_BYTES = 16384  # 8192 BF16 values: a hidden size up to 8192
MAX_WORLD = 8
SLOTS = 3
SPLIT_MAX = 4  # copies of each row's slot counter: the most programs a row is split over
ONE_ROW_SPLIT = 4
SENTINEL_BITS = -32768  # 0x8000 as int16: -0.0 in BF16 and FP16
DTYPES = (torch.bfloat16, torch.float16)
_MAX_ROWS = tl.constexpr(MAX_ROWS)
_SENTINEL = tl.constexpr(SENTINEL_BITS)
_SLOTS = tl.constexpr(SLOTS)
_SPLIT_MAX = tl.constexpr(SPLIT_MAX)


GATHER_ROW_BYTES = ROW_BYTES  # the two-shot kernel's sums as their owner sends them (triton_two_shot_norm)


def rows_bytes(world: int) -> int:
    return SLOTS * world * MAX_ROWS * ROW_BYTES


def gather_offset(world: int) -> int:
    """Where the two-shot kernel's ``gathered[SLOTS][MAX_ROWS][GATHER_ROW_BYTES]`` begins, after the counters."""
    return rows_bytes(world) + 4 * MAX_ROWS * SPLIT_MAX


def amax_offset(world: int) -> int:
    """Where ``triton_peer_amax``'s ``amax[SLOTS][world][MAX_ROWS]`` (int16) begins, after the gathered rows."""
    return gather_offset(world) + SLOTS * MAX_ROWS * GATHER_ROW_BYTES


def amax_counters_offset(world: int) -> int:
    """Where ``triton_peer_amax``'s own ``[MAX_ROWS]`` int32 row counters begin."""
    return amax_offset(world) + 2 * SLOTS * world * MAX_ROWS


def buffer_bytes(world: int) -> int:
    return amax_counters_offset(world) + 4 * MAX_ROWS


def init_buffer(buffer: torch.Tensor, world: int) -> None:
    """Every slot free (the sentinel), every row's next slot 0."""
    buffer[: rows_bytes(world)].view(torch.int16).fill_(SENTINEL_BITS)
    buffer[rows_bytes(world): gather_offset(world)].zero_()
    buffer[gather_offset(world): amax_counters_offset(world)].view(torch.int16).fill_(SENTINEL_BITS)
    buffer[amax_counters_offset(world): buffer_bytes(world)].zero_()


@dataclass(frozen=True)
class PeerRows:
    """Where the ranks' rows meet: ``bases`` (int64 ``[world]``, on the GPU) holds each rank's buffer at its
    address on this GPU; ``slots`` (int32 ``[MAX_ROWS * SPLIT_MAX]``) is this rank's row counters, in its own
    buffer."""

    bases: torch.Tensor
    slots: torch.Tensor
    rank: int
    world: int

    @classmethod
    def of(cls, buffer: torch.Tensor, bases: torch.Tensor, rank: int, world: int) -> "PeerRows":
        """``buffer``: this rank's own (``buffer_bytes(world)`` bytes)."""
        return cls(bases, buffer[rows_bytes(world): gather_offset(world)].view(torch.int32), rank, world)


@triton.jit
def _row_bits(base_ptr, slot, source, row, WORLD: tl.constexpr, ROW_ELEMS: tl.constexpr):
    """Pointer (int16) to row ``row`` from rank ``source`` in slot ``slot`` of the buffer at ``base_ptr``."""
    return base_ptr.to(tl.pointer_type(tl.int16)) + ((slot * WORLD + source) * _MAX_ROWS + row) * ROW_ELEMS


@triton.jit
def wire_bits(values):
    """``values`` (16-bit floats) as the int16 bits a rank sends: negative zeros made positive, so that
    the sentinel never travels as data."""
    bits = values.to(tl.int16, bitcast=True)
    return tl.where(bits == _SENTINEL, 0, bits)


@triton.jit
def push_rows(values, rows, cols, mask, bases_ptr, slots_ptr, RANK: tl.constexpr, WORLD: tl.constexpr,
              ROW_ELEMS: tl.constexpr):
    """Send ``values [R, C]`` (rows ``rows [R]``, columns ``cols [C]`` of this rank's partial sums, where
    ``mask``) into every peer's buffer, each row into the slot its counter in ``slots_ptr`` names: what
    the fused kernel's push does, done by the kernel that computes the partial sums (``PUSHED``)."""
    bits = wire_bits(values)
    slot = tl.load(slots_ptr + rows * _SPLIT_MAX, mask=rows < _MAX_ROWS, other=0)
    for s in tl.static_range(WORLD):
        if s != RANK:
            dst = _row_bits(tl.load(bases_ptr + s), slot[:, None], RANK, rows[:, None], WORLD, ROW_ELEMS)
            tl.store(dst + cols[None, :], bits, mask=mask)


@triton.jit
def _allreduce_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, bases_ptr, slots_ptr,
                               stride_x, stride_r, n, eps, RANK: tl.constexpr, WORLD: tl.constexpr,
                               ROW_ELEMS: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
                               HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr, NVFP4_OUT: tl.constexpr,
                               PUSHED: tl.constexpr, PDL: tl.constexpr):
    """Program ``row * SPLIT + part`` owns columns ``[part * BLOCK / SPLIT, (part + 1) * BLOCK / SPLIT)`` of
    row ``row``. ``PUSHED``: the kernel that computed ``x`` already sent this rank's rows (``push_rows``).
    Without ``HAS_RESIDUAL`` the rounded sum itself is normalized (and written as the new residual)."""
    pdl_prologue(PDL)
    row = tl.program_id(0) // SPLIT
    part = tl.program_id(0) % SPLIT
    CHUNK: tl.constexpr = BLOCK // SPLIT
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    mine = part * CHUNK + tl.arange(0, CHUNK)
    mine_ok = mine < n
    dtype = x_ptr.dtype.element_ty
    x_row = x_ptr + row.to(tl.int64) * stride_x
    r_row = res_ptr + row.to(tl.int64) * stride_r
    # Every load that does not wait on a peer is issued here, so that their latencies overlap each other
    # and the wait for the peers' rows instead of following it.
    slot = tl.load(slots_ptr + row * _SPLIT_MAX + part)
    me = tl.load(bases_ptr + RANK)
    bits = wire_bits(tl.load(x_row + cols, mask=mask, other=0.0))
    if HAS_RESIDUAL:
        r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + mine, mask=mine_ok, other=0.0).to(tl.float32)
    if SPLIT == 1:
        sent = bits
    else:
        sent = wire_bits(tl.load(x_row + mine, mask=mine_ok, other=0.0))
    if not PUSHED:
        for s in tl.static_range(WORLD):
            if s != RANK:
                dst = _row_bits(tl.load(bases_ptr + s), slot, RANK, row, WORLD, ROW_ELEMS)
                tl.store(tl.multiple_of(dst, 16) + mine, sent, mask=mine_ok)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_mine = tl.zeros((CHUNK,), dtype=tl.float32)
    for s in tl.static_range(WORLD):
        if s == RANK:
            acc += bits.to(dtype, bitcast=True).to(tl.float32)
            acc_mine += sent.to(dtype, bitcast=True).to(tl.float32)
        else:
            src = tl.multiple_of(_row_bits(me, slot, s, row, WORLD, ROW_ELEMS), 16)
            got = tl.load(src + cols, mask=mask, other=0, volatile=True)
            while tl.sum((got == _SENTINEL).to(tl.int32), axis=0) > 0:
                got = tl.load(src + cols, mask=mask, other=0, volatile=True)
            acc += got.to(dtype, bitcast=True).to(tl.float32)
            if SPLIT > 1:  # this program's columns of what just arrived
                acc_mine += tl.load(src + mine, mask=mine_ok, other=0, volatile=True).to(dtype, bitcast=True).to(
                    tl.float32)
    free = (slot + _SLOTS - 1) % _SLOTS
    for s in tl.static_range(WORLD):
        if s != RANK:
            tl.store(tl.multiple_of(_row_bits(me, free, s, row, WORLD, ROW_ELEMS), 16) + mine,
                     tl.full((CHUNK,), _SENTINEL, tl.int16), mask=mine_ok)
    for j in tl.static_range(_SPLIT_MAX // SPLIT):  # this program's copies of the row's counter
        tl.store(slots_ptr + row * _SPLIT_MAX + part + j * SPLIT, (slot + 1) % _SLOTS)
    if HAS_RESIDUAL:
        s_row = (acc.to(dtype).to(tl.float32) + r).to(dtype)
    else:
        s_row = acc.to(dtype)
    xs = s_row.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xs * xs, axis=0) / n + eps)
    if SPLIT == 1:
        s_mine = s_row
    elif HAS_RESIDUAL:  # the same elementwise steps on this program's columns: the same bits
        r_mine = tl.load(r_row + mine, mask=mine_ok, other=0.0).to(tl.float32)
        s_mine = (acc_mine.to(dtype).to(tl.float32) + r_mine).to(dtype)
    else:
        s_mine = acc_mine.to(dtype)
    tl.store(res_out_ptr + row.to(tl.int64) * n + mine, s_mine, mask=mine_ok)
    _store_out(out_ptr + row.to(tl.int64) * n + mine, (w * (s_mine.to(tl.float32) * rstd)).to(dtype), scale_ptr,
               mine_ok, FP8_OUT, NVFP4_OUT)


def supports_rows(rows: int, n: int, dtype: torch.dtype, world: int) -> tuple[bool, str]:
    """Whether the kernel takes ``rows`` rows of ``n`` partial sums in ``dtype`` over ``world`` ranks, and why not."""
    if dtype not in DTYPES:
        return False, f"activations are {dtype}, the kernel takes {DTYPES}"
    if not 1 <= rows <= MAX_ROWS:
        return False, f"{rows} rows, the buffer holds 1 to {MAX_ROWS}"
    if n * dtype.itemsize > ROW_BYTES:
        return False, f"rows of {n} values exceed its {ROW_BYTES}-byte rows"
    if not 1 <= world <= MAX_WORLD:
        return False, f"{world} ranks, the layout has room for {MAX_WORLD}"
    return True, ""


def supports(x: torch.Tensor, world: int) -> tuple[bool, str]:
    """Whether the kernel takes ``x [..., n]`` (the partial sums) over ``world`` ranks, and why not."""
    n = x.shape[-1]
    return supports_rows(x.numel() // max(n, 1), n, x.dtype, world)


def check_push(peers: PeerRows, rows: int, n: int, dtype: torch.dtype) -> None:
    """Raise unless a producer may push ``rows x n`` partial sums in ``dtype`` (what the fused kernel takes)."""
    ok, why = supports_rows(rows, n, dtype, peers.world)
    if not ok:
        raise ValueError(f"push to the fused all-reduce: {why}")


def push_arguments(peers: PeerRows | None, placeholder: torch.Tensor) -> tuple[tuple, dict]:
    """A producer kernel's ``(bases_ptr, slots_ptr)`` and its ``PUSH, RANK, WORLD, ROW_ELEMS`` constexprs;
    ``placeholder`` (any tensor) stands for the pointers, never read, where there is no push."""
    if peers is None:
        return (placeholder, placeholder), dict(PUSH=False, RANK=0, WORLD=1, ROW_ELEMS=ROW_BYTES // 2)
    return (peers.bases, peers.slots), dict(PUSH=True, RANK=peers.rank, WORLD=peers.world, ROW_ELEMS=ROW_BYTES // 2)


class NormCall(NamedTuple):
    """A fused all-reduce + norm call's host side: the rows of ``x`` and ``residual`` (``r2``, ``x2`` where there is
    none, never read), the outputs to fill, the scale the kernel reads, and the row width and its block."""

    x2: torch.Tensor
    r2: torch.Tensor
    out: torch.Tensor
    res_out: torch.Tensor
    scale: torch.Tensor | None
    n: int
    block: int


def norm_call(x: torch.Tensor, residual: torch.Tensor | None, fp8_scale: torch.Tensor | None,
              nvfp4_scale: torch.Tensor | None, world: int, who: str) -> NormCall:
    """Check ``x`` (``supports``) and lay out the call; ``who`` names the function in errors."""
    ok, why = supports(x, world)
    if not ok:
        raise ValueError(f"{who}: {why}")
    n = x.shape[-1]
    out_dtype, scale = output_format(n, x.dtype, fp8_scale, nvfp4_scale, who)
    x2 = x.reshape(-1, n)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    if residual is None:
        r2 = x2
    else:
        r2 = residual.reshape(-1, n)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    m = x2.shape[0]
    return NormCall(x2, r2, torch.empty((m, n), dtype=out_dtype, device=x.device),
                    torch.empty((m, n), dtype=x.dtype, device=x.device), scale, n, triton.next_power_of_2(n))


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        fp8_scale: torch.Tensor | None, peers: PeerRows, pushed: bool = False,
                        nvfp4_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, s)`` with ``s = sum over ranks of x + residual`` (as ``triton_glue.rms_norm`` with
    ``residual``, ``fp8_scale`` and ``nvfp4_scale`` as there; without ``residual``, ``s`` is the sum
    rounded to ``x``'s dtype, as ``triton_glue.rms_norm(s)`` normalizes it) for this rank's partial sums ``x``, through
    ``peers`` (every rank's buffer, set up by :func:`init_buffer`). ``pushed``: the kernel that wrote ``x``
    already sent its rows (``push_rows``). Every rank must make the same calls in the same order with the
    same shapes."""
    c = norm_call(x, residual, fp8_scale, nvfp4_scale, peers.world, "all_reduce_rms_norm")
    m = c.x2.shape[0]
    split = ONE_ROW_SPLIT if m == 1 and c.block >= 32 * ONE_ROW_SPLIT else 1
    _allreduce_rms_norm_kernel[(m * split,)](
        c.x2, c.r2, weight, c.out, c.res_out, c.scale if c.scale is not None else weight, peers.bases, peers.slots,
        c.x2.stride(0), c.r2.stride(0), c.n, eps, RANK=peers.rank, WORLD=peers.world, ROW_ELEMS=ROW_BYTES // 2,
        BLOCK=c.block, SPLIT=split, HAS_RESIDUAL=residual is not None, FP8_OUT=fp8_scale is not None,
        NVFP4_OUT=nvfp4_scale is not None, PUSHED=pushed,
        num_warps=_warps(c.block, c.scale), **launch_options(x.device))
    return marked(c.out.view(x.shape), nvfp4_scale), c.res_out.view(x.shape)
