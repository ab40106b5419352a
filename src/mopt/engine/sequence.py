"""Requests as the engine sees them: sampling parameters, sequences and their outputs."""

from __future__ import annotations

import enum
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

    def __post_init__(self) -> None:
        check_sampling_params(self)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """One prompt's result: the generated text and token ids, and why generation stopped.

    ``finish_reason`` is ``"stop"`` (an end-of-sequence token or stop string; ``stop_reason``
    says which), ``"length"`` (``max_tokens`` or the model's context length reached) or
    ``"abort"`` (the request failed or its stream was closed early).
    """

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None

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

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids), self.text,
                             list(self.output_token_ids), self.finish_reason, self.stop_reason)
