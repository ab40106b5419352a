"""Softmax top-k routing of mixture-of-experts tokens, and the one place that picks how it runs.

``softmax_topk(logits [T, E], top_k, renormalize, scale, local)`` -> ``(weights float32 [T, k], ids int64 [T, k])``:
a softmax over the experts in float32, the ``top_k`` most probable experts in descending order, their
probabilities renormalized to sum 1 if asked, times ``scale`` (a model's routed scaling factor). With
``local = (start, count)`` (expert parallelism: this rank holds experts ``start .. start + count - 1``)
ids are relative to ``start``, and ids of other ranks' experts become ``count``, which the expert
kernels skip.

On CUDA this is one Triton kernel (``triton_route``) instead of the five to eight launches of torch's
softmax, top-k (a sort at these sizes), sum, division, scaling and masking: at batch 1 those took
18 us of each Qwen3-30B-A3B layer on an H200, a quarter of its decode step. The kernel ranks the
logits rather than the probabilities (the softmax is monotonic, so the choice is the same), and its
probabilities can differ from torch's in the last bits (its exponential is the GPU's).
"""

from __future__ import annotations

import torch

MAX_EXPERTS = 1024  # the kernel holds a token's logits in one block


def local_expert_ids(ids: torch.Tensor, local: tuple[int, int] | None) -> torch.Tensor:
    """``ids`` relative to ``local[0]``; those outside ``[0, local[1])`` become ``local[1]`` (see module doc)."""
    if local is None:
        return ids
    start, count = local
    rel = ids - start
    return rel.masked_fill((rel < 0) | (rel >= count), count)


def softmax_topk_reference(logits: torch.Tensor, top_k: int, renormalize: bool, scale: float = 1.0,
                           local: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    probs = logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weights = weights * scale
    return weights, local_expert_ids(ids, local)


def _kernel_for(logits: torch.Tensor, top_k: int):
    if not logits.is_cuda or logits.dim() != 2 or not 1 <= top_k <= logits.shape[-1] <= MAX_EXPERTS:
        return None
    try:
        from mopt.kernels import triton_route
    except ImportError:  # no Triton: torch does it
        return None
    return triton_route


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool, scale: float = 1.0,
                 local: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring; torch (the reference) off CUDA or past ``MAX_EXPERTS``."""
    kernel = _kernel_for(logits, top_k)
    if kernel is None:
        return softmax_topk_reference(logits, top_k, renormalize, scale, local)
    return kernel.softmax_topk(logits, top_k, renormalize, scale, local)
