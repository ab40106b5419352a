"""Prefill latency (time to first token) of a dummy preset at any tensor-parallel size, and where rank 0 spends it.

For each ``BxT`` case, times one engine step that prefills ``B`` new prompts of ``T`` tokens (median, min and
max of ``--repeats`` after two warm-ups), then profiles one 1x``--profile-tokens`` prefill on rank 0 with
torch.profiler (``--profile-tokens 0``: none): wall time against the GPU kernels' time, and tables by GPU
time and by CPU time. Prints the engine's start time first (loading, cache, CUDA graph captures).
Usage: PYTHONPATH=src python3 bench/prefill_latency.py --format fp8-kv -tp 2 [--enable-expert-parallel] [--preset llama3-8b]
       [--cases 1x128,1x512,8x128] [--repeats 10] [--profile-tokens 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mopt.engine.llm import LLM
from mopt.engine.sequence import SamplingParams

ONE_TOKEN = SamplingParams(max_tokens=1, ignore_eos=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prefill_seconds(llm: LLM, batch: int, tokens: int) -> float:
    for b in range(batch):
        llm.scheduler.add(llm._make_sequence([(b * 7919 + i * 31 + 1) % llm.vocab_size for i in range(tokens)],
                                             ONE_TOKEN))
    _sync()
    start = time.perf_counter()
    llm._step()
    _sync()
    seconds = time.perf_counter() - start
    while llm.scheduler.has_unfinished():
        llm._step()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--format", default="fp8-kv")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--cases", default="1x128,1x256,1x512,8x128")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile-tokens", type=int, default=512)
    args = parser.parse_args()
    cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    most = max([b * t for b, t in cases] + [args.profile_tokens])
    start = time.perf_counter()
    llm = LLM(args.preset, load_format="dummy", quantization=args.format, max_model_len=max(t for _, t in cases) + 16,
              max_num_seqs=max(b for b, _ in cases), max_num_batched_tokens=most,
              tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel)
    name = f"tp{args.tensor_parallel_size}{' ep' if args.enable_expert_parallel else ''} {args.preset} {args.format}"
    captures = getattr(llm.runner.prefill_graphs, "capture_seconds", float("nan"))
    reserved = torch.cuda.memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
    print(f"{name} engine ready in {time.perf_counter() - start:.1f} s, of which prefill graph captures "
          f"{captures:.1f} s; rank 0 holds {reserved:.2f} GiB", flush=True)
    for batch, tokens in cases:
        _prefill_seconds(llm, batch, tokens)
        _prefill_seconds(llm, batch, tokens)
        times = [1e3 * _prefill_seconds(llm, batch, tokens) for _ in range(args.repeats)]
        print(f"{name} prefill {batch}x{tokens}: median {statistics.median(times):.2f} ms, min {min(times):.2f}, "
              f"max {max(times):.2f}", flush=True)
    if not args.profile_tokens:
        return
    start = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        _prefill_seconds(llm, 1, args.profile_tokens)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    print(f"{name} profiled prefill 1x{args.profile_tokens}: wall {1e3 * wall:.2f} ms (profiler on), "
          f"GPU kernels {gpu / 1e3:.2f} ms")
    print(events.table(sort_by="self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total", row_limit=25))
    print(events.table(sort_by="cpu_time_total", row_limit=30))


if __name__ == "__main__":  # tensor-parallel workers are spawned and import this module
    main()
