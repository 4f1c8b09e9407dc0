"""Prometheus metrics, in a registry per app so that several apps (in tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.batcher import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REJECTION_REASONS = (
    "unauthorized", "invalid", "bad_image", "unsupported_media_type", "too_large",
    "queue_full", "not_ready", "draining", "deadline", "disconnected",
)  # fmt: skip


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself."""
    powers = [2**i for i in range(max_batch_size.bit_length()) if 2**i < max_batch_size]
    return (*powers, float(max_batch_size))


class Metrics:
    """The service's collectors; ``render()`` gives the Prometheus text exposition."""

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "yolov1_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "yolov1_request_latency_seconds", "HTTP request latency by route.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "yolov1_queue_wait_seconds", "Time an image waited for its batch.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference = Histogram(
            "yolov1_inference_seconds", "Run time of one batch (network and NMS).",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "yolov1_batch_size", "Images per batch run.",
            buckets=batch_size_buckets(max_batch_size), registry=r,
        )  # fmt: skip
        self.batch_failures = Counter(
            "yolov1_batch_failures", "Batches whose run raised.", registry=r
        )
        self.queue_depth = Gauge(
            "yolov1_queue_depth", "Images queued and not yet in a running batch.", registry=r
        )
        self.rejections = Counter(
            "yolov1_rejections", "Requests refused, by reason.", ["reason"], registry=r
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)  # export zeros, so rates work from the start

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.inference.observe(stats.run_s)
        for waited in stats.queue_s:
            self.queue_wait.observe(waited)
        if stats.failed:
            self.batch_failures.inc()

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
