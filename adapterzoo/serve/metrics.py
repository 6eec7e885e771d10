"""Prometheus metrics of a server: requests, tokens, queue depth, adapter hits and misses, swaps.

Every server has its own `CollectorRegistry` (so tests can run several in one process); `/metrics`
renders it in the text exposition format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Completion

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SWAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "adapterzoo_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.completions = Counter(
            "adapterzoo_completions", "Finished generation requests by finish reason", ["finish_reason"], registry=r
        )
        self.tokens = Counter(
            "adapterzoo_tokens", "Tokens processed: prompt (prefilled) and completion (generated)", ["kind"], registry=r
        )
        self.rejected_requests = Counter(
            "adapterzoo_rejected_requests", "Requests refused before running, by reason", ["reason"], registry=r
        )
        self.queue = Gauge("adapterzoo_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.batch = Gauge("adapterzoo_running_requests", "Requests in the running batch", registry=r)
        self.steps = Counter("adapterzoo_decode_steps", "Decode steps run", registry=r)
        self.batch_size = Histogram(
            "adapterzoo_decode_batch_size",
            "Rows per decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.ttft = Histogram(
            "adapterzoo_time_to_first_token_seconds",
            "Time from submit to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "adapterzoo_request_latency_seconds",
            "Time from submit to the last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.hits = Counter(
            "adapterzoo_adapter_hits", "Requests whose adapter was already in a device slot", ["adapter"], registry=r
        )
        self.misses = Counter(
            "adapterzoo_adapter_misses",
            "Requests whose adapter was not in a device slot, by the tier it was found in",
            ["adapter", "tier"],
            registry=r,
        )
        self.swaps = Histogram(
            "adapterzoo_adapter_swap_seconds",
            "Time to bring an adapter up one or more tiers: into a device slot (tier=host), "
            "from disk (tier=disk) or from the registry (tier=registry)",
            ["tier"],
            buckets=SWAP_BUCKETS,
            registry=r,
        )
        self.load_failures = Counter(
            "adapterzoo_adapter_load_failures", "Adapter loads that failed", ["adapter"], registry=r
        )
        self.evictions = Counter(
            "adapterzoo_adapter_evictions", "Adapters moved out of host memory (to disk)", registry=r
        )
        self.resident = Gauge("adapterzoo_adapters_resident", "Adapters held per tier", ["tier"], registry=r)
        self.stuck_requests = Gauge(
            "adapterzoo_stuck_requests", "Running requests with no progress for the watchdog's limit", registry=r
        )

    # -- engine hooks
    def queue_depth(self, n: int) -> None:
        self.queue.set(n)

    def running(self, n: int) -> None:
        self.batch.set(n)

    def stuck(self, n: int) -> None:
        self.stuck_requests.set(n)

    def rejected(self, reason: str) -> None:
        self.rejected_requests.labels(reason).inc()

    def prefill(self, tokens: int) -> None:
        self.tokens.labels("prompt").inc(tokens)

    def decode_step(self, rows: int) -> None:
        self.steps.inc()
        self.batch_size.observe(rows)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, done: Completion) -> None:
        self.completions.labels(done.finish_reason).inc()
        self.tokens.labels("completion").inc(done.completion_tokens)
        self.latency.observe(done.latency)

    # -- router hooks
    def lookup(self, adapter: str, tier: str) -> None:
        if tier == "device":
            self.hits.labels(adapter).inc()
        else:
            self.misses.labels(adapter, tier).inc()

    def swap(self, tier: str, seconds: float) -> None:
        self.swaps.labels(tier).observe(seconds)

    def load_failed(self, adapter: str) -> None:
        self.load_failures.labels(adapter).inc()

    def evicted(self) -> None:
        self.evictions.inc()

    def track_residency(self, counts: Callable[[], dict[str, int]]) -> None:
        """Report `counts()` (tier -> adapters) at every scrape."""
        for tier in ("device", "host", "disk"):
            self.resident.labels(tier).set_function(lambda tier=tier: counts().get(tier, 0))

    # -- HTTP
    def http(self, route: str, status: int) -> None:
        self.http_requests.labels(route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
