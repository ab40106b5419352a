"""Token selection on the model's device: greedy, or temperature with top-k and top-p (nucleus).

Tensor in, tensor out: ``sample(logits [B, V], SamplingTensors) -> token ids [B]``, no loop over
sequences and no host synchronization (the engine copies the ids to the host once per step).

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
    """Per-row sampling parameters on the device, and what the host knows about the batch."""

    temperature: torch.Tensor | None  # float32 [B]; 0 for greedy rows (None: every row is greedy)
    top_k: torch.Tensor | None  # int64 [B]; 0: off
    top_p: torch.Tensor | None  # float32 [B]; 1: off
    keys: torch.Tensor | None  # int64 [B]: seed_key of each request
    steps: torch.Tensor | None  # int64 [B]: index of the token being sampled
    all_greedy: bool
    filtered: bool  # some sampled row uses top-k or top-p

    @classmethod
    def from_sequences(cls, seqs: "list[Sequence]", device: torch.device) -> "SamplingTensors":
        params = [s.params for s in seqs]
        greedy = [p.greedy for p in params]
        if all(greedy):  # nothing to copy to the device
            return cls(None, None, None, None, None, True, False)
        floats = np.array([[0.0 if g else p.temperature, p.top_p] for p, g in zip(params, greedy)], np.float32)
        ints = np.array([[p.top_k, s.noise_key, len(s.output_token_ids)] for p, s in zip(params, seqs)], np.int64)
        f = torch.from_numpy(floats).to(device, non_blocking=True)
        i = torch.from_numpy(ints).to(device, non_blocking=True)
        filtered = any(not g and (p.top_k > 0 or p.top_p < 1) for p, g in zip(params, greedy))
        return cls(f[:, 0], i[:, 0], f[:, 1], i[:, 1], i[:, 2], all(greedy), filtered)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``argmax`` of each row (the two-stage Triton kernel on GPUs; torch's is slow for one long row)."""
    if logits.is_cuda:
        try:
            from mopt.kernels.triton_argmax import argmax_rows
        except ImportError:
            return logits.argmax(dim=-1)
        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, t: SamplingTensors, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """One token id (int64) per row of ``logits [B, V]``; ``greedy``: their argmax if already known."""
    greedy = greedy_tokens(logits) if greedy is None else greedy
    if t.all_greedy:
        return greedy
    sampled_rows = t.temperature > 0
    temperature = torch.where(sampled_rows, t.temperature, 1.0)
    if t.filtered:
        scaled = filter_logits(logits, temperature, t.top_k, t.top_p)
    else:
        scaled = logits.float() / temperature[:, None]
    drawn = (scaled + gumbel_noise(t.keys, t.steps, logits.shape[-1])).argmax(dim=-1)
    return torch.where(sampled_rows, drawn, greedy)
