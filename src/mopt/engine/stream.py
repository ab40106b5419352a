"""What an :class:`~mopt.engine.async_engine.AsyncEngine` request gives its caller: a stream of
deltas (new text, token ids, logprobs, finish reason), filled on the caller's event loop."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from mopt.engine.sequence import TokenLogprobs


@dataclass
class RequestDelta:
    """What a request produced since the previous delta its stream returned."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # one per token in token_ids when the request asked
    finish_reason: str | None = None  # "stop", "length", "abort" (aborted by abort()) or None
    stop_reason: str | int | None = None


class RequestStream:
    """The outputs of one request: ``async for delta in stream``.

    Each delta holds everything that arrived since the previous one (a slow reader gets fewer,
    larger deltas; the engine never waits for readers). Iteration ends after the delta that carries
    a finish reason; a request the engine failed raises the engine's error instead
    (:class:`~mopt.engine.async_engine.EngineStepError` or ``EngineStoppedError``). Times are ``time.monotonic()`` seconds.
    """

    def __init__(self, request_id: int, prompt_token_ids: list[int], arrival_time: float) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self._items: deque[RequestDelta | BaseException] = deque()
        self._ready = asyncio.Event()
        self._ended = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self._ended

    def _push(self, item: RequestDelta | BaseException, when: float) -> None:
        """On the stream's event loop: one engine output."""
        if isinstance(item, RequestDelta):
            if item.token_ids and self.first_token_time is None:
                self.first_token_time = when
            self.num_output_tokens += len(item.token_ids)
            if item.finish_reason is not None:
                self.finish_reason, self.finish_time = item.finish_reason, when
        else:
            self.finish_time = when
        self._items.append(item)
        self._ready.set()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestDelta:
        if self._ended:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        merged: RequestDelta | None = None
        while self._items and not isinstance(self._items[0], BaseException):
            merged = _merge(merged, self._items.popleft())
        if merged is None:  # an error is next
            self._ended = True
            raise self._items.popleft()
        self._ended = merged.finish_reason is not None
        return merged


def _merge(a: RequestDelta | None, b: RequestDelta) -> RequestDelta:
    if a is None:
        return b
    logprobs = None if a.logprobs is None else a.logprobs + (b.logprobs or [])
    return RequestDelta(a.text + b.text, a.token_ids + b.token_ids, logprobs, b.finish_reason, b.stop_reason)
