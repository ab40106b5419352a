"""All-reduce latency on this node's GPUs: NCCL against mopt's one-shot all-reduce (symmetric memory),
and the all-reduce + residual add + RMSNorm of a decoder layer: one-shot sum then the norm kernel
against the fused kernel (``mopt.kernels.triton_allreduce_norm``).

Usage: python3 bench/tp_allreduce.py [--ranks 2] [--json out.json]
Each size is summed 64 times in a row, eagerly and inside one CUDA graph (how decode runs them); the
table gives microseconds per all-reduce on rank 0 and checks that both paths give the same sums. The
norm table chains 64 layers (each one's residual output feeds the next) inside one CUDA graph,
replays it 50 times, and checks the fused chain's bits against the unfused chain's (rank 0's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

SIZES = [4096, 16384, 65536, 262144, 524288, 2097152]  # bf16 elements: 8 KiB (batch 1 x 4096) ... 4 MiB
CALLS = 64


def _time(fn, device, repeats: int = 20) -> float:
    """Microseconds per all-reduce of ``fn`` (which runs CALLS of them)."""
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1000 / (repeats * CALLS)


def _rank(rank: int, size: int, port: int, out: str | None) -> None:
    import torch.distributed as dist

    from mopt.engine import one_shot
    from mopt.engine.distributed import new_group
    from mopt.engine.tp_launch import Timeouts, World, _agree, _tcp_store, prepare_process_env

    prepare_process_env()
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    store = dist.PrefixStore("mopt", _tcp_store("127.0.0.1", port, size, rank == 0, 120))
    world = World(rank, size, rank, device, store, ("127.0.0.1", port), Timeouts())
    world.ctrl = new_group("gloo", store, rank, size, 120, "ctrl")
    world.group = new_group("nccl", store, rank, size, 120, "model", device)
    fast = one_shot.set_up(world, lambda ok: _agree(world.ctrl, ok))
    rows = []
    for numel in SIZES:
        torch.manual_seed(rank)
        xs = [torch.randn(numel, device=device, dtype=torch.bfloat16) for _ in range(4)]
        row = {"bytes": numel * 2}

        def nccl():
            for i in range(CALLS):
                world.group.all_reduce(xs[i % 4].clone())

        row["nccl_eager_us"] = _time(nccl, device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            nccl()
        row["nccl_graph_us"] = _time(graph.replay, device)
        if fast is not None and numel * 2 <= fast.max_bytes:
            reference = world.group.all_reduce(xs[0].clone())
            row["same_sums"] = bool(torch.equal(fast(xs[0]), reference))

            def one():
                for i in range(CALLS):
                    fast(xs[i % 4])

            row["one_shot_eager_us"] = _time(one, device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                one()
            row["one_shot_graph_us"] = _time(graph.replay, device)
        rows.append(row)
    norm_rows = _norm_table(fast, world, device, rank)
    if rank == 0:
        name = torch.cuda.get_device_name(device)
        print(f"all-reduce of BF16 over {size} x {name}, {CALLS} in a row; microseconds per all-reduce"
              f" (one-shot {'on, up to ' + str(fast.max_bytes) + ' bytes' if fast else 'unavailable'})")
        if fast is None:
            print(f"one-shot all-reduce unavailable: {one_shot.unavailable_reason}")
        print(f"{'bytes':>9} {'NCCL eager':>11} {'NCCL graph':>11} {'1-shot eager':>13} {'1-shot graph':>13} {'same':>5}")
        for r in rows:
            print(f"{r['bytes']:>9} {r['nccl_eager_us']:>11.2f} {r['nccl_graph_us']:>11.2f} "
                  f"{r.get('one_shot_eager_us', float('nan')):>13.2f} {r.get('one_shot_graph_us', float('nan')):>13.2f} "
                  f"{str(r.get('same_sums', '-')):>5}")
        print(f"all-reduce + residual add + RMSNorm (BF16, {CALLS} chained layers in a CUDA graph); microseconds per"
              f" layer{'' if fast is not None and fast.norm is not None else ' (fused kernel unavailable: ' + str(one_shot.unavailable_reason) + ')'}")
        print(f"{'rows x hidden':>14} {'NCCL+norm':>10} {'1-shot+norm':>12} {'fused':>7} {'same bits':>10}")
        for r in norm_rows:
            print(f"{r['rows']:>6} x {r['hidden']:<5} {r['nccl_norm_us']:>10.2f} {r.get('one_shot_norm_us', float('nan')):>12.2f}"
                  f" {r.get('fused_us', float('nan')):>7.2f} {str(r.get('same_bits', '-')):>10}")
        if out:
            with open(out, "w") as f:
                json.dump({"device": name, "ranks": size, "rows": rows, "norm_rows": norm_rows}, f, indent=1)
    world.ctrl.all_reduce(torch.zeros(1))  # nobody leaves while another still reads its buffer
    import time

    from mopt.engine.tp_launch import destroy_groups

    del graph  # the last graph captured NCCL collectives: it goes before the groups (destroy_groups collects)
    t0 = time.perf_counter()
    destroy_groups(world)
    print(f"rank {rank}: groups destroyed in {time.perf_counter() - t0:.2f} s", flush=True)


NORM_SHAPES = [(1, 4096), (8, 4096), (64, 4096), (128, 4096), (1, 8192), (64, 8192)]


def _norm_table(fast, world, device, rank: int) -> list[dict]:
    from mopt.kernels.triton_glue import rms_norm

    rows = []
    for m, hidden in NORM_SHAPES:
        g = torch.Generator().manual_seed(m * hidden + rank)
        xs = [torch.randn(m, hidden, generator=g).to(device, torch.bfloat16) for _ in range(CALLS)]
        weight = (1 + torch.randn(hidden, generator=torch.Generator().manual_seed(1)) * 0.1).to(device)
        start = torch.randn(m, hidden, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
        row = {"rows": m, "hidden": hidden}

        def chain(norm_of):
            def run():
                residual = start
                for x in xs:
                    out, residual = norm_of(x, residual)
                return out, residual
            return run

        def with_nccl(x, residual):
            return rms_norm(world.group.all_reduce(x.clone()), weight, 1e-5, residual)

        variants = {"nccl_norm_us": with_nccl}
        if fast is not None and m * hidden * 2 <= fast.max_bytes:
            variants["one_shot_norm_us"] = lambda x, residual: rms_norm(fast(x), weight, 1e-5, residual)
            if fast.norm is not None and fast.norm.fits(xs[0]):
                variants["fused_us"] = lambda x, residual: fast.norm(x, residual, weight, 1e-5)
        results = {}
        for key, norm_of in variants.items():
            graph = torch.cuda.CUDAGraph()
            run = chain(norm_of)
            run()  # warm-up (compiles the kernels)
            torch.cuda.synchronize(device)
            with torch.cuda.graph(graph):
                results[key] = run()
            row[key] = _time(graph.replay, device, repeats=50)
        if "fused_us" in results:
            same = all(torch.equal(a, b) for a, b in zip(results["fused_us"], results["one_shot_norm_us"]))
            row["same_bits"] = same
        rows.append(row)
    return rows


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    if torch.cuda.device_count() < args.ranks:
        sys.exit(f"needs {args.ranks} GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(args.ranks, port, args.json), nprocs=args.ranks, start_method="spawn")


if __name__ == "__main__":
    main()
