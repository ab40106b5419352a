"""Token selection: greedy, or temperature with top-k and top-p (nucleus) filtering.

Filtering follows the usual convention: top-k keeps the ``k`` largest logits (ties at the k-th
value kept), top-p keeps the smallest set of most likely tokens whose probability reaches ``p``
(the most likely token always survives). A request with a seed draws from its own generator, so
its tokens do not depend on the batch it runs in.
"""

from __future__ import annotations

import torch

from mopt.engine.sequence import SamplingParams


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """``logits [B, V] / temperature [B]`` with everything outside top-k / top-p set to -inf."""
    logits = logits.float() / temperature[:, None]
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = logits.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # cumsum may round up to 1
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits [B, V]``."""
    tokens = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    dev = logits.device
    sub = filter_logits(
        logits[rows],
        torch.tensor([params[i].temperature for i in rows], device=dev),
        torch.tensor([params[i].top_k for i in rows], device=dev),
        torch.tensor([params[i].top_p for i in rows], device=dev),
    )
    probs = sub.softmax(dim=-1).cpu()
    for j, i in enumerate(rows):
        tokens[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
    return tokens
