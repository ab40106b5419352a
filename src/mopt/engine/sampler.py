"""Token selection on the model's device: penalties, then greedy, or temperature with top-k and
top-p (nucleus), and the log-probabilities requests ask for.

Tensor in, tensor out: ``sample(logits [B, V], SamplingTensors) -> SamplerOutput`` (token ids [B],
optional logprobs), no loop over sequences or tokens and no host synchronization; the engine copies
ids and logprobs to the host together, once per step (:meth:`SamplerOutput.packed`).

Penalties follow vLLM: the repetition penalty divides positive logits and multiplies negative ones
of every token seen in the prompt or output; frequency and presence penalties subtract from the
logits of tokens in the output, by count and once. A row whose penalties are neutral comes out
bit-identical. Greedy rows of a batch with penalties take the argmax of the penalised logits (not
the one the decode graph computed). Logprobs are the log-softmax of the penalised logits at
temperature 1.

Filtering follows the usual convention: top-k keeps the ``k`` largest logits (ties at the k-th
value kept), top-p keeps the smallest set of most likely tokens whose probability reaches ``p``
(the most likely token always survives). Sampling is the Gumbel-max trick,
``argmax(logits / T + g)``, which draws from ``softmax(logits / T)``; the Gumbel noise ``g`` of
token ``v`` at a sequence's output step ``s`` is a hash of ``(request seed, s, v)``, so a request's
tokens depend only on its seed and logits, never on the batch it runs in or on the device's random
state. Requests without a seed get a random one when they are created.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mopt.engine.sequence import Sequence

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32) of values ``0 <= x < 2**32`` held in int64; works
    on Python ints and on tensors alike (products wrap modulo 2**64, only their low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The 32-bit noise key of a request seed (any Python int)."""
    seed &= (1 << 64) - 1
    return _mix32(_mix32(seed & _M32) ^ (seed >> 32))


def random_seed() -> int:
    return random.getrandbits(63)


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Float32 ``[B, vocab]`` standard Gumbel noise, a function of ``(keys[b], steps[b], token)`` only."""
    row = _mix32(keys ^ (steps & _M32))
    tokens = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    bits = _mix32(_mix32(row[:, None] ^ tokens[None, :]))
    u = ((bits >> 8).float() + 0.5) * 2.0**-24  # uniform in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """``logits [B, V] / temperature [B]`` with everything outside top-k / top-p set to -inf."""
    logits = logits.float() / temperature[:, None]
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = sorted_logits.gather(-1, (k - 1)[:, None])
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # cumsum may round up to 1
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device, and what the host knows about the batch.

    Each group is ``None`` when no row of the batch needs it, so a greedy batch without penalties
    or logprobs copies nothing to the device.
    """

    temperature: torch.Tensor | None  # float32 [B]; 0 for greedy rows (None: every row is greedy)
    top_k: torch.Tensor | None  # int64 [B]; 0: off
    top_p: torch.Tensor | None  # float32 [B]; 1: off
    keys: torch.Tensor | None  # int64 [B]: seed_key of each request
    steps: torch.Tensor | None  # int64 [B]: index of the token being sampled
    all_greedy: bool
    filtered: bool  # some sampled row uses top-k or top-p
    presence: torch.Tensor | None = None  # float32 [B]; 0: off (None: no row has a penalty)
    frequency: torch.Tensor | None = None  # float32 [B]; 0: off
    repetition: torch.Tensor | None = None  # float32 [B]; 1: off
    output_tokens: torch.Tensor | None = None  # int64 [B, W]: output ids of penalised rows, -1 padding
    prompt_tokens: torch.Tensor | None = None  # int64 [B, W]: prompt ids (repetition penalty only), -1 padding
    num_logprobs: int | None = None  # most top logprobs a row asks for (None: no row asks)

    @classmethod
    def from_sequences(cls, seqs: "list[Sequence]", device: torch.device) -> "SamplingTensors":
        params = [s.params for s in seqs]
        greedy = [p.greedy for p in params]
        penalized = [p.penalized for p in params]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        num_logprobs = max(asked) if asked else None
        if all(greedy) and not any(penalized):  # nothing to copy to the device
            return cls(None, None, None, None, None, True, False, num_logprobs=num_logprobs)
        # One float and one int64 array, each one copy: sampling columns, then penalty columns and
        # the padded token lists of penalised rows.
        floats = np.array([[0.0 if g else p.temperature, p.top_p, p.presence_penalty, p.frequency_penalty,
                            p.repetition_penalty] for p, g in zip(params, greedy)], np.float32)
        outputs = _padded([s.output_token_ids if pen else [] for s, pen in zip(seqs, penalized)])
        repeats = any(p.repetition_penalty != 1 for p in params)
        prompts = _padded([s.prompt_token_ids if p.repetition_penalty != 1 else [] for s, p in zip(seqs, params)]) \
            if repeats else np.zeros((len(seqs), 0), np.int64)
        ints = np.concatenate([np.array([[p.top_k, s.noise_key, len(s.output_token_ids)] for p, s in zip(params, seqs)],
                                        np.int64), outputs, prompts], axis=1)
        f = torch.from_numpy(floats).to(device, non_blocking=True)
        i = torch.from_numpy(ints).to(device, non_blocking=True)
        filtered = any(not g and (p.top_k > 0 or p.top_p < 1) for p, g in zip(params, greedy))
        t = cls(f[:, 0], i[:, 0], f[:, 1], i[:, 1], i[:, 2], all(greedy), filtered, num_logprobs=num_logprobs)
        if any(penalized):
            t.presence, t.frequency, t.repetition = f[:, 2], f[:, 3], f[:, 4]
            t.output_tokens = i[:, 3:3 + outputs.shape[1]]
            t.prompt_tokens = i[:, 3 + outputs.shape[1]:] if repeats else None
        return t


