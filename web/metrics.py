"""/metrics through prometheus_client: this process's requests, and the jobs, queues and workers kept in Redis."""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from protocol.connection import redis_memory
from protocol.heartbeats import Role, alive
from protocol.jobs import SEARCH_SECONDS_BUCKETS, Jobs
from protocol.queues import queue_depths

REQUEST_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WORKER_ROLES = (Role.INDEX, Role.REPLICA, Role.QUERY, Role.EMBED)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as OTHER


class RequestMetrics:
    """Requests by route, method and status, and their durations, counted in this web process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        disable_created_metrics()  # a `_created` series beside every counter says nothing a scraper needs here
        labels = ("route", "method", "status")
        self.requests = Counter("lookalike_http_requests", "HTTP requests answered", labels, registry=registry)
        self.seconds = Histogram(
            "lookalike_http_request_duration_seconds",
            "time to answer a request",
            ("route",),
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count a request; `route` is its URL rule's template, so the label values are bounded by the routes."""
        self.requests.labels(route, method if method in HTTP_METHODS else "OTHER", str(status)).inc()
        self.seconds.labels(route).observe(seconds)


class SharedFigures(Collector):
    """What every process shares through Redis, read at each scrape; only `lookalike_broker_up 0` while Redis
    can't be reached."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs

    def describe(self) -> list[Metric]:
        return []  # registering must not read Redis: the figures are known only when collected

    def collect(self) -> Iterator[Metric]:
        try:
            figures = list(self._figures())
        except redis.RedisError:
            figures = []
        yield from figures
        yield GaugeMetricFamily("lookalike_broker_up", "whether Redis answered", value=1 if figures else 0)

    def _figures(self) -> Iterator[Metric]:
        counters = self.jobs.metrics()
        created = CounterMetricFamily("lookalike_jobs_created", "jobs created, by kind", labels=["kind"])
        finished = CounterMetricFamily(
            "lookalike_jobs_finished", "jobs finished, by kind and final state", labels=["kind", "state"]
        )
        for name, value in sorted(counters.items()):
            event, _, labels = name.partition(":")
            if event == "created":
                created.add_metric([labels], value)
            elif event == "finished":
                finished.add_metric(labels.split(":"), value)
        yield created
        yield finished
        yield self._search_seconds(counters)
        depths = GaugeMetricFamily("lookalike_queue_depth", "messages waiting in each queue", labels=["queue"])
        for queue, depth in queue_depths(self.jobs.redis).items():
            depths.add_metric([queue], depth)
        yield depths
        beats = {role: alive(self.jobs.redis, role) for role in WORKER_ROLES}
        workers = GaugeMetricFamily(
            "lookalike_workers_alive", "worker processes that reported in lately, by role", labels=["role"]
        )
        for role, alive_now in beats.items():
            workers.add_metric([role], len(alive_now))
        yield workers
        owners = beats[Role.INDEX]
        items = owners[0].get("items", 0) if owners else 0
        yield GaugeMetricFamily(
            "lookalike_index_items", "items in the index (from the index worker's heartbeat)", value=items
        )
        memory = redis_memory(self.jobs.redis)
        yield GaugeMetricFamily("lookalike_redis_memory_used_bytes", "memory Redis uses", value=memory["used_bytes"])
        yield GaugeMetricFamily(
            "lookalike_redis_memory_max_bytes", "Redis's maxmemory (0: no cap)", value=memory["max_bytes"]
        )
        yield GaugeMetricFamily(
            "lookalike_live_searches", "search records kept now", value=self.jobs.live_searches()[0]
        )
        yield from _replica_lag(beats[Role.REPLICA])
        yield from _query_batches(beats[Role.QUERY])

    @staticmethod
    def _search_seconds(counters: dict[str, float]) -> HistogramMetricFamily:
        """Search durations from the per-bucket counts the workers keep in Redis (see `protocol.jobs`)."""
        cumulative, buckets = 0.0, []
        for bound in SEARCH_SECONDS_BUCKETS:
            cumulative += counters.get(f"search_seconds:{bound}", 0)
            buckets.append((floatToGoString(bound), cumulative))
        histogram = HistogramMetricFamily("lookalike_search_duration_seconds", "search jobs, from queued to finished")
        histogram.add_metric([], buckets, sum_value=counters.get("search_seconds:sum", 0.0))
        return histogram


def _name(beat: dict) -> str:
    return f"{beat['host']}:{beat['pid']}"


def _replica_lag(replicas: list[dict]) -> Iterator[Metric]:
    """How far each live replica is behind the owner, in changes and in seconds."""
    changes = GaugeMetricFamily(
        "lookalike_replica_lag_changes", "changes a replica has yet to apply", labels=["replica"]
    )
    seconds = GaugeMetricFamily(
        "lookalike_replica_lag_seconds",
        "how long the oldest change a replica has yet to apply waits",
        labels=["replica"],
    )
    for beat in replicas:
        changes.add_metric([_name(beat)], beat.get("lag_changes", 0))
        seconds.add_metric([_name(beat)], beat.get("lag_seconds", 0.0))
    yield changes
    yield seconds


def _query_batches(queriers: list[dict]) -> Iterator[Metric]:
    """The micro-batches of each live query process: how many, and how many searches they held."""
    batches = CounterMetricFamily("lookalike_query_batches", "batches a query process embedded", labels=["worker"])
    searches = CounterMetricFamily(
        "lookalike_query_searches", "searches a query process embedded in its batches", labels=["worker"]
    )
    for beat in queriers:
        batches.add_metric([_name(beat)], beat.get("batches", 0))
        searches.add_metric([_name(beat)], beat.get("searches", 0))
    yield batches
    yield searches
