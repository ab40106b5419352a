"""OpenAI requests to engine inputs, and engine deltas to OpenAI response pieces.

No scheduling here: a request becomes a list of prompts (one per choice: ``n`` per prompt, choice
``i`` of prompt ``p`` at index ``p * n + i`` as OpenAI numbers them) and their ``SamplingParams``;
ranges are the engine's to check (a bad value raises ``RequestError`` naming the field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mopt.engine.serving_engine import Chat
from mopt.engine.stream import RequestDelta
from mopt.engine.request import is_int
from mopt.engine.sequence import Logprob, SamplingParams, TokenLogprobs, choice_params
from mopt.errors import RequestError
from mopt.serve import protocol as api
from mopt.serve.errors import ApiError

MAX_N = 128  # OpenAI's bound on choices per request
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for the completions API
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default for both APIs
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


def _unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{param}: {what} is not supported by mopt serve", param)


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ApiError(404, f"the model {requested!r} does not exist; this server serves {served!r}", "model",
                       code="model_not_found")


def _choices(req: api._SamplingRequest) -> int:
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be an integer in [1, {MAX_N}], got {n}", "n")
    return n


def _sampling(req: api._SamplingRequest, max_tokens: int, logprobs: int | None,
              names: dict[str, str] | None = None) -> SamplingParams:
    """The request's SamplingParams; ``names``: engine field -> the API field the request used, for
    the ``param`` of an error."""
    given = {name: getattr(req, name) for name in ("top_p", "seed", "stop", "stop_token_ids", "presence_penalty",
                                                   "frequency_penalty", "repetition_penalty", "ignore_eos")}
    kwargs = {name: value for name, value in given.items() if value is not None}
    top_k = req.top_k
    if top_k is not None:
        kwargs["top_k"] = 0 if top_k == -1 else top_k  # vLLM's -1 means off, as mopt's 0 does
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, logprobs=logprobs, **kwargs)
    except RequestError as e:
        e.field = (names or {}).get(e.field, e.field)
        raise


def _refuse_common(req: api._SamplingRequest) -> None:
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit_bias")


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions request: a string, a list of strings, token ids, or a list of
    token-id lists (each one then checked by the engine)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        return [prompt] if is_int(prompt[0]) else list(prompt)
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
                   "prompt")


@dataclass
class EngineRequest:
    """What to submit: one prompt and SamplingParams per choice."""

    prompts: list[str | list[int] | Chat]
    params: list[SamplingParams]
    n: int


def completion_request(req: api.CompletionRequest) -> EngineRequest:
    _refuse_common(req)
    if req.echo:
        raise _unsupported("echo", "echo")
    if req.suffix:
        raise _unsupported("suffix", "suffix")
    n = _choices(req)
    if req.best_of is not None and req.best_of != n:
        raise _unsupported("best_of", "best_of other than n")
    if req.logprobs is not None and not 0 <= req.logprobs <= api.MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"logprobs must be an integer in [0, {api.MAX_COMPLETION_LOGPROBS}], got {req.logprobs}",
                       "logprobs")
    max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    params = _sampling(req, max_tokens, req.logprobs)
    prompts = completion_prompts(req.prompt)
    return EngineRequest([p for p in prompts for _ in range(n)],
                         [c for _ in prompts for c in choice_params(params, n)], n)


def _message_text(i: int, message: api.ChatMessage) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages[{i}].content: only text parts are supported, got a {part.type!r} part",
                           "messages")
    return "\n".join(part.text for part in content)


def chat_request(req: api.ChatCompletionRequest, max_model_len: int) -> EngineRequest:
    _refuse_common(req)
    if req.tools:
        raise _unsupported("tools", "tool calling")
    if req.tool_choice not in (None, "none"):
        raise _unsupported("tool_choice", "tool calling")
    if req.response_format is not None and req.response_format.type != "text":
        raise _unsupported("response_format", f"response_format {req.response_format.type!r}")
    n = _choices(req)
    logprobs = None
    if req.logprobs:
        logprobs = 0 if req.top_logprobs is None else req.top_logprobs
        if not 0 <= logprobs <= api.MAX_CHAT_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be an integer in [0, {api.MAX_CHAT_TOP_LOGPROBS}], got {logprobs}",
                           "top_logprobs")
    elif req.top_logprobs is not None:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    # Without a limit a reply may run to the end of the context, where the engine stops it.
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    names = {"logprobs": "top_logprobs"}
    if req.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    params = _sampling(req, max_model_len if limit is None else limit, logprobs, names)
    conversation = Chat([{"role": m.role, "content": _message_text(i, m)} for i, m in enumerate(req.messages)])
    return EngineRequest([conversation] * n, choice_params(params, n), n)


# -- outputs -------------------------------------------------------------------------------------

def token_text(lp: Logprob) -> str:
    """A token's text; ``token_id:N`` without a tokenizer (vLLM's spelling)."""
    return lp.token if lp.token is not None else f"token_id:{lp.token_id}"


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > MIN_LOGPROB else MIN_LOGPROB


def chat_logprobs(items: list[TokenLogprobs] | None) -> api.ChatLogprobs | None:
    if items is None:
        return None

    def top(lp: Logprob) -> api.TopLogprob:
        text = token_text(lp)
        return api.TopLogprob(token=text, logprob=_value(lp.logprob), bytes=list(text.encode("utf-8")))

    return api.ChatLogprobs(content=[api.ChatTokenLogprob(**top(p.chosen).model_dump(),
                                                          top_logprobs=[top(t) for t in p.top]) for p in items])


def completion_logprobs(items: list[TokenLogprobs] | None, offset: int) -> api.CompletionLogprobs | None:
    """The completions API's columns; ``offset``: characters of the choice's text before these
    tokens. Each position's ``top_logprobs`` holds the top tokens and the chosen one (OpenAI: "up to
    logprobs + 1 elements")."""
    if items is None:
        return None
    out = api.CompletionLogprobs()
    for p in items:
        text = token_text(p.chosen)
        out.tokens.append(text)
        out.token_logprobs.append(_value(p.chosen.logprob))
        out.top_logprobs.append({token_text(t): _value(t.logprob) for t in p.top + [p.chosen]})
        out.text_offset.append(offset)
        offset += len(text)
    return out


@dataclass
class ChoiceResult:
    """A choice's deltas added up, for a non-streaming answer."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: RequestDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


def usage(prompt_tokens: int, completion_tokens: int) -> api.Usage:
    return api.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
