"""Softmax top-k routing in one kernel (``mopt.kernels.route`` states what it computes): one program per
token holds the token's logits, takes the softmax in float32, picks the ``TOP_K`` largest logits one by
one (ties to the lower expert id), renormalizes, scales and maps ids to this rank's experts."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mopt.kernels.triton_pdl import launch_options, pdl_prologue


@triton.jit
def _softmax_topk_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_t, scale, local_start, local_count,
                         TOP_K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr,
                         LOCAL: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    t = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    ok = experts < E
    x = tl.load(logits_ptr + t.to(tl.int64) * stride_t + experts, mask=ok, other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    probs = p / tl.sum(p, axis=0)
    slots = tl.arange(0, K_BLOCK)
    w = tl.zeros((K_BLOCK,), dtype=tl.float32)
    ids = tl.zeros((K_BLOCK,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(x, axis=0, tie_break_left=True)
        w = tl.where(slots == j, tl.sum(tl.where(experts == best, probs, 0.0), axis=0), w)
        ids = tl.where(slots == j, best, ids)
        x = tl.where(experts == best, -float("inf"), x)
    if RENORM:
        w = w / tl.sum(w, axis=0)  # slots past TOP_K hold 0
    w = w * scale
    if LOCAL:
        rel = ids - local_start
        ids = tl.where((rel >= 0) & (rel < local_count), rel, local_count)
    out = t.to(tl.int64) * TOP_K + slots
    tl.store(w_ptr + out, w, mask=slots < TOP_K)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=slots < TOP_K)


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool, scale: float = 1.0,
                 local: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [T, E]`` (E <= ``route.MAX_EXPERTS``) -> ``(weights float32 [T, top_k], ids int64 [T, top_k])``."""
    t, e = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int64, device=logits.device)
    start, count = local if local is not None else (0, e)
    if t:
        block_e = triton.next_power_of_2(e)
        _softmax_topk_kernel[(t,)](
            logits, weights, ids, e, logits.stride(0), float(scale), start, count, TOP_K=top_k,
            K_BLOCK=triton.next_power_of_2(top_k), BLOCK_E=block_e, RENORM=renormalize, LOCAL=local is not None,
            num_warps=4 if block_e >= 512 else 1, **launch_options(logits.device))
    return weights, ids
