"""Prometheus metrics: HTTP requests, lanes, batches, commits, transfers by result,
webhook deliveries by outcome.

With several gateway processes, prometheus-client's multiprocess mode is used
(PROMETHEUS_MULTIPROC_DIR, set by `txengine serve` before any worker starts), so that
/metrics on any worker shows the sum over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

from engine import EngineError, Result

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS_S: Final = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
_BATCH_SIZE_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

REQUESTS: Final = Counter(
    "txengine_http_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
REQUEST_LATENCY: Final = Histogram(
    "txengine_http_request_duration_seconds",
    "Time from request received to response ready",
    ["route"],
    buckets=_LATENCY_BUCKETS_S,
)
LANE_QUEUE_DEPTH: Final = Gauge(
    "txengine_lane_queue_depth",
    "Requests waiting in the lanes of a process",
    multiprocess_mode="livesum",
)
BATCH_SIZE: Final = Histogram(
    "txengine_batch_size", "Requests applied per database transaction", buckets=_BATCH_SIZE_BUCKETS
)
COMMIT_LATENCY: Final = Histogram(
    "txengine_batch_commit_duration_seconds",
    "Time to apply and commit one batch, retries included",
    buckets=_LATENCY_BUCKETS_S,
)
AUTH_REFUSALS: Final = Counter(
    "txengine_auth_refusals_total",
    "Requests to /v1 refused before they ran: failed authentication or rate limit",
    ["code"],
)
RESULTS: Final = Counter(
    "txengine_command_results_total", "Engine commands by kind of result", ["result"]
)
BATCH_FAILURES: Final = Counter(
    "txengine_batch_failures_total", "Batches that failed as a whole", ["error"]
)


# labels() builds a key and takes a lock on every call; a request's children are looked up
# once per (route, method, status) and kept here. Bounded: routes and methods are the
# application's own (unmatched paths share one route label), statuses are few.
_REQUEST_CHILDREN: Final[dict[tuple[str, str, int], tuple[Counter, Histogram]]] = {}
_REQUEST_CHILDREN_MAX: Final = 10_000


def observe_request(route: str, method: str, status: int, elapsed_s: float) -> None:
    key = (route, method, status)
    children = _REQUEST_CHILDREN.get(key)
    if children is None:
        children = (REQUESTS.labels(route, method, str(status)), REQUEST_LATENCY.labels(route))
        if len(_REQUEST_CHILDREN) < _REQUEST_CHILDREN_MAX:
            _REQUEST_CHILDREN[key] = children
    children[0].inc()
    children[1].observe(elapsed_s)


class EngineMetrics:
    """The engine's Observer: counts what the lanes report."""

    def batch_committed(self, *, size: int, commit_s: float, results: Sequence[Result]) -> None:
        BATCH_SIZE.observe(size)
        COMMIT_LATENCY.observe(commit_s)
        counts: dict[str, int] = {}
        for result in results:
            code = "replayed" if result.replayed else result.code.value
            counts[code] = counts.get(code, 0) + 1
        for code, count in counts.items():
            RESULTS.labels(code).inc(count)

    def batch_failed(self, *, size: int, error: EngineError) -> None:
        BATCH_FAILURES.labels(type(error).__name__).inc()


WEBHOOK_ATTEMPTS: Final = Counter(
    "txengine_webhook_attempts_total",
    "Webhook delivery attempts by outcome: delivered, retrying, dead, superseded",
    ["outcome"],
)
WEBHOOK_ATTEMPT_LATENCY: Final = Histogram(
    "txengine_webhook_attempt_duration_seconds",
    "Time to send one webhook and record its outcome",
    buckets=(*_LATENCY_BUCKETS_S, 10.0, 30.0),
)


class WebhookMetrics:
    """The webhook dispatcher's observer (engine.products.dispatcher.DeliveryObserver)."""

    def attempted(self, *, outcome: str, duration_s: float) -> None:
        WEBHOOK_ATTEMPTS.labels(outcome).inc()
        WEBHOOK_ATTEMPT_LATENCY.observe(duration_s)


def set_lane_depth(depth_total: int) -> None:
    LANE_QUEUE_DEPTH.set(depth_total)


def exposition() -> tuple[bytes, str]:
    """The text to answer /metrics with, and its content type."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        prometheus_multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
