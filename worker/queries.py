"""Searches by image, micro-batched: decode each upload, embed the whole batch in one onnxruntime run, then ask an
index reader (a replica, or the owner) for every search's top-N at once.

A query process is a kombu consumer of the `query` queue, not a Celery worker: it takes up to LOOKALIKE_QUERY_BATCH
waiting searches, waiting at most LOOKALIKE_QUERY_WAIT_MS for more after the first, and acknowledges them when
their batch is done, so that a process killed in the middle of one gives its searches back to another (it lists
them as held, like every worker, for `worker.recovery`). celery-batches would form the batches inside a Celery
worker, but it requires Celery < 5.7 and does not tell the worker which messages it holds.
"""

from __future__ import annotations

import base64
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import numpy as np
import redis
from celery import Celery, current_app
from kombu import Connection, Consumer, Message

from common.errors import ErrorCode
from common.images import Crop, ImageError, check_size, decode_image
from common.settings import Settings
from common.vectors import encode_vector
from protocol.jobs import compact_hit, item_error
from protocol.queues import Queue, Task
from protocol.readers import NoReaderAnswered, ask_reader
from worker import runtime

log = logging.getLogger(__name__)

QUEUE, TASK = Queue.QUERY, Task.SEARCH_IMAGE  # what a query process consumes: that queue, that task only
RECONNECT_SECONDS = 1.0
IDLE_SECONDS = 1.0  # how long the consumer waits for a first search before it looks up again (to stop, say)


@dataclass
class BatchFigures:
    """How full the batches are: what a query process's heartbeat reports (and bench/search_scaling.py reads)."""

    batches: int = 0
    searches: int = 0
    largest: int = 0

    def add(self, size: int) -> None:
        self.batches, self.searches, self.largest = self.batches + 1, self.searches + size, max(self.largest, size)

    def as_dict(self) -> dict[str, int]:
        return {"batches": self.batches, "searches": self.searches, "largest_batch": self.largest}


@dataclass
class Search:
    job_id: str
    k: int
    filters: dict[str, str]
    min_seq: int
    pixels: np.ndarray
    crop: Crop | None = None  # the part of the upload searched, None for the whole of it


