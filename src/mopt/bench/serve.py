"""``mopt bench serve``: load on an OpenAI-compatible server, in the manner of vLLM's benchmark_serving.

``concurrency`` clients each send their next request as soon as the previous one ends (a closed
loop, vLLM's ``--max-concurrency`` at an infinite request rate) until ``num_requests`` are done.
Requests are streaming completions of random token-id prompts (seeded) with ``ignore_eos``, so the
prompt and output lengths are exact; ``range_ratio`` > 0 draws each length uniformly from
``[L * (1 - r), L * (1 + r)]``. Per request: TTFT (send to the first token), TPOT ((latency - TTFT)
/ (tokens - 1)), latency. Output tokens/s counts the tokens of completed requests over the wall time
of the whole run (warm-up excluded). The clients run in ``processes`` load-generator processes (one asyncio
loop each, the requests dealt round-robin): one loop of httpx clients is itself a bottleneck near
13k streamed tokens/s (79% of a core at 12k on a 2x H200 host), which would be measured as the
server's. A share of the clients can close their stream halfway
(``disconnect_fraction``); afterwards the server's /metrics tell how many KV-cache blocks are still
held once it is idle (none should be) and how many requests failed on its side.

The offline baseline runs the same requests through ``LLM.generate`` (one call, so the scheduler
batches them as the server's does) with the same engine options, after a warm-up of its own.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import queue
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import httpx

WARMUP_OUTPUT_LEN = 4


@dataclass
class BenchRequest:
    prompt: list[int]
    output_len: int
    disconnect_after: int | None = None  # tokens after which the client closes its stream


def make_requests(num_requests: int, prompt_len: int, output_len: int, vocab_size: int, seed: int = 0,
                  range_ratio: float = 0.0, disconnect_fraction: float = 0.0) -> list[BenchRequest]:
    """Seeded random token-id prompts and output lengths (see the module doc)."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        low, high = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
        return rng.randint(low, high)

    requests = []
    for _ in range(num_requests):
        n = length(prompt_len)
        requests.append(BenchRequest([rng.randrange(vocab_size) for _ in range(n)], length(output_len)))
    for i in rng.sample(range(num_requests), round(disconnect_fraction * num_requests)):
        requests[i].disconnect_after = max(1, requests[i].output_len // 2)
    return requests


@dataclass
class RequestResult:
    prompt_len: int
    output_tokens: int = 0
    ttft: float | None = None
    latency: float | None = None
    disconnected: bool = False
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.error is None and not self.disconnected

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


async def send(http: httpx.AsyncClient, model: str, request: BenchRequest) -> RequestResult:
    """One streaming completion; tokens are counted from the chunks' ``token_ids`` (mopt's and
    vLLM's ``return_token_ids``), so a model without a tokenizer is measured as well."""
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    result = RequestResult(len(request.prompt))
    start = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"].get("message", str(event["error"]))
                    return result
                for choice in event["choices"]:
                    new = len(choice.get("token_ids") or ())
                    if new and result.ttft is None:
                        result.ttft = time.perf_counter() - start
                    result.output_tokens += new
                if request.disconnect_after is not None and result.output_tokens >= request.disconnect_after:
                    result.disconnected = True
                    return result  # leaving the block closes the connection mid-answer
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    if result.output_tokens != request.output_len:
        result.error = f"got {result.output_tokens} tokens, asked for {request.output_len}"
    return result


async def run_load(url: str, model: str, requests: list[BenchRequest], concurrency: int,
                   api_key: str | None = None, timeout: float = 600.0) -> tuple[list[RequestResult], float]:
    """``(results in request order, wall seconds)`` of ``concurrency`` closed-loop clients."""
    results, start, end = await _run_load_timed(url, model, requests, concurrency, api_key, timeout)
    return results, end - start


async def _run_load_timed(url: str, model: str, requests: list[BenchRequest], concurrency: int,
                          api_key: str | None, timeout: float) -> tuple[list[RequestResult], float, float]:
    """:func:`run_load`'s results with its start and end (``time.monotonic()``, comparable between processes)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[RequestResult | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:
            results[i] = await send(http, model, requests[i])

    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=30.0)) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(min(concurrency, len(requests)))))
        return results, start, time.monotonic()


CLIENTS_PER_PROCESS = 16


def default_processes(concurrency: int, cpus: int | None = None) -> int:
    """Load-generator processes when none are asked for: one per 16 clients, at most a quarter of the CPUs
    (the rest stay with the server and its tensor-parallel ranks on the same machine)."""
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    return max(1, min(-(-concurrency // CLIENTS_PER_PROCESS), cpus // 4))


def deal(num_requests: int, concurrency: int, processes: int) -> list[tuple[list[int], int]]:
    """Each process's ``(request indices, clients)``: requests round-robin, clients as evenly as they go."""
    processes = max(1, min(processes, concurrency, num_requests))
    return [(list(range(p, num_requests, processes)), concurrency // processes + (p < concurrency % processes))
            for p in range(processes)]


def _load_process(index: int, url: str, model: str, requests: list[BenchRequest], concurrency: int,
                  api_key: str | None, timeout: float, start_together, results) -> None:
    try:
        start_together.wait(timeout=300)
        results.put((index, *asyncio.run(_run_load_timed(url, model, requests, concurrency, api_key, timeout)), None))
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which raises it
        results.put((index, None, 0.0, 0.0, f"{type(e).__name__}: {e}"))


def run_load_processes(url: str, model: str, requests: list[BenchRequest], concurrency: int, processes: int,
                       api_key: str | None = None, timeout: float = 600.0) -> tuple[list[RequestResult], float]:
    """:func:`run_load` with the clients spread over ``processes`` processes that start together; the wall
    time runs from the first start to the last end. A process that fails or dies is an error naming it."""
    shares = deal(len(requests), concurrency, processes)
    if len(shares) == 1:
        return asyncio.run(run_load(url, model, requests, concurrency, api_key, timeout))
    ctx = multiprocessing.get_context("spawn")  # nothing of the parent's state (a model, CUDA) is inherited
    start_together, inbox = ctx.Barrier(len(shares)), ctx.Queue()
    workers = [ctx.Process(target=_load_process, daemon=True, name=f"mopt-bench-load-{p}",
                           args=(p, url, model, [requests[i] for i in indices], clients, api_key, timeout,
                                 start_together, inbox))
               for p, (indices, clients) in enumerate(shares)]
    for w in workers:
        w.start()
    got: dict[int, tuple] = {}
    try:
        while len(got) < len(workers):
            try:
                index, results, start, end, error = inbox.get(timeout=1.0)
            except queue.Empty:
                dead = [(p, w.exitcode) for p, w in enumerate(workers) if p not in got and w.exitcode is not None]
                if dead:
                    raise RuntimeError(f"load-generator process {dead[0][0]} exited with code {dead[0][1]} "
                                       "before reporting") from None
                continue
            if error is not None:
                raise RuntimeError(f"load-generator process {index} failed: {error}")
            got[index] = (results, start, end)
    finally:  # after a failure the others may wait to start, or run on: they are stopped, not waited for
        for w in workers:
            w.join(timeout=5 if len(got) == len(workers) else 0)
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
    merged: list[RequestResult | None] = [None] * len(requests)
    for p, (indices, _) in enumerate(shares):
        for i, result in zip(indices, got[p][0]):
            merged[i] = result
    return merged, max(end for _, _, end in got.values()) - min(start for _, start, _ in got.values())


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {"mean": statistics.fmean(ordered), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99)}


@dataclass
class ServeReport:
    concurrency: int
    num_requests: int
    completed: int
    disconnected: int
    errors: int
    duration_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_s: dict
    tpot_s: dict
    error_samples: list[str] = field(default_factory=list)
    server_errors: float | None = None  # mopt_requests_total{outcome="error"} added during the run
    leaked_blocks: float | None = None  # KV-cache blocks still held once the server is idle
    offline: dict | None = None
    client_processes: int = 1  # load-generator processes the clients ran in

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> ServeReport:
    done = [r for r in results if r.completed]
    tokens = sum(r.output_tokens for r in done)
    return ServeReport(concurrency=concurrency, num_requests=len(results), completed=len(done),
                       disconnected=sum(r.disconnected for r in results),
                       errors=sum(r.error is not None for r in results), duration_s=duration,
                       output_tokens=tokens, output_tokens_per_s=tokens / duration, requests_per_s=len(done) / duration,
                       ttft_s=_percentiles([r.ttft for r in done if r.ttft is not None]),
                       tpot_s=_percentiles([r.tpot for r in done if r.tpot is not None]),
                       error_samples=sorted({r.error for r in results if r.error})[:5])


# -- the server's view --------------------------------------------------------------------------

def scrape(url: str, api_key: str | None = None) -> dict[str, float]:
    """``/metrics`` as ``{series: value}`` (Prometheus text, comments dropped)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_idle(url: str, deadline: float = 60.0) -> dict[str, float]:
    """Metrics once nothing runs or waits (aborts land on the engine's next iteration)."""
    end = time.monotonic() + deadline
    while True:
        metrics = scrape(url)
        if metrics.get("mopt_num_requests_running") == 0 and metrics.get("mopt_num_requests_waiting") == 0:
            return metrics
        if time.monotonic() > end:
            raise RuntimeError(f"the server at {url} did not go idle within {deadline:.0f} s")
        time.sleep(0.05)


def model_card(url: str, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]


def bench_server(url: str, requests: list[BenchRequest], concurrency: int, api_key: str | None = None,
                 warmup: int = 0, timeout: float = 600.0, processes: int = 1) -> ServeReport:
    """Run ``requests`` against the server at ``url`` (after ``warmup`` short requests) from ``processes``
    load-generator processes and report, including the server's errors and the KV-cache blocks it still
    holds once idle."""
    card = model_card(url, api_key)
    model = card["id"]
    if warmup:
        warm = [BenchRequest(r.prompt, WARMUP_OUTPUT_LEN) for r in requests[:warmup]]
        asyncio.run(run_load(url, model, warm, concurrency, api_key, timeout))
    before = wait_idle(url)
    results, duration = run_load_processes(url, model, requests, concurrency, processes, api_key, timeout)
    report = summarize(results, duration, concurrency)
    report.client_processes = len(deal(len(requests), concurrency, processes))
    after = wait_idle(url)
    error_series = 'mopt_requests_total{outcome="error"}'
    report.server_errors = after.get(error_series, 0.0) - before.get(error_series, 0.0)
    report.leaked_blocks = after["mopt_kv_cache_total_blocks"] - after["mopt_kv_cache_free_blocks"]
    return report


def bench_offline(llm, requests: list[BenchRequest], warmup: int = 0) -> dict:
    """The same requests through ``LLM.generate`` in one call: output tokens/s and requests/s.

    It runs in a worker thread, as the server's engine does: torch's CPU threading differs between
    the main thread and others (on our shared 2-core machine, small ops in the main thread's
    2-thread OpenMP team were 10-25x slower), and the comparison is of serving, not of that.
    """
    from mopt.engine.sequence import SamplingParams

    def run() -> None:
        if warmup:
            llm.generate([r.prompt for r in requests[:warmup]],
                         SamplingParams(max_tokens=WARMUP_OUTPUT_LEN, ignore_eos=True))
        params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True) for r in requests]
        start = time.perf_counter()
        outputs = llm.generate([r.prompt for r in requests], params)
        result.update(duration=time.perf_counter() - start, tokens=sum(len(o.token_ids) for o in outputs))

    result: dict = {}
    worker = threading.Thread(target=run, name="mopt-offline-baseline")
    worker.start()
    worker.join()
    if not result:
        raise RuntimeError("the offline baseline failed (see the error above)")
    duration, tokens = result["duration"], result["tokens"]
    return {"duration_s": duration, "output_tokens": tokens, "output_tokens_per_s": tokens / duration,
            "requests_per_s": len(requests) / duration}


