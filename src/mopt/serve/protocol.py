"""Requests and responses of the OpenAI API, as pydantic models (the subset mopt serves).

Request fields take JSON types strictly (``"max_tokens": "5"`` is an error, not 5); ``null`` means
the default, and fields OpenAI defines that mopt has no use for (``user``, ``metadata``, ...) are
ignored. Ranges are checked where the engine checks them (``SamplingParams``), so both speak with
one voice; the bounds here are the API's own (``n``, ``logprobs``, ``top_logprobs``).
Extensions, as vLLM names them: ``top_k``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids``, and ``return_token_ids`` (token ids in every choice and chunk).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for the completions API's logprobs
MAX_CHAT_TOP_LOGPROBS = 20  # and for the chat API's top_logprobs


def _optional(**kw) -> Any:
    """A field left out of the JSON while ``None`` (extensions, and chunk deltas as OpenAI sends them)."""
    return Field(default=None, exclude_if=lambda v: v is None, **kw)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = None


class _SamplingRequest(_Request):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = None
    logit_bias: dict[str, float] | None = None  # refused unless empty


class CompletionRequest(_SamplingRequest):
    prompt: Any = None  # a string, a list of strings, token ids, or a list of token-id lists
    logprobs: int | None = None
    echo: bool | None = None  # refused when true
    suffix: str | None = None  # refused unless empty
    best_of: int | None = None  # refused unless equal to n


class ContentPart(_Request):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(_Request):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None  # refused unless empty
    tool_choice: Any = None  # refused unless "none"
    response_format: ResponseFormat | None = None  # refused unless {"type": "text"}


# -- responses ----------------------------------------------------------------------------------

class _Response(BaseModel):
    pass


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = _optional()
    prompt_token_ids: list[int] | None = _optional()


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = _optional()
    prompt_token_ids: list[int] | None = _optional()


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Literal["assistant"] | None = _optional()
    content: str | None = _optional()


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = _optional()


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _optional()  # only in the last chunk, with stream_options.include_usage


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = _optional()  # only in the last chunk, with stream_options.include_usage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mopt"
    max_model_len: int  # extension (as vLLM): the context length requests must fit
    vocab_size: int  # extension: token-id prompts must be below it


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo
