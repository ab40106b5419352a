"""Request checks: sampling parameters and prompts, refused with a :class:`RequestError` at the edge.

Python lets a request carry anything: ``True`` where an int goes (``bool`` is an ``int``), NaN and
infinities, numpy and torch scalars, strings with lone surrogates that no tokenizer can encode.
Each check here accepts exactly one meaning of a value, converts numpy/torch numbers to plain
Python ones, and otherwise names the field and what it expected.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, Callable

import numpy as np

from mopt.errors import RequestError

# Temperatures below this sample greedily: dividing logits by ~1e-45 overflows to inf and NaN
# probabilities, and the distribution it tends to is the argmax anyway (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5
SEED_RANGE = (0, 2**64)  # what torch.Generator.manual_seed takes
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties, as OpenAI and vLLM bound them
MAX_LOGPROBS = 20  # most top logprobs per token (OpenAI's chat limit, vLLM's default max_logprobs)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool (``True`` is an ``int`` to Python, not a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _int(name: str, value: Any, low: int, high: float = math.inf) -> int:
    if not is_int(value) or not low <= value < high:
        bound = f">= {low}" if high == math.inf else f"in [{low}, {high})"
        raise RequestError(f"SamplingParams: {name} must be an integer {bound}, got {_show(value)}", _field(name))
    return int(value)


def _real(name: str, value: Any, ok: Callable[[float], bool], expected: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)) or not math.isfinite(value) \
            or not ok(float(value)):
        raise RequestError(f"SamplingParams: {name} must be {expected}, got {_show(value)}", name)
    return float(value)


def _field(name: str) -> str:
    """The request field of an item name: ``stop_token_ids[2]`` -> ``stop_token_ids``."""
    return name.split("[", 1)[0]


def check_text(text: str, what: str, field: str | None = None) -> str:
    """``text`` must be encodable as UTF-8 (no lone surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{what} is not valid Unicode: {e.reason} at index {e.start} "
                           f"({text[e.start]!r})", field) from None
    return text


def _stop_strings(value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise RequestError(f"SamplingParams: stop must be a string or a list of strings, got {_show(value)}", "stop")
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise RequestError(f"SamplingParams: stop[{i}] must be a string, got {_show(s)}", "stop")
        if not s:
            raise RequestError("SamplingParams: stop strings must not be empty", "stop")
        check_text(s, f"SamplingParams: stop[{i}]", "stop")
    return list(items)


def _token_ids(name: str, value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"SamplingParams: {name} must be a list of token ids, got {_show(value)}", name)
    return [_int(f"{name}[{i}]", t, 0) for i, t in enumerate(value)]


def check_sampling_params(params) -> None:
    """Validate ``params`` (a ``SamplingParams``) in place, normalising its values."""
    params.max_tokens = _int("max_tokens", params.max_tokens, 1)
    params.temperature = _real("temperature", params.temperature, lambda t: t >= 0, "a finite number >= 0")
    params.top_p = _real("top_p", params.top_p, lambda p: 0 < p <= 1, "a number in (0, 1]")
    params.top_k = _int("top_k", params.top_k, 0)
    if params.seed is not None:
        params.seed = _int("seed", params.seed, *SEED_RANGE)
    params.stop = _stop_strings(params.stop)
    params.stop_token_ids = _token_ids("stop_token_ids", params.stop_token_ids)
    if not isinstance(params.ignore_eos, (bool, np.bool_)):
        raise RequestError(f"SamplingParams: ignore_eos must be True or False, got {_show(params.ignore_eos)}",
                           "ignore_eos")
    params.ignore_eos = bool(params.ignore_eos)
    low, high = PENALTY_RANGE
    for name in ("presence_penalty", "frequency_penalty"):
        setattr(params, name, _real(name, getattr(params, name), lambda v: low <= v <= high,
                                    f"a number in [{low:g}, {high:g}]"))
    params.repetition_penalty = _real("repetition_penalty", params.repetition_penalty, lambda v: v > 0,
                                      "a finite number > 0")
    if params.logprobs is not None:
        params.logprobs = _int("logprobs", params.logprobs, 0, MAX_LOGPROBS + 1)


def check_messages(messages: Any) -> None:
    """A conversation: a list of ``{"role": str, "content": str}`` with valid Unicode content."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {_show(messages)}",
                           "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{i}] must have a string 'role' and 'content', got {_show(message)}",
                               "messages")
        check_text(message["content"], f"messages[{i}].content", "messages")


def _torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch (no tensor exists before it is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _is_id_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or _torch_tensor(value)


def prompt_batch(prompts: Any) -> list[Any]:
    """The prompts of a ``generate`` call as a list: one string or token-id sequence, or a list of them."""
    if isinstance(prompts, str) or _is_id_array(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return [prompts] if prompts and is_int(prompts[0]) else list(prompts)
    raise RequestError(f"prompts must be a string, a list of token ids, or a list of those; got {_show(prompts)}",
                       "prompt")


def _array_ids(prompt) -> list[int]:
    """Token ids of a 1-D integer numpy array or torch tensor."""
    dtype = prompt.dtype
    if _torch_tensor(prompt):
        integer = not dtype.is_floating_point and not dtype.is_complex and dtype != sys.modules["torch"].bool
    else:
        integer = np.issubdtype(dtype, np.integer)
    if prompt.ndim != 1 or not integer:
        raise RequestError(f"a token-id prompt given as an array must be 1-D of integers, got "
                           f"{type(prompt).__name__} of shape {tuple(prompt.shape)} and dtype {dtype}", "prompt")
    return [int(t) for t in prompt.tolist()]


def prompt_token_ids(prompt: Any, tokenizer, vocab_size: int, source: str) -> tuple[list[int], str | None]:
    """``(token ids, text)`` of one prompt: text through ``tokenizer``, or token ids in the vocabulary."""
    text = None
    if isinstance(prompt, str):
        check_text(prompt, "prompt", "prompt")
        if tokenizer is None:
            raise RequestError(f"{source} has no tokenizer: pass token-id lists instead of text", "prompt")
        ids, text = list(tokenizer(prompt)["input_ids"]), prompt
    elif _is_id_array(prompt):
        ids = _array_ids(prompt)
    elif isinstance(prompt, (list, tuple)):
        for i, t in enumerate(prompt):
            if not is_int(t):
                raise RequestError(f"prompt token {i} must be an integer token id, got {_show(t)}", "prompt")
        ids = [int(t) for t in prompt]
    else:
        raise RequestError(f"a prompt must be a string or a list of token ids, got {_show(prompt)}", "prompt")
    if not ids:
        raise RequestError("empty prompt: give at least one token", "prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {vocab_size})", "prompt")
    return ids, text
