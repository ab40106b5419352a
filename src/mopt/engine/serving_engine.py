"""What a server needs of an engine (:class:`ServingEngine`), and what engines and servers exchange: prompts
given as conversations, the engine's load figures, and the errors a request can end with.

Two engines provide it: :class:`~mopt.engine.async_engine.AsyncEngine` (a thread of the server's process)
and :class:`~mopt.engine.process_client.EngineProcessClient` (a process of its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mopt.engine.llm import Messages, Prompt
from mopt.engine.sequence import SamplingParams
from mopt.engine.stream import RequestStream


class QueueFullError(RuntimeError):
    """The waiting queue is full: retry later (a server answers 429 with Retry-After)."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or stopped: it takes no requests and ended those in flight."""


class EngineStepError(RuntimeError):
    """A model step failed for this request; the cause is in the engine's log."""


@dataclass
class Chat:
    """A prompt given as a conversation, turned into token ids through the chat template."""

    messages: Messages


@dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0  # sequences accepted and not running: queued, or preempted
    free_blocks: int = 0
    total_blocks: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return 1 - self.free_blocks / self.total_blocks if self.total_blocks else 0.0


class ServingEngine(Protocol):
    """What a server needs of an engine: :class:`AsyncEngine` (in a thread of the server's process) or
    :class:`~mopt.engine.process_client.EngineProcessClient` (in a process of its own)."""

    stats: EngineStats
    max_model_len: int
    vocab_size: int
    failure: str | None  # set when the engine stopped for good (a server then shuts down)

    @property
    def is_running(self) -> bool: ...

    def start(self) -> None: ...

    async def add(self, prompts: list[Prompt | Chat], params: list[SamplingParams]) -> list[RequestStream]: ...

    def abort(self, request_id: int) -> None: ...

    def begin_shutdown(self) -> None: ...

    async def stop(self, timeout: float = 10.0) -> None: ...

    def release(self) -> None: ...
