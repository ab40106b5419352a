"""Fixed-size KV-cache blocks handed out to sequences through per-sequence block tables."""

from __future__ import annotations

from collections import deque

from mopt.engine.sequence import Sequence
from mopt.errors import EngineArgumentError


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """A free list of ``num_blocks`` blocks of ``block_size`` token slots each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise EngineArgumentError(f"KV cache needs >= 1 block of >= 1 slot, got {num_blocks} x {block_size} "
                                      "(raise kv_cache_memory)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def can_allocate(self, seq: Sequence) -> bool:
        return blocks_needed(len(seq), self.block_size) <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token the sequence holds (its prefill)."""
        assert not seq.block_table, "sequence already holds blocks"
        seq.block_table = [self.free.popleft() for _ in range(blocks_needed(len(seq), self.block_size))]

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's next token (``len(seq) + 1``) has a slot or a free block for one."""
        return len(seq.block_table) * self.block_size > len(seq) or bool(self.free)

    def append_slot(self, seq: Sequence) -> None:
        if len(seq.block_table) * self.block_size <= len(seq):
            seq.block_table.append(self.free.popleft())

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
