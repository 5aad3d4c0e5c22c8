"""Prometheus metrics: the API's own counters, plus the workers' counters and queue depths read from Redis.

Workers are separate processes (often on other machines), so they keep their counters in a Redis
hash (``rib:stats``, :mod:`contract.worker_reports`) and the API exposes them at scrape time; no
per-process registry needs to be merged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()
REQUESTS = Counter("rib_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("rib_http_request_seconds", "HTTP request latency by route", ["route"], registry=REGISTRY)
SUBMITTED = Counter("rib_images_submitted_total", "Images accepted into jobs", ["kind"], registry=REGISTRY)
REJECTED = Counter("rib_requests_rejected_total", "Requests refused before reaching a worker, by HTTP status",
                   ["status"], registry=REGISTRY)


class RedisStatsCollector(Collector):
    """Worker counters from ``rib:stats`` and the length of each broker queue, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, float]], broker: redis.Redis, queues: Sequence[str]) -> None:
        self.stats = stats
        self.broker = broker
        self.queues = list(queues)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        try:
            stats = self.stats()
            lengths = [self.broker.llen(q) for q in self.queues]
        except redis.RedisError:
            return  # /readyz reports Redis; a scrape still returns the API's own metrics
        images = CounterMetricFamily("rib_worker_images", "Images finished by workers", labels=["outcome"])
        for outcome in ("done", "failed", "skipped", "reused"):
            images.add_metric([outcome], stats.get(f"images_{outcome}", 0.0))
        yield images
        yield CounterMetricFamily("rib_worker_image_seconds", "Seconds workers spent on finished images",
                                  value=stats.get("image_seconds_sum", 0.0))
        jobs = CounterMetricFamily("rib_jobs_created", "Jobs created", labels=["kind"])
        for kind in ("upload", "bulk"):
            jobs.add_metric([kind], stats.get(f"jobs_{kind}", 0.0))
        yield jobs
        depth = GaugeMetricFamily("rib_queue_length", "Tasks waiting in each broker queue", labels=["queue"])
        for queue, length in zip(self.queues, lengths, strict=True):
            depth.add_metric([queue], length)
        yield depth
