"""Time decode attention's tile widths in engine conditions (Llama-3-8B heads, whole and per rank of two).

Each case runs ``triton_attention.decode`` as a decode step does: unrotated new keys and values written
by the kernel (``NewTokens``), E4M3 output for an FP8 cache (the FP8 ``o_proj``'s input), and eight
layers' caches in turn so that keys and values come from HBM, not L2. Tile widths are forced through
``decode_tiles``: ``64/64`` is the single 64-token tile used before the narrow tier, ``rule`` is what
``decode_tiles`` picks (page 16: 32/64). Times are the median of three interleaved rounds (a CUDA
graph of 64 calls, median of 5 replays each), in microseconds a call. This is kernel time alone: check
a change end to end too (``mopt bench generate``), where a 128-token tier that gained up to 1.7x here
lost 2-4%.
Usage: PYTHONPATH=src python3 bench/sweep_decode_tiles.py [--batches 1,4,16,64] [--contexts 136,1024,4096]
       [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from mopt.bench.kernels import _time
from mopt.kernels import triton_attention

PAGE, HEAD_DIM, GROUP, LAYERS = 16, 128, 4, 8
FORCED = {"64/64": (64, 64), "16/64": (16, 64)}


def _case(cache_dtype, kv_heads, batch, ctx, dev):
    per_seq = -(-(ctx + 1) // PAGE)
    blocks = batch * per_seq
    caches = [tuple((torch.randn(blocks, PAGE, kv_heads, HEAD_DIM, device=dev) * 0.5).to(cache_dtype)
                    for _ in range(2)) for _ in range(LAYERS)]
    table = torch.arange(blocks, device=dev, dtype=torch.int32).reshape(batch, per_seq)
    lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    slots = table[:, (ctx - 1) // PAGE].long() * PAGE + (ctx - 1) % PAGE
    new = triton_attention.NewTokens(torch.randn(batch, kv_heads, HEAD_DIM, device=dev, dtype=torch.bfloat16),
                                     torch.randn(batch, kv_heads, HEAD_DIM, device=dev, dtype=torch.bfloat16),
                                     lens.long() - 1, torch.randn(ctx + 1, HEAD_DIM, device=dev), slots)
    q = torch.randn(batch, kv_heads * GROUP, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    out_scale = torch.ones(1, device=dev) if cache_dtype == torch.float8_e4m3fn else None
    return [lambda k=k, v=v: triton_attention.decode(q, k, v, table, lens, HEAD_DIM ** -0.5, 1.0, 1.0,
                                                     out_scale=out_scale, new=new) for k, v in caches]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--contexts", default="136,1024,4096")
    parser.add_argument("--json")
    args = parser.parse_args()
    dev = torch.device("cuda")
    rule = triton_attention.decode_tiles
    rows = []
    for cache_dtype, kv_heads, batch, ctx in itertools.product(
            (torch.float8_e4m3fn, torch.bfloat16), (8, 4), [int(b) for b in args.batches.split(",")],
            [int(c) for c in args.contexts.split(",")]):
        fns = _case(cache_dtype, kv_heads, batch, ctx, dev)
        times: dict[str, list[float]] = {}
        for _ in range(3):
            for name, tiles in [("rule", None), *FORCED.items()]:
                triton_attention.decode_tiles = rule if tiles is None else (lambda page, t=tiles: t)
                try:
                    times.setdefault(name, []).append(1e6 * _time(fns, 64, 5))
                finally:
                    triton_attention.decode_tiles = rule
        us = {name: statistics.median(t) for name, t in times.items()}
        cache = "fp8" if cache_dtype == torch.float8_e4m3fn else "bf16"
        picked = rule(PAGE)
        print(f"{cache} kv_heads={kv_heads} batch={batch} ctx={ctx} splits="
              f"{triton_attention.decode_splits(batch, kv_heads, dev)} rule={'/'.join(map(str, picked))}: "
              + " ".join(f"{k} {v:.1f}" for k, v in us.items())
              + f" | rule vs 64/64 {us['64/64'] / us['rule']:.2f}x", flush=True)
        rows.append(dict(cache=cache, kv_heads=kv_heads, batch=batch, ctx=ctx, rule=picked, us=us))
        del fns
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
