"""Continuous batching: admit waiting prompts while blocks and the token budget allow, else decode.

Each step is either a prefill of newly admitted sequences or one decode token for every running
sequence. When the cache runs out of blocks during decode, the most recently admitted sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(prompt plus what it generated so far) when blocks free up. Sequence order is first come, first
served, so a preempted request loses nothing but time.
"""

from __future__ import annotations

from collections import deque

from mopt.engine.block_manager import BlockManager
from mopt.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """``(sequences, is_prefill)`` for the next model step."""
        scheduled: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            fits_budget = tokens + len(seq) <= self.max_num_batched_tokens or not scheduled
            if not fits_budget or not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
            tokens += len(seq)
        if scheduled:
            return scheduled, True
        if not self.running and self.waiting:
            seq = self.waiting[0]
            raise RuntimeError(
                f"request {seq.request_id} needs {len(seq)} tokens of KV cache but the cache holds "
                f"{self.blocks.num_blocks * self.blocks.block_size}; raise the KV-cache size or lower max_model_len"
            )
        for seq in list(self.running):
            if seq not in self.running:  # preempted in this loop
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                scheduled.append(seq)
        return scheduled, False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self.blocks.release(seq)
        self.running.remove(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop ``seq`` whether waiting or running and free its blocks; a no-op when it already
        finished or was aborted, so a failed request can always be cleaned up."""
        for queue in (self.waiting, self.running):
            if seq in queue:
                queue.remove(seq)
        if seq.block_table:
            self.blocks.release(seq)
        if seq.status is not SequenceStatus.FINISHED:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = seq.finish_reason or "abort"
