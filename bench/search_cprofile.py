"""CPU by function of lookalike's web and query process for one search with `wait=10`, by cProfile in this process
(part of `bench/search_cost.py --profile`; nothing in the product is changed for it).

- The web: lookalike's Flask app made here (`web.app.create_app`, the stack's settings) and fed the same uploads
  with wait=10 through Flask's test client, one at a time, answered by the stack's workers; its CPU a search is
  measured without the profiler first, then profiled (CPU time).
- The query process: the stack's is stopped and `worker.queries.QueryConsumer` takes its place in a thread of this
  process (with a heartbeat of its own, so that the web accepts searches), while searches come through the real web
  one at a time with wait=10; its thread's CPU a search is measured without the profiler first, then profiled
  (thread CPU time: onnxruntime's own threads are not in it, only the share of the embedding run on this thread).
"""

from __future__ import annotations

import cProfile
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from searchers import WAIT_SECONDS
from shoppers import K, multipart

from common.settings import Settings
from lookalike.stack import Stack

SPREAD = 97  # photos apart from one search to the next, as the shoppers take them
WARM_UP = 10  # requests before the measured ones
# (label, file ending, function names): the cumulative CPU of each, a search. Indented labels are parts of the
# row above them. A function the code no longer has shows no row.
WEB_FUNCTIONS = [
    ("multipart form parsed (werkzeug `_load_form_data`)", "werkzeug/wrappers/request.py", "_load_form_data"),
    ("busy checks (`Service.refuse_when_busy`)", "web/service.py", "refuse_when_busy"),
    ("live query process and reader (`Service.searchable`)", "web/service.py", "searchable"),
    ("heartbeats read and parsed, all calls (`heartbeats`)", "protocol/heartbeats.py", "heartbeats"),
    ("preview: decode and 320 px JPEG (`thumbnail_jpeg`)", "common/images.py", "thumbnail_jpeg"),
    ("job record (`Jobs.create`)", "protocol/jobs.py", "create"),
    ("message published (celery `send_task`)", "celery/app/base.py", "send_task"),
    ("wait for the job's finish (`Service.wait_for`)", "web/service.py", "wait_for"),
    ("job read, all calls (`Jobs.get`)", "protocol/jobs.py", "get"),
    ("answer with links (`present_job`)", "web/api.py", "present_job"),
    ("  links of the hits (`link`, a route's URL built once per answer)", "web/api.py", "link"),
    ("JSON (`jsonify`)", "flask/json/__init__.py", "jsonify"),
    ("request metrics, headers (`after_request`)", "web/app.py", "finish"),
]
QUERY_FUNCTIONS = [
    ("messages received (kombu `drain_events`, idle waits included)", "kombu/connection.py", "drain_events"),
    ("a batch answered (`QueryConsumer._answer`)", "worker/queries.py", "_answer"),
    ("  job started (`Jobs.start`)", "protocol/jobs.py", "start"),
    ("  decode (`decode_image`)", "common/images.py", "decode_image"),
    ("  the model looked up (`runtime.embedding_model`)", "worker/runtime.py", "embedding_model"),
    ("  embed, this thread's share (`EmbeddingModel.embed`)", "common/model.py", "embed"),
    ("  a reader asked (`ask_reader`)", "protocol/readers.py", "ask_reader"),
    ("    which reader: replicas' heartbeats (`keeping_up`)", "protocol/readers.py", "keeping_up"),
    ("    the replicas asked directly (`ask_replicas`)", "protocol/readers.py", "ask_replicas"),
    ("  hits compacted (`compact_hit`)", "protocol/jobs.py", "compact_hit"),
    ("  job finished (`Jobs.finish`)", "protocol/jobs.py", "finish"),
    ("  messages acknowledged (kombu `Message.ack`)", "kombu/message.py", "ack"),
]
REDIS_ROWS = [
    ("Redis calls (redis-py `execute_command`, `Pipeline.execute`)", "redis/client.py", "execute_command|execute"),
    ("Redis round trips (redis-py `send_packed_command`)", "redis/connection.py", "send_packed_command"),
]


class Metered:
    """A WSGI app's CPU time, its answer's body included, and optionally a cProfile of it."""

    def __init__(self, app: Callable, profiler: cProfile.Profile | None = None) -> None:
        self.app, self.profiler, self.cpu, self.requests = app, profiler, 0.0, 0

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        if self.profiler:
            self.profiler.enable()
        started = time.process_time()
        iterable = self.app(environ, start_response)
        try:
            return list(iterable)
        finally:
            if hasattr(iterable, "close"):
                iterable.close()
            self.cpu += time.process_time() - started
            self.requests += 1
            if self.profiler:
                self.profiler.disable()


