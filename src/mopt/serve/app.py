"""The routes of ``mopt serve`` (OpenAI's API): check, translate, submit to the engine, stream back.

No scheduling here: :class:`~mopt.engine.async_engine.AsyncEngine` owns the batch. A request that
ends early for any reason (the client closing its stream or connection, an error) aborts its
sequences, which frees their KV-cache blocks before the engine's next step.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from mopt.engine.serving_engine import ServingEngine
from mopt.engine.stream import RequestDelta
from mopt.serve import protocol as api
from mopt.serve.errors import ApiError, api_error, error_response, outcome_of
from mopt.serve.metrics import ServerMetrics
from mopt.serve.streaming import EventStreamResponse, Generation, json_response, until_disconnected
from mopt.serve.translate import EngineRequest, chat_logprobs, chat_request, check_model, completion_logprobs, \
    completion_request

logger = logging.getLogger(__name__)


class ApiKeyMiddleware:
    """Refuse ``/v1/*`` requests without ``Authorization: Bearer <key>`` (health and metrics stay open)."""

    def __init__(self, app, api_key: str, metrics: ServerMetrics) -> None:
        self.app, self.expected, self.metrics = app, f"Bearer {api_key}".encode(), metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                self.metrics.count("unauthorized")
                error = ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: ServingEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The server's ASGI app; the engine starts and stops with it."""
    metrics = ServerMetrics(engine)
    started = api.now()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="mopt serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": str(e)}
        loc = [str(part) for part in first.get("loc", ())]
        param = ".".join(loc[1:]) if loc[:1] == ["body"] and len(loc) > 1 else None
        metrics.count("invalid")
        return error_response(ApiError(400, f"{param + ': ' if param else ''}{first['msg']}", param))

    @app.exception_handler(ApiError)
    async def refused(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises it after this response, and uvicorn logs the traceback.
        return error_response(api_error(e))

    async def submit(make_request, prefix: str, prompt_field: str = "prompt") -> Generation:
        """Translate and submit; a refusal is counted and raised as the HTTP error it is."""
        try:
            request: EngineRequest = make_request()
            streams = await engine.add(request.prompts, request.params)
        except Exception as e:
            error = api_error(e)
            error.param = prompt_field if error.param == "prompt" else error.param
            metrics.count(outcome_of(error))
            if error.status == 500:
                logger.error("%s request failed", prefix, exc_info=e)
            raise error from e
        return Generation(engine, metrics, streams, request.n, prefix, model_name)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> Response:
        card = api.ModelCard(id=model_name, created=started, max_model_len=engine.max_model_len,
                             vocab_size=engine.vocab_size)
        return json_response(api.ModelList(data=[card]))

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        check_model_counted(body.model)
        gen = await submit(lambda: completion_request(body), "cmpl")
        ids = bool(body.return_token_ids)
        if body.stream:
            return EventStreamResponse(completion_events(gen, body, ids), gen)

        async def answer() -> Response:
            results = await gen.results()
            choices = [api.CompletionChoice(index=i, text=r.text, logprobs=completion_logprobs(r.logprobs, 0),
                                            finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                                            token_ids=r.token_ids if ids else None,
                                            prompt_token_ids=gen.streams[i].prompt_token_ids if ids else None)
                       for i, r in enumerate(results)]
            return json_response(api.CompletionResponse(id=gen.id, created=gen.created, model=model_name,
                                                        choices=choices, usage=gen.usage()))

        return await until_disconnected(request, answer(), gen)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
        check_model_counted(body.model)
        gen = await submit(lambda: chat_request(body, engine.max_model_len), "chatcmpl", "messages")
        ids = bool(body.return_token_ids)
        if body.stream:
            return EventStreamResponse(chat_events(gen, body, ids), gen)

        async def answer() -> Response:
            results = await gen.results()
            choices = [api.ChatChoice(index=i, message=api.AssistantMessage(content=r.text),
                                      logprobs=chat_logprobs(r.logprobs), finish_reason=r.finish_reason,
                                      stop_reason=r.stop_reason, token_ids=r.token_ids if ids else None,
                                      prompt_token_ids=gen.streams[i].prompt_token_ids if ids else None)
                       for i, r in enumerate(results)]
            return json_response(api.ChatCompletionResponse(id=gen.id, created=gen.created, model=model_name,
                                                            choices=choices, usage=gen.usage()))

        return await until_disconnected(request, answer(), gen)

    def check_model_counted(requested: str | None) -> None:
        try:
            check_model(requested, model_name)
        except ApiError:
            metrics.count("invalid")
            raise

    return app


def _include_usage(body: api._SamplingRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def completion_events(gen: Generation, body: api.CompletionRequest, ids: bool) -> AsyncIterator[str]:
    offsets = [0] * len(gen.streams)  # each choice's token texts so far, for text_offset

    def chunk(i: int, delta: RequestDelta) -> api.CompletionChunk | None:
        logprobs = completion_logprobs(delta.logprobs, offsets[i])
        offsets[i] += sum(map(len, logprobs.tokens)) if logprobs is not None else 0
        if not (delta.text or delta.finish_reason or delta.logprobs or (ids and delta.token_ids)):
            return None
        choice = api.CompletionChoice(index=i, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason,
                                      stop_reason=delta.stop_reason, token_ids=delta.token_ids if ids else None)
        return api.CompletionChunk(id=gen.id, created=gen.created, model=gen.model, choices=[choice])

    def final(total: api.Usage) -> api.CompletionChunk:
        return api.CompletionChunk(id=gen.id, created=gen.created, model=gen.model, choices=[], usage=total)

    return gen.events([], chunk, final if _include_usage(body) else None)


def chat_events(gen: Generation, body: api.ChatCompletionRequest, ids: bool) -> AsyncIterator[str]:
    def chunk_of(choices: list[api.ChatChunkChoice], total: api.Usage | None = None) -> api.ChatCompletionChunk:
        return api.ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.model, choices=choices, usage=total)

    def chunk(i: int, delta: RequestDelta) -> api.ChatCompletionChunk | None:
        if not (delta.text or delta.finish_reason or delta.logprobs or (ids and delta.token_ids)):
            return None
        choice = api.ChatChunkChoice(index=i, delta=api.ChatDelta(content=delta.text or None),
                                     logprobs=chat_logprobs(delta.logprobs), finish_reason=delta.finish_reason,
                                     token_ids=delta.token_ids if ids else None)
        return chunk_of([choice])

    # OpenAI opens each choice with the role.
    opening = [chunk_of([api.ChatChunkChoice(index=i, delta=api.ChatDelta(role="assistant", content=""))])
               for i in range(len(gen.streams))]
    return gen.events(opening, chunk, (lambda total: chunk_of([], total)) if _include_usage(body) else None)