@dataclass
class QueryConsumer:
    app: Celery
    settings: Settings
    figures: BatchFigures = field(default_factory=BatchFigures)
    held: list[Message] = field(default_factory=list)  # taken, not acknowledged yet
    stopping: threading.Event = field(default_factory=threading.Event)

    def held_ids(self) -> list[str]:
        return sorted(str(message.headers.get("id")) for message in list(self.held))

    def run(self) -> None:
        """Take and answer searches until SIGTERM or SIGINT; a lost connection is made again."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        while not self.stopping.is_set():
            connection = self.app.connection_for_read()
            try:
                with connection:
                    self._consume(connection)
            except (OSError, *connection.connection_errors, *connection.channel_errors) as error:
                log.warning("query process: the broker can't be reached (%s); trying again", error)
                self.held.clear()  # their deliveries went with the connection; Redis gives them back
                time.sleep(RECONNECT_SECONDS)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def _consume(self, connection: Connection) -> None:
        queue = self.app.amqp.queues[QUEUE]
        prefetch = 2 * self.settings.query_batch  # the batch being answered, and the next one forming
        with Consumer(connection, queues=[queue], callbacks=[self._take], accept=["json"], prefetch_count=prefetch):
            while not self.stopping.is_set():
                self._gather(connection)
                if self.held:
                    self._answer(self.held[: self.settings.query_batch])

    def _take(self, body: Any, message: Message) -> None:
        self.held.append(message)

    def _gather(self, connection: Connection) -> None:
        """Wait for a first search, then for more until the batch is full or the wait is over."""
        deadline = None
        while len(self.held) < self.settings.query_batch and not self.stopping.is_set():
            if self.held and deadline is None:
                deadline = time.monotonic() + self.settings.query_wait_ms / 1000
            wait = IDLE_SECONDS if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return
            try:
                connection.drain_events(timeout=wait)
            except TimeoutError:
                if deadline is None:
                    return

    def _answer(self, messages: list[Message]) -> None:
        """Answer a batch, then acknowledge it; a message that is not a search is dropped with a log line."""
        searches = []
        for message in messages:
            try:
                if not _expired(message):
                    searches.append(_arguments(message))
            except (ValueError, TypeError, KeyError) as error:
                log.error("query process: dropped a message that is not a search it can read: %s", error)
        give_back = False
        try:
            if searches:
                self.figures.add(len(searches))
                search_batch(searches)
        except redis.RedisError as error:  # the job records can't be written now: another process answers later
            log.warning(
                "query process: Redis failed in a batch of %d searches; giving it back: %s", len(searches), error
            )
            give_back = True
        except Exception:  # search_batch fails its own jobs; nothing a batch does may stop the consumer
            log.exception("query process: a batch of %d searches failed", len(searches))
        finally:
            for message in messages:
                if give_back:
                    message.requeue()
                else:
                    message.ack()
                self.held.remove(message)


def _arguments(message: Message) -> tuple[Any, ...]:
    if message.headers.get("task") != TASK:
        raise ValueError(f"the query queue carries only {TASK}, not {message.headers.get('task')}")
    args, _kwargs, _embed = message.decode()
    return tuple(args)


def _expired(message: Message) -> bool:
    """A search whose shopper has been told it timed out: its message must not run for no one."""
    expires = message.headers.get("expires")
    return bool(expires) and datetime.fromisoformat(expires) < datetime.now(UTC)


def search_batch(messages: list[tuple[Any, ...]]) -> None:
    """Each message: (job id, image as base64, k, filters, min_seq, crop or None). The searches are embedded
    together and asked for in one read per sequence number they wait for (nearly always one: 0, any reader's present
    state)."""
    settings = runtime.settings()
    model = runtime.embedding_model(settings.query_threads)
    searches = [search for message in messages if (search := _started(message, model.contract.size))]
    if not searches:
        return
    try:
        vectors = model.embed(np.stack([search.pixels for search in searches]))
    except Exception as error:  # a search job must never stay "running"
        log.exception("a batch of %d searches could not be embedded", len(searches))
        _fail(searches, item_error(ErrorCode.SEARCH_FAILED, f"the search failed: {error}"))
        return
    waits: dict[int, list[tuple[Search, np.ndarray]]] = {}
    for search, vector in zip(searches, vectors, strict=True):
        waits.setdefault(search.min_seq, []).append((search, vector))
    for min_seq, group in waits.items():
        # A search that waits for a write is answered within the web's patience, or told `behind`.
        _answer_group(model.sha256, group, min_seq, settings.call_timeout if min_seq else settings.search_timeout)


def _started(message: tuple[Any, ...], size: tuple[int, int]) -> Search | None:
    """The search a message asks for, decoded; None when there is nothing to do (or its job failed already)."""
    jobs, settings = runtime.jobs(), runtime.settings()
    job_id, image, k, filters, *rest = message
    min_seq = rest[0] if rest else 0  # messages of older web processes end earlier
    box = rest[1] if len(rest) > 1 else None
    if not jobs.start(job_id):
        return None  # timed out while it waited, or answered already (a message given back twice)
    try:
        crop = Crop(*map(int, box)) if box else None
        data = check_size(base64.b64decode(image, validate=True), settings.max_upload)
        pixels = decode_image(data, size, settings.resize, settings.max_search_pixels, crop)
    except ImageError as error:
        jobs.fail(job_id, error.as_dict())
        return None
    except (ValueError, TypeError) as error:  # not base64, or a crop of other than four numbers: no web made it
        jobs.fail(job_id, item_error(ErrorCode.SEARCH_FAILED, f"the search message is damaged: {error}"))
        return None
    return Search(job_id, k, filters or {}, min_seq, pixels, crop)


def _answer_group(model_sha256: str, group: list[tuple[Search, np.ndarray]], min_seq: int, timeout: float) -> None:
    jobs, settings = runtime.jobs(), runtime.settings()
    searches = [search for search, _ in group]
    queries = [{"vector": encode_vector(vector), "k": search.k, "filters": search.filters} for search, vector in group]
    try:
        answer = ask_reader(current_app, jobs.redis, Task.NEAREST, [model_sha256, settings.resize, queries, min_seq],
                            timeout, settings.max_lag, settings.read_timeout)  # fmt: skip
    except NoReaderAnswered as error:
        _fail(searches, item_error(ErrorCode.TIMED_OUT, f"no index reader answered: {error}"))
        return
    if "error" in answer:
        again = _embedded_again(model_sha256, group) if answer["error"]["code"] == ErrorCode.MODEL_MISMATCH else None
        if again is not None:  # the index switched to another model while these were embedded
            _answer_group(*again, min_seq, timeout)
            return
        _fail(searches, answer["error"])
        return
    verdicts = answer.get("verdicts") or [None] * len(searches)  # close_match and threshold, when calibrated
    for search, hits, verdict in zip(searches, answer["answers"], verdicts, strict=True):
        if isinstance(hits, dict):  # this search was refused (a filter naming no field of the catalogue)
            jobs.fail(search.job_id, hits["error"])
        else:
            crop = {"crop": search.crop.as_dict()} if search.crop else {}
            jobs.finish(search.job_id, {"hits": [compact_hit(hit) for hit in hits], **(verdict or {}), **crop})


def _embedded_again(
    model_sha256: str, group: list[tuple[Search, np.ndarray]]
) -> tuple[str, list[tuple[Search, np.ndarray]]] | None:
    """The searches embedded with the serving index's model, when it is another than `model_sha256`; else None."""
    model = runtime.embedding_model(runtime.settings().query_threads)
    if model.sha256 == model_sha256:
        return None
    try:
        vectors = model.embed(np.stack([search.pixels for search, _ in group]))
    except Exception:  # decoded for the old model's input size: such a search fails with the mismatch it met
        log.exception("a batch of %d searches could not be embedded again with %s", len(group), model.path.name)
        return None
    return model.sha256, [(search, vector) for (search, _), vector in zip(group, vectors, strict=True)]


def _fail(searches: list[Search], error: dict[str, str]) -> None:
    jobs = runtime.jobs()
    for search in searches:
        jobs.fail(search.job_id, error)
