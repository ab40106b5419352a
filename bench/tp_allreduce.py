"""All-reduce latency on this node's GPUs: NCCL against mopt's one-shot all-reduce (symmetric memory).

Usage: python3 bench/tp_allreduce.py [--ranks 2] [--json out.json]
Each size is summed 64 times in a row, eagerly and inside one CUDA graph (how decode runs them); the
table gives microseconds per all-reduce on rank 0 and checks that both paths give the same sums.
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
        if out:
            with open(out, "w") as f:
                json.dump({"device": name, "ranks": size, "rows": rows}, f, indent=1)
    world.ctrl.all_reduce(torch.zeros(1))  # nobody leaves while another still reads its buffer
    world.group.shutdown()


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
