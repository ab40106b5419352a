"""Prometheus metrics of a server: requests by outcome, tokens, latencies, queue and KV cache.

Each server has a registry of its own (tests run several in one process). Engine gauges are read
from the engine's latest stats when ``/metrics`` is scraped, so they cost nothing per step.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mopt.engine.serving_engine import ServingEngine
from mopt.engine.stream import RequestStream

# Outcomes of a generation request (one HTTP request, whatever its n):
OUTCOMES = ("success", "abort", "error", "invalid", "queue_full", "unavailable", "unauthorized")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0)


class _EngineCollector:
    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        for name, doc, value in (
            ("mopt_num_requests_running", "Sequences in the running batch.", stats.running),
            ("mopt_num_requests_waiting", "Sequences accepted and waiting (queued or preempted).", stats.waiting),
            ("mopt_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0 to 1).", stats.kv_cache_usage),
            ("mopt_kv_cache_free_blocks", "Free KV-cache blocks.", stats.free_blocks),
            ("mopt_kv_cache_total_blocks", "KV-cache blocks in all.", stats.total_blocks),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, engine: ServingEngine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mopt_requests", "Generation requests by outcome.", ["outcome"],
                                registry=self.registry)
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.requests.labels(outcome)
        self.prompt_tokens = Counter("mopt_prompt_tokens", "Prompt tokens prefilled (per choice).",
                                     registry=self.registry)
        self.generation_tokens = Counter("mopt_generation_tokens", "Tokens generated.", registry=self.registry)
        self.ttft = Histogram("mopt_time_to_first_token_seconds", "From arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("mopt_time_per_output_token_seconds",
                              "Per request: (last token time - first token time) / (tokens - 1).",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def finished(self, streams: list[RequestStream], outcome: str) -> None:
        """A generation request ended: its outcome, and tokens and latencies of its choices."""
        self.count(outcome)
        for s in streams:
            self.prompt_tokens.inc(len(s.prompt_token_ids))
            self.generation_tokens.inc(s.num_output_tokens)
            if s.first_token_time is not None:
                self.ttft.observe(s.first_token_time - s.arrival_time)
                if s.finish_time is not None and s.num_output_tokens > 1:
                    self.tpot.observe((s.finish_time - s.first_token_time) / (s.num_output_tokens - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
