"""``mopt bench generate``: end-to-end generation throughput of a checkpoint.

For each batch size, ``batch`` copies of a fixed prompt (distinct first tokens, so nothing can be
shared) generate ``tokens`` tokens each with ``ignore_eos``. Reported: prefill tokens/s (prompt
tokens over the time of the prefill step) and decode tokens/s (generated tokens after the first over
the remaining time), after one warm-up run.
"""

from __future__ import annotations

import time

import torch

from mopt.engine.llm import LLM
from mopt.engine.sequence import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_generate(llm: LLM, batch_sizes: list[int], prompt_len: int, tokens: int) -> list[dict]:
    rows = []
    vocab = llm.vocab_size
    for batch in batch_sizes:
        prompts = [[(b * 7919 + i * 31) % vocab for i in range(prompt_len)] for b in range(batch)]
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        seqs = [llm._make_sequence(p, params) for p in prompts]
        for s in seqs:
            llm.scheduler.add(s)
        _sync(llm.device)
        start = time.perf_counter()
        llm._step()  # prefill of the whole batch
        _sync(llm.device)
        prefill = time.perf_counter() - start
        while llm.scheduler.has_unfinished():
            llm._step()
        _sync(llm.device)
        total = time.perf_counter() - start
        decode = total - prefill
        rows.append(dict(batch=batch, prompt_len=prompt_len, tokens=tokens,
                         prefill_tokens_per_s=batch * prompt_len / prefill,
                         decode_tokens_per_s=batch * (tokens - 1) / decode if tokens > 1 else None,
                         seconds=total))
    return rows


def format_rows(rows: list[dict], title: str) -> str:
    lines = [title, f"{'batch':>5} {'prompt':>6} {'tokens':>6} {'prefill tok/s':>14} {'decode tok/s':>13}"]
    for r in rows:
        decode = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-"
        lines.append(f"{r['batch']:>5} {r['prompt_len']:>6} {r['tokens']:>6} "
                     f"{r['prefill_tokens_per_s']:>14.1f} {decode:>13}")
    return "\n".join(lines)
