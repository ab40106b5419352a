"""``mopt bench serve`` on the command line: drive a server at ``--url``, or start ``mopt serve`` as a
child process on 127.0.0.1 and a free port with the given engine options (a process of its own, so
the load generator does not share the server's interpreter), then optionally run the same requests
through ``LLM.generate`` after the server has exited and freed the device.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SERVER_START_SECONDS = 3600  # the default model may be built first; GPU start-up captures graphs
SERVER_STOP_SECONDS = 60


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mopt.cli.common import _nonnegative_int, _number, _positive_int  # a bad value names its option, nothing loads

    fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    p.add_argument("--url", help="a running server (default: start `mopt serve` with the engine options given)")
    p.add_argument("--api-key", help="for --url (default: $MOPT_API_KEY)")
    p.add_argument("--concurrency", type=_positive_int, default=8, help="clients, each sending its next request when the "
                   "last one ends (default: %(default)s)")
    p.add_argument("--num-requests", type=_positive_int, default=64, help="requests in all (default: %(default)s)")
    p.add_argument("--prompt-len", type=_positive_int, default=128, help="prompt tokens (default: %(default)s)")
    p.add_argument("--output-len", type=_positive_int, default=128, help="generated tokens, exact (default: %(default)s)")
    p.add_argument("--range-ratio", type=_number(float, lambda v: 0 <= v < 1, "a number in [0, 1)"), default=0.0,
                   help="draw lengths uniformly from L*(1-r)..L*(1+r) (default: %(default)s: fixed)")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="for prompts and lengths (default: %(default)s)")
    p.add_argument("--warmup", type=_nonnegative_int, help="short requests before timing (default: --concurrency)")
    p.add_argument("--client-processes", type=_positive_int,
                   help="load-generator processes the clients are spread over (default: one per 16 clients, at "
                        "most a quarter of the CPUs; one process's clients saturate its core near 13k tokens/s)")
    p.add_argument("--vocab-size", type=_positive_int,
                   help="token ids below it (default: the server's /v1/models vocab_size)")
    p.add_argument("--offline-baseline", action="store_true",
                   help="also run the same requests through LLM.generate with the same engine options")
    p.add_argument("--disconnect-fraction", type=fraction, default=0.0,
                   help="share of requests whose client closes the stream halfway (default: %(default)s)")
    p.add_argument("--timeout", type=_number(float, lambda v: 0 < v < float("inf"), "a number of seconds > 0"),
                   default=600.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--json", help="also write the report to this JSON file")


def check_arguments(args: argparse.Namespace) -> None:
    from mopt.serve.command import check_engine_options

    if args.offline_baseline and args.url:
        raise ValueError("--offline-baseline needs the engine options and a free device: leave out --url so the "
                         "benchmark starts (and stops) the server itself")
    if args.offline_baseline and args.disconnect_fraction:
        raise ValueError("--offline-baseline compares full answers: leave out --disconnect-fraction")
    if not args.url:
        check_engine_options(args)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the benchmark dies (killed, it runs no cleanup of its own)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def started_server(args: argparse.Namespace):
    """``mopt serve`` as a child process with ``args``' engine options; yields its URL, stops it
    with SIGTERM (and checks that it exits 0)."""
    from mopt.serve.command import engine_flags

    command = [sys.executable, "-m", "mopt.cli", "serve", *engine_flags(args), "--host", "127.0.0.1", "--port", "0",
               "--max-queue", str(max(args.num_requests, args.concurrency))]
    env = {k: v for k, v in os.environ.items() if k != "MOPT_API_KEY"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_die_with_parent)
    url: list[str] = []
    announced = threading.Event()

    def forward() -> None:
        for line in proc.stderr:
            if "listening on http://" in line and not url:
                url.append(line.rsplit("listening on ", 1)[1].strip())
                announced.set()
            sys.stderr.write(line)

    threading.Thread(target=forward, daemon=True).start()
    try:
        end = time.monotonic() + SERVER_START_SECONDS
        while not announced.wait(0.5):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode} before listening: "
                                   f"{' '.join(command)}")
            if time.monotonic() > end:
                raise RuntimeError(f"the server did not start within {SERVER_START_SECONDS} s")
        yield url[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(SERVER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            print(f"mopt bench serve: the server exited with status {proc.returncode}", file=sys.stderr)


def _machine(args: argparse.Namespace) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Exit status 1 when a request failed (other than by disconnecting on purpose) or KV-cache
    blocks stayed held; the report is printed either way."""
    from mopt.serve import require_serve_extra
    from mopt.serve.command import api_key, make_llm, served_model_name

    check_arguments(args)
    require_serve_extra()  # the server it starts needs it
    if importlib.util.find_spec("httpx") is None:  # the load generator's client
        raise RuntimeError("mopt bench serve needs httpx: pip install httpx (or 'mopt[test]')")
    from mopt.bench.serve import bench_offline, bench_server, deal, default_processes, format_report, \
        make_requests, model_card

    warmup = args.concurrency if args.warmup is None else args.warmup
    load = [os.getloadavg()[0]]  # the machine's 1-minute load: other jobs on a shared machine skew the numbers
    context = contextlib.nullcontext(args.url) if args.url else started_server(args)
    key = api_key(args) if args.url else None
    with context as url:
        vocab = args.vocab_size or model_card(url, key).get("vocab_size")
        if vocab is None:
            raise ValueError(f"{url}/v1/models does not say vocab_size: pass --vocab-size")
        requests = make_requests(args.num_requests, args.prompt_len, args.output_len, vocab, args.seed,
                                 args.range_ratio, args.disconnect_fraction)
        processes = len(deal(len(requests), args.concurrency, args.client_processes or
                             default_processes(args.concurrency)))
        print(f"benchmarking {url}: {args.num_requests} requests, {args.concurrency} clients in {processes} "
              f"process{'es' if processes > 1 else ''} ...", file=sys.stderr)
        report = bench_server(url, requests, args.concurrency, key, min(warmup, len(requests)), args.timeout,
                              processes)
    if args.offline_baseline:
        print("offline baseline: the same requests through LLM.generate ...", file=sys.stderr)
        llm = make_llm(args)
        report.offline = bench_offline(llm, requests, min(warmup, len(requests)))
        report.offline["ratio"] = report.output_tokens_per_s / report.offline["output_tokens_per_s"]
    load.append(os.getloadavg()[0])
    name = served_model_name(args) if not args.url else args.url
    machine = _machine(args) if not args.url else "server at " + args.url
    title = (f"mopt bench serve: {name}, prompt {args.prompt_len} / output {args.output_len} tokens"
             f"{f' (range ratio {args.range_ratio})' if args.range_ratio else ''}, on {machine}")
    print(format_report(report, title))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(report.to_dict(), title=title, machine=machine,
                                                   load_average_start_end=load, argv=sys.argv[1:]), indent=2))
    return 1 if report.errors or report.server_errors or report.leaked_blocks else 0
