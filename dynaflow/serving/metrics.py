"""The server's Prometheus metrics, in a registry of their own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dynaflow_requests",
            "Requests by outcome (ok, shed, rejected, invalid, error)",
            ["status"],
            registry=r,
        )
        self.latency = Histogram(
            "dynaflow_request_latency_seconds",
            "Server-side latency: queue + compute",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.slo_misses = Counter(
            "dynaflow_slo_misses", "Answered after the SLO, shed or rejected", registry=r
        )
        self.subnet = Counter(
            "dynaflow_subnet_requests", "Requests served by each sub-network", ["subnet"], registry=r
        )
        self.batch_size = Histogram(
            "dynaflow_batch_size",
            "Requests per dispatched batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.dispatch_overhead = Histogram(
            "dynaflow_dispatch_overhead_seconds", "Scheduler time per dispatch (shedding + policy decision)",
            buckets=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3), registry=r,
        )  # fmt: skip
        self.queue = Gauge("dynaflow_queue_length", "Requests waiting", registry=r)