def web_profile(stack: Stack, photos: list[Path], searches: int) -> dict[str, Any]:
    """lookalike's web app in this process: its CPU a search with wait=10, without and with the profiler, and the
    profile."""
    from web.app import create_app

    app = create_app(stack.settings)
    inner = app.wsgi_app
    forms = [multipart(photos[(SPREAD * number) % len(photos)], {"k": str(K), "wait": str(WAIT_SECONDS)})
             for number in range(searches)]  # fmt: skip
    test = app.test_client()
    statuses: Counter[int] = Counter()
    profiler = cProfile.Profile(time.process_time)
    cpu = {}
    for name, meter in (("warm-up", Metered(inner)), ("plain", Metered(inner)), ("profiled", Metered(inner, profiler))):
        app.wsgi_app = meter
        for body, content_type in forms[:WARM_UP] if name == "warm-up" else forms:
            statuses[test.post("/api/search", data=body, content_type=content_type).status_code] += 1
        cpu[name] = meter.cpu / max(1, meter.requests)
    return {"plain": cpu["plain"], "profiled": cpu["profiled"], "statuses": statuses, "profiler": profiler}


class ConsumerHere:
    """worker.queries.QueryConsumer in a thread of this process, optionally profiled (that thread's CPU time)."""

    def __init__(self, settings: Settings, profiled: bool) -> None:
        from protocol.celery_app import create_celery
        from worker.queries import QueryConsumer

        self.app = create_celery(settings)
        self.consumer = QueryConsumer(self.app, settings)
        self.profiler = cProfile.Profile(time.thread_time) if profiled else None
        self.cpu = 0.0
        self.thread = threading.Thread(target=self._serve, name="query-here", daemon=True)

    def _serve(self) -> None:
        self.app.set_current()  # celery's current app is per thread: the query code sends its reads through it
        if self.profiler:
            self.profiler.enable()
        started = time.thread_time()
        try:
            with self.app.connection_for_read() as connection:
                self.consumer._consume(connection)  # run() would install signal handlers: the main thread's
        finally:
            self.cpu = time.thread_time() - started
            if self.profiler:
                self.profiler.disable()

    def __enter__(self) -> ConsumerHere:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.stopping.set()
        self.thread.join(30)


def query_profile(stack: Stack, searching: Callable[[int], int], searches: int) -> dict[str, Any]:
    """The stack's query process stopped, QueryConsumer here instead: its thread's CPU a search, without and with
    the profiler, while `searching(n)` makes n searches (returning how many were answered) through the web."""
    from protocol.heartbeats import Role, start_heartbeat
    from worker import runtime

    # worker.runtime reads its settings from this process's environment, once: the stack's.
    os.environ.update({name: value for name, value in stack.env.items() if name.startswith("LOOKALIKE_")})
    settings = Settings.from_env()
    model = runtime.embedding_model(settings.query_threads)
    current: list[ConsumerHere] = []
    identity = {"provider": model.provider, "model": model.path.name, "model_sha256": model.sha256}
    start_heartbeat(runtime.state().redis, Role.QUERY,
                    lambda: {**identity, **(current[-1].consumer.figures.as_dict() if current else {})})  # fmt: skip
    figures: dict[str, Any] = {}
    passes = (("warm-up", False, WARM_UP), ("plain", False, searches), ("profiled", True, searches))
    for name, profiled, count in passes:
        with ConsumerHere(settings, profiled) as here:
            current.append(here)
            if name == "warm-up":  # the stack's query process stops (SIGTERM: it finishes what it holds)
                stack.kill(next(kind for kind in stack.processes if kind.startswith("query")), signal.SIGTERM)
            answered = searching(count)
        figures[name] = here.cpu / max(1, answered)
        figures["profiler"] = here.profiler
    return figures


def function_costs(profiler: cProfile.Profile, searches: int, functions: list) -> list[tuple[str, float, float]]:
    """(label, calls a search, CPU seconds a search) of each of `functions` the profile has, then Redis's rows."""
    profiler.create_stats()
    entries = profiler.stats  # (file, line, function) -> (primitive calls, calls, own time, cumulative, callers)
    rows = []
    for label, ending, names in [*functions, *REDIS_ROWS]:
        chosen = [(calls, cumulative) for (file, _, function), (_, calls, _, cumulative, _) in entries.items()
                  if file.endswith(ending) and function in names.split("|")]  # fmt: skip
        if chosen:
            rows.append((label, sum(c for c, _ in chosen) / searches, sum(t for _, t in chosen) / searches))
    return rows


def print_functions(title: str, plain: float, profiled: float, rows: list[tuple[str, float, float]]) -> None:
    print(f"\n| {title} ({plain * 1000:.2f} ms a search without the profiler, {profiled * 1000:.2f} with it) | calls "
          "a search | CPU ms a search, profiled | share |")  # fmt: skip
    print("| --- | ---: | ---: | ---: |")
    for label, calls, seconds in rows:
        depth = (len(label) - len(label.lstrip(" "))) // 2
        print(f"| {'&nbsp;&nbsp;' * depth}{label.strip()} | {calls:.1f} | {seconds * 1000:.2f} | "
              f"{seconds / profiled:.0%} |")  # fmt: skip