def _padded(rows: list[list[int]]) -> np.ndarray:
    """Token lists as one int64 array ``[len(rows), longest]``, padded with -1."""
    out = np.full((len(rows), max(map(len, rows), default=0)), -1, np.int64)
    for row, ids in zip(out, rows):
        row[: len(ids)] = ids
    return out


def token_counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, vocab]`` counts of each token in the rows of ``tokens [B, W]`` (-1 is padding)."""
    counts = torch.zeros((tokens.shape[0], vocab + 1), dtype=torch.int32, device=tokens.device)
    index = torch.where(tokens < 0, vocab, tokens)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, output_tokens: torch.Tensor, prompt_tokens: torch.Tensor | None,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Float32 ``logits [B, V]`` with repetition, frequency and presence penalties (see module doc)."""
    vocab = logits.shape[-1]
    counts = token_counts(output_tokens, vocab)
    in_output = counts > 0
    seen = in_output if prompt_tokens is None else in_output | (token_counts(prompt_tokens, vocab) > 0)
    logits = logits.float()
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * in_output


@dataclass
class SamplerOutput:
    """Sampled ids ``[B]`` on the device and, when a row asked, logprobs of the penalised logits."""

    tokens: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None = None  # float32 [B]: of each sampled token
    top_ids: torch.Tensor | None = None  # int64 [B, K]: the K most likely tokens, most likely first
    top_logprobs: torch.Tensor | None = None  # float32 [B, K]

    def packed(self) -> torch.Tensor:
        """Everything the host needs as ONE tensor, for one device-to-host copy: the ids (int64 ``[B]``),
        or with logprobs ids and values together in float64 ``[B, 2 + 2K]`` (exact for ids below
        2**53 and for every float32 value)."""
        if self.logprobs is None:
            return self.tokens
        return torch.cat([self.tokens[:, None].double(), self.logprobs[:, None].double(), self.top_ids.double(),
                          self.top_logprobs.double()], dim=1)

    def unpack(self, rows: list) -> tuple[list[int], list[tuple[float, list[int], list[float]]] | None]:
        """``(token ids, per-row (logprob, top ids, top logprobs) or None)`` from ``packed().tolist()``."""
        if self.logprobs is None:
            return rows, None
        k = self.top_ids.shape[1]
        return [int(row[0]) for row in rows], [(row[1], [int(t) for t in row[2:2 + k]], row[2 + k:]) for row in rows]

    def to_host(self) -> tuple[list[int], list[tuple[float, list[int], list[float]]] | None]:
        return self.unpack(self.packed().tolist())


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``argmax`` of each row (the two-stage Triton kernel on GPUs; torch's is slow for one long row)."""
    if logits.is_cuda:
        try:
            from mopt.kernels.triton_argmax import argmax_rows
        except ImportError:
            return logits.argmax(dim=-1)
        return argmax_rows(logits)
    return logits.argmax(dim=-1)


_LOW = (1 << 32) - 1


def argmax_keys_reference(logits: torch.Tensor, first: int) -> torch.Tensor:
    """int64 ``[B]``: each row's maximum and the index of its first occurrence (plus ``first``) as one
    integer that orders like the pair ``(maximum, -index)``, so that the largest key over rows that hold
    different stretches of one vocabulary names the whole row's argmax. High 32 bits: the float32
    maximum's bits made to order as signed integers (negative floats' magnitude bits flipped; -0.0 taken
    as +0.0, as comparisons do; NaN above +inf, as ``argmax`` takes it); low 32 bits: ``2^32 - 1 - index``."""
    if logits.shape[-1] == 0:  # a rank holding only padding rows: never the maximum
        return torch.full(logits.shape[:-1], torch.iinfo(torch.int64).min, dtype=torch.int64, device=logits.device)
    values, index = logits.float().max(dim=-1)
    bits = torch.where(values == 0, 0.0, values).view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered * (1 << 32) + (_LOW - (index + first))


def argmax_keys(logits: torch.Tensor, first: int) -> torch.Tensor:
    """:func:`argmax_keys_reference`, by the two-stage Triton argmax on GPUs."""
    if logits.is_cuda and logits.shape[-1] > 0 and logits.stride(-1) == 1:
        try:
            from mopt.kernels.triton_argmax import argmax_keys as triton_argmax_keys
        except ImportError:
            return argmax_keys_reference(logits, first)
        return triton_argmax_keys(logits, first)
    return argmax_keys_reference(logits, first)


def key_tokens(keys: torch.Tensor) -> torch.Tensor:
    """The token ids (int64) that :func:`argmax_keys` encoded."""
    return _LOW - (keys & _LOW)


def sample(logits: torch.Tensor, t: SamplingTensors, greedy: torch.Tensor | None = None) -> SamplerOutput:
    """One token id (int64) per row of ``logits [B, V]``, and logprobs when a row asked for them.
    ``greedy``: the argmax of the unpenalised logits if already known (the decode graph computes it)."""
    if t.presence is not None:
        logits = apply_penalties(logits, t.output_tokens, t.prompt_tokens, t.presence, t.frequency, t.repetition)
        greedy = None  # penalised rows need the argmax of what they became
    greedy = greedy_tokens(logits) if greedy is None else greedy
    if t.all_greedy:
        tokens = greedy
    else:
        sampled_rows = t.temperature > 0
        temperature = torch.where(sampled_rows, t.temperature, 1.0)
        if t.filtered:
            scaled = filter_logits(logits, temperature, t.top_k, t.top_p)
        else:
            scaled = logits.float() / temperature[:, None]
        drawn = (scaled + gumbel_noise(t.keys, t.steps, logits.shape[-1])).argmax(dim=-1)
        tokens = torch.where(sampled_rows, drawn, greedy)
    if t.num_logprobs is None:
        return SamplerOutput(tokens)
    logprobs = logits.float().log_softmax(dim=-1)
    top_logprobs, top_ids = logprobs.topk(t.num_logprobs, dim=-1)
    return SamplerOutput(tokens, logprobs.gather(-1, tokens[:, None])[:, 0], top_ids, top_logprobs)
