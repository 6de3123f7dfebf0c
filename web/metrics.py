"""/metrics in the Prometheus text format: this process's requests, and the jobs, queues and workers in Redis."""

from __future__ import annotations

import math
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator

import redis

from protocol.heartbeats import alive
from protocol.jobs import SEARCH_SECONDS_BUCKETS, Jobs
from protocol.queues import queue_depths

REQUEST_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RequestMetrics:
    """Requests by route, method and status, and their durations, counted in this web process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.buckets: defaultdict[str, list[int]] = defaultdict(lambda: [0] * len(REQUEST_SECONDS_BUCKETS))
        self.sums: Counter[str] = Counter()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[route, method, str(status)] += 1
            index = next(i for i, bound in enumerate(REQUEST_SECONDS_BUCKETS) if seconds <= bound)
            self.buckets[route][index] += 1
            self.sums[route] += seconds

    def lines(self) -> Iterator[str]:
        with self._lock:
            requests, sums = dict(self.requests), dict(self.sums)
            buckets = {route: list(counts) for route, counts in self.buckets.items()}
        yield from _header("lookalike_http_requests_total", "counter", "HTTP requests answered")
        for (route, method, status), count in sorted(requests.items()):
            yield f"lookalike_http_requests_total{_labels(route=route, method=method, status=status)} {count}"
        yield from _header("lookalike_http_request_duration_seconds", "histogram", "time to answer a request")
        for route in sorted(buckets):
            yield from _histogram("lookalike_http_request_duration_seconds", REQUEST_SECONDS_BUCKETS,
                                  buckets[route], sums[route], route=route)  # fmt: skip


def exposition(requests: RequestMetrics, jobs: Jobs) -> str:
    """The whole page; what lives in Redis is left out (and `lookalike_broker_up` is 0) when Redis is down."""
    lines = list(requests.lines())
    try:
        lines += list(_shared_lines(jobs))
        up = 1
    except redis.RedisError:
        up = 0
    lines += [*_header("lookalike_broker_up", "gauge", "whether Redis answered"), f"lookalike_broker_up {up}"]
    return "\n".join(lines) + "\n"


def _shared_lines(jobs: Jobs) -> Iterator[str]:
    counters = jobs.metrics()
    yield from _header("lookalike_jobs_created_total", "counter", "jobs created, by kind")
    for name, value in sorted(counters.items()):
        if name.startswith("created:"):
            yield f"lookalike_jobs_created_total{_labels(kind=name.split(':')[1])} {value:.0f}"
    yield from _header("lookalike_jobs_finished_total", "counter", "jobs finished, by kind and final state")
    for name, value in sorted(counters.items()):
        if name.startswith("finished:"):
            _, kind, state = name.split(":")
            yield f"lookalike_jobs_finished_total{_labels(kind=kind, state=state)} {value:.0f}"
    counts = [int(counters.get(f"search_seconds:{bound}", 0)) for bound in SEARCH_SECONDS_BUCKETS]
    yield from _header("lookalike_search_duration_seconds", "histogram", "search jobs, from queued to finished")
    yield from _histogram("lookalike_search_duration_seconds", SEARCH_SECONDS_BUCKETS, counts,
                          counters.get("search_seconds:sum", 0.0))  # fmt: skip
    yield from _header("lookalike_queue_depth", "gauge", "messages waiting in each queue")
    for queue, depth in queue_depths(jobs.redis).items():
        yield f"lookalike_queue_depth{_labels(queue=queue)} {depth}"
    yield from _header("lookalike_workers_alive", "gauge", "worker processes that reported in lately, by role")
    owners = alive(jobs.redis, "index")
    for role, beats in (("index", owners), ("embed", alive(jobs.redis, "embed"))):
        yield f"lookalike_workers_alive{_labels(role=role)} {len(beats)}"
    yield from _header("lookalike_index_items", "gauge", "items in the index (from the index worker's heartbeat)")
    yield f"lookalike_index_items {owners[0].get('items', 0) if owners else 0}"


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _histogram(name: str, bounds: tuple[float, ...], counts: list[int], total: float, **labels: str) -> Iterator[str]:
    cumulative = 0
    for bound, count in zip(bounds, counts, strict=True):
        cumulative += count
        le = "+Inf" if math.isinf(bound) else f"{bound:g}"
        yield f"{name}_bucket{_labels(**labels, le=le)} {cumulative}"
    yield f"{name}_sum{_labels(**labels)} {total:.6f}"
    yield f"{name}_count{_labels(**labels)} {cumulative}"


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
