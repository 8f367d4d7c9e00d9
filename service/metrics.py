"""Prometheus metrics. One registry per app, so several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request counts and latencies per route, queue wait, batch sizes, cache hits."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "protopnet_requests_total",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "protopnet_request_seconds",
            "HTTP request latency by route template and method",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "protopnet_queue_wait_seconds",
            "Time an image waited in a model's batch queue",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "protopnet_batch_size",
            "Images per forward pass",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.forward = Histogram(
            "protopnet_forward_seconds",
            "Duration of one batched forward pass",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "protopnet_queue_depth", "Images waiting per model", ["model"], registry=r
        )
        self.cache_hits = Counter(
            "protopnet_cache_hits_total", "Explanation cache hits by layer", ["layer"], registry=r
        )
        self.cache_misses = Counter(
            "protopnet_cache_misses_total", "Explanation cache misses", registry=r
        )
        self.coalesced = Counter(
            "protopnet_coalesced_total",
            "Explanations answered by sharing an identical request's computation in flight",
            registry=r,
        )
        self.redis_up = Gauge(
            "protopnet_redis_up", "1 when Redis answers, 0 when degraded", registry=r
        )
        self.unfamiliar = Counter(
            "protopnet_unfamiliar_answers_total",
            "Images answered as unfamiliar: below the familiarity threshold (a cached "
            "repeat of an explanation is not counted again)",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "protopnet_rejected_total", "Requests refused because a queue was full", registry=r
        )
