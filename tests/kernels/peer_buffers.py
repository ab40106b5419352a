"""Several ranks' fused all-reduce buffers in one process, for the interpreter's kernel tests."""

from __future__ import annotations

import pytest
import torch

tan = pytest.importorskip("mopt.kernels.triton_allreduce_norm")

# Float16 through the interpreter, whose float32 -> bfloat16 conversion does not round to nearest (the
# same kernels in BF16 run on the GPU); sums of float16 values are rounded like BF16 ones.
DTYPE = torch.float16


class Buffers:
    """``world`` ranks' buffers in this process, laid out and initialised as the kernel's module says."""

    def __init__(self, world: int, device: str) -> None:
        self.world = world
        self.raw = [torch.empty(tan.buffer_bytes(world), dtype=torch.uint8, device=device) for _ in range(world)]
        for b in self.raw:
            tan.init_buffer(b, world)
        self.bases = torch.tensor([b.data_ptr() for b in self.raw], dtype=torch.int64, device=device)

    def peers(self, rank: int):
        return tan.PeerRows.of(self.raw[rank], self.bases, rank, self.world)

    def row(self, rank: int, slot: int, source: int, row: int, n: int, dtype=DTYPE) -> torch.Tensor:
        """Row ``row`` that ``source`` sent into ``rank``'s buffer, slot ``slot`` (a view)."""
        rows = self.raw[rank][: tan.rows_bytes(self.world)].view(dtype)
        rows = rows.view(tan.SLOTS, self.world, tan.MAX_ROWS, tan.ROW_BYTES // 2)
        return rows[slot, source, row, :n]

    def counters(self, rank: int) -> torch.Tensor:
        """``rank``'s row counters, ``[MAX_ROWS, SPLIT_MAX]`` (a view)."""
        return self.raw[rank][tan.rows_bytes(self.world): tan.gather_offset(self.world)].view(torch.int32).view(
            tan.MAX_ROWS, tan.SPLIT_MAX)

    def gathered(self, rank: int, slot: int, row: int) -> torch.Tensor:
        """``rank``'s two-shot ``gathered`` slot of ``row``, int16 words: the owner's sum from 0, its
        normalized row from ``ROW_BYTES // 2`` (a view)."""
        words = self.raw[rank][tan.gather_offset(self.world): tan.amax_offset(self.world)].view(torch.int16)
        return words.view(tan.SLOTS, tan.MAX_ROWS, tan.GATHER_ROW_BYTES // 2)[slot, row]

    def next_slot(self, rank: int, row: int) -> int:
        """The slot ``row``'s next call uses; every copy of its counter must agree."""
        copies = self.counters(rank)[row]
        assert (copies == copies[0]).all(), f"row {row}'s counter copies disagree: {copies.tolist()}"
        return int(copies[0])

    def send(self, source: int, to: int, slot: int, partial: torch.Tensor) -> None:
        """What ``source``'s kernel would have pushed into ``to``'s buffer (negative zeros made positive)."""
        for r in range(partial.shape[0]):
            self.row(to, slot, source, r, partial.shape[1]).copy_(torch.where(partial[r] == 0, 0.0, partial[r]))


    def amax(self, rank: int, slot: int, source: int, row: int) -> torch.Tensor:
        """The amax (int16 bits) ``source`` sent into ``rank``'s buffer for ``row``, slot ``slot``
        (``triton_peer_amax``; a view)."""
        words = self.raw[rank][tan.amax_offset(self.world): tan.amax_counters_offset(self.world)].view(torch.int16)
        return words.view(tan.SLOTS, self.world, tan.MAX_ROWS)[slot, source, row]

    def amax_counters(self, rank: int) -> torch.Tensor:
        """``rank``'s amax row counters, ``[MAX_ROWS]`` (a view)."""
        return self.raw[rank][tan.amax_counters_offset(self.world): tan.buffer_bytes(self.world)].view(torch.int32)
