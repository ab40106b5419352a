"""Sweep the split-KV decode attention's split count on the GPU (Llama-3-8B heads, whole and per rank of two).

For each (batch, KV heads, context, cache dtype), times ``triton_attention.decode`` (the split kernel and,
when split, the merge) at 1-16 splits, like ``mopt bench kernels`` (a CUDA graph of calls; median of
replays), and prints the best next to what ``decode_splits`` picks now.
Usage: PYTHONPATH=src python3 bench/sweep_decode_splits.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch

from mopt.bench.kernels import _time
from mopt.kernels import triton_attention

PAGE = 16
HEAD_DIM = 128
GROUP = 4  # Llama-3-8B: 32 query heads over 8 KV heads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--batches", default="1,16,32,64")
    parser.add_argument("--contexts", default="192,1024")
    args = parser.parse_args()
    dev = torch.device("cuda")
    rows = []
    for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for kv_heads in (8, 4):
            for batch in [int(b) for b in args.batches.split(",")]:
                for ctx in [int(c) for c in args.contexts.split(",")]:
                    per_seq = -(-ctx // PAGE)
                    blocks = batch * per_seq
                    k_cache = (torch.randn(blocks, PAGE, kv_heads, HEAD_DIM, device=dev) * 0.5).to(cache_dtype)
                    v_cache = (torch.randn(blocks, PAGE, kv_heads, HEAD_DIM, device=dev) * 0.5).to(cache_dtype)
                    table = torch.randperm(blocks, device=dev, dtype=torch.int32).reshape(batch, per_seq)
                    lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
                    q = torch.randn(batch, kv_heads * GROUP, HEAD_DIM, device=dev, dtype=torch.bfloat16)
                    now = triton_attention.decode_splits(batch, kv_heads, dev)
                    times = {}
                    for splits in (1, 2, 4, 8, 16):
                        fn = (lambda s=splits: triton_attention.decode(q, k_cache, v_cache, table, lens,
                                                                       HEAD_DIM ** -0.5, 1.0, 1.0, num_splits=s))
                        times[splits] = 1e6 * _time([fn], 50, 5)
                    best = min(times, key=times.get)
                    name = "bf16" if cache_dtype == torch.bfloat16 else "fp8"
                    print(f"{name} kv_heads={kv_heads} batch={batch} ctx={ctx}: now {now} splits {times[now]:.1f} us, "
                          f"best {best} splits {times[best]:.1f} us | " +
                          " ".join(f"{s}:{t:.1f}" for s, t in times.items()), flush=True)
                    rows.append(dict(cache=name, kv_heads=kv_heads, batch=batch, ctx=ctx, now=now, us=times))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
