"""Requests as the engine sees them: sampling parameters, sequences and their outputs."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
from dataclasses import dataclass, field


from mopt.engine.request import GREEDY_TEMPERATURE, check_sampling_params


@dataclass
class SamplingParams:
    """How to pick tokens. ``top_k == 0`` and ``top_p == 1`` disable them.

    Greedy when ``temperature`` is below 1e-5 (so also at 0): dividing logits by a smaller
    temperature overflows, and the distribution it approaches is the argmax (vLLM does the same).
    ``seed`` gives the request its own random generator, so its samples do not depend on what it is
    batched with. ``stop`` strings end generation and are not part of the returned text;
    ``stop_token_ids`` add to the model's end-of-sequence tokens, which ``ignore_eos`` disables.

    Penalties (as in vLLM and OpenAI) change the logits before anything else, greedy included:
    ``repetition_penalty`` divides the positive logits (multiplies the negative ones) of every token
    seen in the prompt or the output so far; ``frequency_penalty`` subtracts itself times the
    token's count in the output, ``presence_penalty`` once for a token that occurs in it.
    ``logprobs``: return, for each generated token, its log-probability and the ``logprobs`` most
    likely tokens'. They are the log-softmax of the penalised logits at temperature 1: the
    model's distribution after penalties, before temperature, top-k and top-p (OpenAI does not
    specify which; this one is the same for greedy and sampled requests, and its most likely token
    is the greedy choice).
    Every field is checked on construction (and again when a request starts); a bad one raises
    :class:`mopt.RequestError` naming it.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        check_sampling_params(self)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request seeded with ``seed``: ``seed`` itself for choice 0
    (so ``n=1`` and the first of ``n`` choices agree), a hash of ``(seed, index)`` for the others."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little")


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """Parameters of ``n`` independent choices of one request: each with a seed of its own derived
    from ``params.seed`` (reproducible, different from each other), or a random one when unseeded."""
    if params.seed is None:
        return [dataclasses.replace(params) for _ in range(n)]
    return [dataclasses.replace(params, seed=choice_seed(params.seed, i)) for i in range(n)]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """A token and its log-probability; ``token`` is its text alone (``None`` without a tokenizer)."""

    token_id: int
    logprob: float
    token: str | None = None


@dataclass
class TokenLogprobs:
    """Log-probabilities at one generated position: the token chosen, and the most likely tokens
    (``SamplingParams.logprobs`` of them, most likely first; the chosen one may be among them)."""

    chosen: Logprob
    top: list[Logprob]


@dataclass
class RequestOutput:
    """One prompt's result: the generated text and token ids, and why generation stopped.

    ``finish_reason`` is ``"stop"`` (an end-of-sequence token or stop string; ``stop_reason``
    says which), ``"length"`` (``max_tokens`` or the model's context length reached) or
    ``"abort"`` (the request failed or its stream was closed early). ``logprobs``: one entry per
    generated token when ``SamplingParams.logprobs`` asked for them, else ``None``.
    """

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request in flight: its tokens, its KV-cache blocks and its stopping state."""

    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    request_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    noise_key: int = 0  # the sampler's per-request random key, from the seed (or a random one)

    def __post_init__(self) -> None:
        from mopt.engine.sampler import random_seed, seed_key

        self.noise_key = seed_key(self.params.seed if self.params.seed is not None else random_seed())

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def releasable_text_length(self, sent: int) -> int:
        """How much of ``text`` a stream can hand out now, having sent ``sent`` characters: all of it
        once finished, else all but what could still become a stop string or is an incomplete UTF-8
        character (decoded as U+FFFD), and never less than was already sent."""
        if self.finish_reason is not None:
            return len(self.text)
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        return max(sent, len(self.text.rstrip("\ufffd")) - hold)

    def output(self) -> RequestOutput:
        logprobs = list(self.output_logprobs) if self.params.logprobs is not None else None
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids), self.text,
                             list(self.output_token_ids), self.finish_reason, self.stop_reason, logprobs)
