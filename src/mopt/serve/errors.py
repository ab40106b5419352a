"""Errors as OpenAI's API answers them: ``{"error": {"message", "type", "param", "code"}}``.

400 for a bad request (naming the field in ``param``), 401 for a missing or wrong API key, 404 for
an unknown model, 429 with Retry-After when the engine's queue is full, 503 with Retry-After while
shutting down, 500 for a failure inside the server (its detail goes to the log, not the client).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from mopt.engine.serving_engine import EngineStepError, EngineStoppedError, QueueFullError
from mopt.errors import RequestError
from mopt.serve import protocol as api


class ApiError(Exception):
    """An error answered with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> api.ErrorResponse:
        return api.ErrorResponse(error=api.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                     code=self.code))


RETRY_AFTER_SECONDS = "1"


def api_error(e: BaseException) -> ApiError:
    """The HTTP error of an exception raised while handling a request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, RequestError):
        return ApiError(400, str(e), e.field)
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(e, EngineStoppedError):
        return ApiError(503, str(e), type="server_error", code="unavailable",
                        headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(e, EngineStepError):
        return ApiError(500, str(e), type="server_error", code="internal_error")
    return ApiError(500, "internal server error; see the server log", type="server_error", code="internal_error")


def outcome_of(error: ApiError) -> str:
    return {400: "invalid", 404: "invalid", 401: "unauthorized", 429: "queue_full", 503: "unavailable"}.get(
        error.status, "error")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=error.headers)
