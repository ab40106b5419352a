"""Score a model on a text: perplexity, and against a reference model mean KL divergence and
top-1 agreement, from full-sequence logits (``mopt.load_model``) without a cache.

The text is tokenized once and cut into non-overlapping windows of ``context`` tokens; within a
window every token after the first is predicted from the ones before it. Perplexity is
``exp(mean negative log-likelihood)`` over all predicted tokens. KL is ``KL(reference || model)``
per predicted position, averaged; top-1 agreement is the fraction of positions where both models'
most likely next token is the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

EVAL_TEXT = Path(__file__).resolve().parent.parent / "data" / "eval_en.txt"


@dataclass
class EvalResult:
    tokens: int
    windows: int
    perplexity: float
    reference_perplexity: float | None = None
    mean_kl: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def windows(token_ids: list[int], context: int) -> list[list[int]]:
    """Non-overlapping windows of ``context`` tokens; a last window of one token is dropped (it
    predicts nothing)."""
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    out = [token_ids[i : i + context] for i in range(0, len(token_ids), context)]
    return [w for w in out if len(w) >= 2]


@torch.inference_mode()
def evaluate(model: torch.nn.Module, token_ids: list[int], context: int = 512,
             reference: torch.nn.Module | None = None, progress: bool = False) -> EvalResult:
    from tqdm.auto import tqdm

    chunks = windows(token_ids, context)
    if not chunks:
        raise ValueError("the text has fewer than 2 tokens: nothing to predict")
    device = next(model.parameters()).device
    nll = ref_nll = kl = agree = 0.0
    count = 0
    for chunk in tqdm(chunks, desc="evaluating", unit="window", disable=not progress):
        ids = torch.tensor([chunk], device=device)
        targets = ids[0, 1:]
        logp = model(ids)[0, :-1].float().log_softmax(-1)
        nll -= logp.gather(-1, targets[:, None]).sum().item()
        if reference is not None:
            ref_logp = reference(ids.to(next(reference.parameters()).device))[0, :-1].float().log_softmax(-1)
            ref_logp = ref_logp.to(device)
            ref_nll -= ref_logp.gather(-1, targets[:, None]).sum().item()
            kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        count += len(chunk) - 1
    result = EvalResult(tokens=count, windows=len(chunks), perplexity=math.exp(nll / count))
    if reference is not None:
        result.reference_perplexity = math.exp(ref_nll / count)
        result.mean_kl = kl / count
        result.top1_agreement = agree / count
    return result
