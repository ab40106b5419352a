"""``mopt bench serve`` end to end on a tiny model (it starts ``mopt serve`` as a child process), and
its request mix."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from mopt import cli
from mopt.bench.serve import RequestResult, deal, default_processes, make_requests, run_load_processes, summarize


def test_request_mix_is_seeded_and_exact():
    fixed = make_requests(10, 16, 8, vocab_size=50, seed=1)
    assert [len(r.prompt) for r in fixed] == [16] * 10 and [r.output_len for r in fixed] == [8] * 10
    assert all(0 <= t < 50 for r in fixed for t in r.prompt)
    assert [r.prompt for r in make_requests(10, 16, 8, 50, seed=1)] == [r.prompt for r in fixed]
    assert [r.prompt for r in make_requests(10, 16, 8, 50, seed=2)] != [r.prompt for r in fixed]
    mixed = make_requests(200, 100, 40, 50, seed=1, range_ratio=0.5, disconnect_fraction=0.25)
    assert min(len(r.prompt) for r in mixed) >= 50 and max(len(r.prompt) for r in mixed) <= 150
    assert len({len(r.prompt) for r in mixed}) > 20 and min(r.output_len for r in mixed) >= 20
    leaving = [r for r in mixed if r.disconnect_after is not None]
    assert len(leaving) == 50 and all(r.disconnect_after == max(1, r.output_len // 2) for r in leaving)


def test_summary_counts_only_completed_requests():
    results = [RequestResult(4, 10, ttft=0.1, latency=1.0), RequestResult(4, 10, ttft=0.3, latency=2.8),
               RequestResult(4, 3, ttft=0.2, disconnected=True), RequestResult(4, error="HTTP 500: boom")]
    report = summarize(results, duration=2.0, concurrency=2)
    assert (report.completed, report.disconnected, report.errors, report.output_tokens) == (2, 1, 1, 20)
    assert report.output_tokens_per_s == 10.0 and report.requests_per_s == 1.0
    assert report.ttft_s["p50"] == 0.1 and report.ttft_s["p99"] == 0.3
    assert report.tpot_s["mean"] == pytest.approx((0.9 / 9 + 2.5 / 9) / 2)  # (latency - TTFT) / (tokens - 1)


@pytest.mark.parametrize("num_requests,concurrency,processes,shares", [
    (8, 4, 1, [([0, 1, 2, 3, 4, 5, 6, 7], 4)]),
    (8, 4, 2, [([0, 2, 4, 6], 2), ([1, 3, 5, 7], 2)]),
    (7, 5, 2, [([0, 2, 4, 6], 3), ([1, 3, 5], 2)]),
    (10, 3, 8, [([0, 3, 6, 9], 1), ([1, 4, 7], 1), ([2, 5, 8], 1)]),  # no process without a client
    (2, 64, 4, [([0], 32), ([1], 32)]),  # nor without a request (clients beyond the requests idle)
])
def test_requests_and_clients_are_dealt_over_processes(num_requests, concurrency, processes, shares):
    dealt = deal(num_requests, concurrency, processes)
    assert dealt == shares
    assert sorted(i for indices, _ in dealt for i in indices) == list(range(num_requests))


@pytest.mark.parametrize("concurrency,cpus,processes", [(64, 32, 4), (64, 2, 1), (8, 32, 1), (17, 32, 2), (256, 16, 4)])
def test_default_processes(concurrency, cpus, processes):
    assert default_processes(concurrency, cpus) == processes


def test_clients_in_two_processes_against_a_server(chat_model_dir, tmp_path):
    """The load spread over two processes: every request answered and in request order, the wall time from
    the first start to the last end."""
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "serve", str(chat_model_dir), "--device", "cpu", "--concurrency", "4", "--num-requests",
                     "10", "--prompt-len", "8", "--output-len", "6", "--client-processes", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["completed"], report["errors"], report["output_tokens"], report["client_processes"]) == (10, 0, 60, 2)
    assert report["server_errors"] == 0 and report["leaked_blocks"] == 0


class _ExitsOnArrival:
    """Unpickled in a load-generator process, it ends that process at once: a process that dies."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_dead_load_process_is_an_error_naming_it():
    """No hang: the parent notices the process that died without reporting (the other still waits to start)
    and raises, and no process is left."""
    requests: list = make_requests(4, 4, 2, vocab_size=10)
    requests[1] = _ExitsOnArrival()  # process 1's share: requests 1 and 3
    children = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="load-generator process 1 exited with code 3 before reporting"):
        run_load_processes("http://127.0.0.1:1", "m", requests, concurrency=2, processes=2, timeout=5.0)
    assert set(multiprocessing.active_children()) == children


