"""Answering a generation request: merging its choices' streams, server-sent events that notice a
client going away, and the one place a request ends (aborting what still runs, counting metrics).
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from mopt.engine.serving_engine import EngineStepError, EngineStoppedError, ServingEngine
from mopt.engine.stream import RequestDelta, RequestStream
from mopt.serve import protocol as api
from mopt.serve.errors import api_error, outcome_of
from mopt.serve.metrics import ServerMetrics
from mopt.serve.translate import ChoiceResult, usage

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; nobody reads it


def json_response(model: api.BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def sse(model: api.BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects (also while no event is due)
    and always close their generator and then ``generation``, so the request is aborted right then
    (also when the client left before the first event, and the generator never started)."""

    def __init__(self, events: AsyncIterator[str], generation: "Generation") -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream_then_stop() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
            self.generation.close("abort")  # a no-op when the events ended it with their outcome


async def until_disconnected(request: Request, work: Awaitable[Response], generation: "Generation") -> Response:
    """``work``'s response, or cancel it (and close ``generation``) when the client disconnects first."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its cleanup (aborting the request) runs now, not at some later GC
        generation.close("abort")  # a no-op when the work ended it with its outcome
    if task.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return task.result()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """``(choice index, delta)`` from several streams as they come."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                i = pending.pop(task)
                try:
                    delta = task.result()
                except StopAsyncIteration:
                    continue
                yield i, delta
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()


class Generation:
    """One generation request in flight: its choices' streams, and its end (abort and metrics, once)."""

    def __init__(self, engine: ServingEngine, metrics: ServerMetrics, streams: list[RequestStream], n: int,
                 prefix: str, model: str) -> None:
        self.engine, self.metrics, self.streams, self.n = engine, metrics, streams, n
        self.id, self.created, self.model = api.new_id(prefix), api.now(), model
        self._closed = False

    def usage(self) -> api.Usage:
        prompts = sum(len(s.prompt_token_ids) for s in self.streams[:: self.n])  # each prompt counted once
        return usage(prompts, sum(s.num_output_tokens for s in self.streams))

    def close(self, outcome: str) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self.streams:
            if not s.finished:
                self.engine.abort(s.request_id)
        self.metrics.finished(self.streams, outcome)

    async def results(self) -> list[ChoiceResult]:
        """Every choice to its end (non-streaming answers)."""
        results = [ChoiceResult() for _ in self.streams]
        outcome = "abort"
        try:
            async with aclosing(merged(self.streams)) as deltas:
                async for i, delta in deltas:
                    results[i].add(delta)
            outcome = "success"
            return results
        except (EngineStepError, EngineStoppedError) as e:  # the engine logged the details
            error = api_error(e)
            outcome = outcome_of(error)
            raise error from None
        finally:
            self.close(outcome)

    async def events(self, opening: list[api.BaseModel], chunk: Callable[[int, RequestDelta], api.BaseModel | None],
                     final: Callable[[api.Usage], api.BaseModel] | None) -> AsyncIterator[str]:
        """SSE lines: the ``opening`` chunks, ``chunk(index, delta)`` of each delta (None: skip it),
        ``final(usage)`` if given, then ``[DONE]``; an engine failure midway becomes an error event.
        One generator from first to last line, so closing it always runs the cleanup."""
        outcome = "abort"
        try:
            for first in opening:
                yield sse(first)
            try:
                async with aclosing(merged(self.streams)) as deltas:
                    async for i, delta in deltas:
                        out = chunk(i, delta)
                        if out is not None:
                            yield sse(out)
                outcome = "success"
            except (EngineStepError, EngineStoppedError) as e:
                error = api_error(e)
                outcome = outcome_of(error)
                yield sse(error.body())
            else:
                if final is not None:
                    yield sse(final(self.usage()))
            yield SSE_DONE
        finally:
            self.close(outcome)