def format_report(report: ServeReport, title: str) -> str:
    def ms(stats: dict, key: str) -> str:
        return "-" if stats[key] is None else f"{1e3 * stats[key]:.1f}"

    rows = [("requests (completed / disconnected / errors)",
             f"{report.completed} / {report.disconnected} / {report.errors} of {report.num_requests}"),
            ("concurrency (load-generator processes)", f"{report.concurrency} ({report.client_processes})"),
            ("duration", f"{report.duration_s:.2f} s"),
            ("output tokens", str(report.output_tokens)),
            ("output tok/s", f"{report.output_tokens_per_s:.1f}"), ("requests/s", f"{report.requests_per_s:.3f}")]
    for name, stats in (("TTFT", report.ttft_s), ("TPOT", report.tpot_s)):
        rows.append((f"{name} ms mean / p50 / p90 / p99",
                     " / ".join(ms(stats, k) for k in ("mean", "p50", "p90", "p99"))))
    if report.server_errors is not None:
        rows.append(("server errors (500s during the run)", f"{report.server_errors:.0f}"))
    if report.leaked_blocks is not None:
        rows.append(("KV-cache blocks held once idle", f"{report.leaked_blocks:.0f}"))
    if report.offline is not None:
        rows += [("offline LLM.generate output tok/s", f"{report.offline['output_tokens_per_s']:.1f}"),
                 ("serve / offline output tok/s", f"{report.offline['ratio']:.3f}")]
    rows += [("error", e) for e in report.error_samples]
    width = max(len(k) for k, _ in rows)
    return "\n".join([title] + [f"{k:<{width}}  {v}" for k, v in rows])