def test_dummy_weights_with_offline_baseline(chat_model_dir, tmp_path, capsys):
    """The GPU command's path on a tiny config: dummy FP8 weights, no tokenizer, token-id prompts."""
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "serve", "--dummy", str(chat_model_dir), "--format", "fp8-kv", "--device", "cpu",
                     "--concurrency", "4", "--num-requests", "8", "--prompt-len", "8", "--output-len", "6",
                     "--offline-baseline", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["completed"], report["errors"], report["output_tokens"]) == (8, 0, 48)
    assert report["server_errors"] == 0 and report["leaked_blocks"] == 0
    assert report["offline"]["output_tokens"] == 48 and report["offline"]["ratio"] > 0
    assert "serve / offline output tok/s" in capsys.readouterr().out


def test_clients_that_walk_away_leak_nothing(chat_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "serve", str(chat_model_dir), "--device", "cpu", "--concurrency", "8", "--num-requests",
                     "16", "--prompt-len", "8", "--output-len", "40", "--disconnect-fraction", "0.5",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["completed"], report["disconnected"], report["errors"]) == (8, 8, 0)
    assert report["server_errors"] == 0 and report["leaked_blocks"] == 0


@pytest.mark.parametrize("argv,status,message", [
    (["--concurrency", "0"], 2, "argument --concurrency: expected an integer >= 1, got 0"),
    (["--prompt-len", "x"], 2, "argument --prompt-len: expected an integer >= 1, got 'x'"),
    (["--disconnect-fraction", "1.5"], 2, "argument --disconnect-fraction: expected a number in [0, 1], got 1.5"),
    (["--range-ratio", "1"], 2, "argument --range-ratio: expected a number in [0, 1), got 1"),
    (["--client-processes", "0"], 2, "argument --client-processes: expected an integer >= 1, got 0"),
    (["--max-num-seqs", "0"], 2, "argument --max-num-seqs: expected an integer >= 1, got 0"),
    (["--url", "http://127.0.0.1:1", "--offline-baseline"], 1, "--offline-baseline needs the engine options"),
    (["--offline-baseline", "--disconnect-fraction", "0.5"], 1, "--offline-baseline compares full answers"),
    (["--dummy", "no-such-preset"], 1, "no-such-preset: not a preset"),
])
def test_bench_serve_arguments(argv, status, message, capsys):
    """Refused by name before any server starts or model loads: by argparse (status 2) or by the
    checks across options (status 1)."""
    assert run_cli(["bench", "serve", *argv]) == status
    assert message in capsys.readouterr().err


def run_cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse
        return e.code


@pytest.mark.parametrize("argv", [
    [],
    ["some/checkpoint", "--device", "cpu", "--dtype", "float32", "--max-num-seqs", "8", "--max-model-len", "512"],
    ["--dummy", "llama3-8b", "--format", "fp8-kv", "--enforce-eager", "--backend", "reference", "--tokenizer", "t"],
    ["--dummy", "qwen3-30b-a3b", "--format", "fp8", "-tp", "2", "--enable-expert-parallel"],
    ["--dummy", "llama3-8b", "--no-engine-process"],
])
def test_the_started_server_gets_the_same_engine_options(argv):
    """``mopt bench serve`` starts ``mopt serve`` with the flags of ``engine_flags``: they parse back to
    the same engine options."""
    from mopt.serve.command import engine_flags

    parser = cli.build_parser()
    bench = parser.parse_args(["bench", "serve", *argv])
    serve = parser.parse_args(["serve", *engine_flags(bench)])
    options = ("model", "format", "device", "dtype", "kv_cache_dtype", "backend", "dummy", "tokenizer",
               "max_model_len", "max_num_seqs", "enforce_eager", "tensor_parallel_size", "enable_expert_parallel",
               "engine_process")
    assert {o: getattr(serve, o) for o in options} == {o: getattr(bench, o) for o in options}
