"""Searches by image, micro-batched: decode each upload, embed the whole batch in one onnxruntime run, then ask an
index reader (a replica, or the owner) for every search's top-N at once.

A query process is a kombu consumer of the `query` queue, not a Celery worker: it takes the searches queued behind
the first (up to LOOKALIKE_QUERY_BATCH), waits at most LOOKALIKE_QUERY_WAIT_MS (0: not at all) for more, and
acknowledges them when their batch is done, so that a process killed in the middle of one gives its searches back
to another (it lists them as held, like every worker, for `worker.recovery`). celery-batches would form the
batches inside a Celery worker, but it requires Celery < 5.7 and does not tell the worker which messages it holds.
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
from common.model import EmbeddingModel
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
QUEUED_SECONDS = 0.005  # how long a search Redis listed as queued may take to arrive (another process may take it)


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
class SeveralPhotos:
    """A search of several photos: one job, whose result is one answer for each photo, in order."""

    job_id: str
    answers: list[dict[str, Any] | None]  # hits, or the photo's own error; None until answered

    def close(self) -> None:
        """Finish the job once every photo is answered: done, partial (some photos failed) or failed (all did)."""
        if any(answer is None for answer in self.answers):
            return
        failures = [answer["error"] for answer in self.answers if answer and "error" in answer]
        if len(failures) == len(self.answers):
            runtime.jobs().fail(self.job_id, failures[0])
        else:
            runtime.jobs().finish(self.job_id, {"results": self.answers}, partial=bool(failures))


@dataclass
class Search:
    """A search of one photo, or a recommendation from examples (some of them photos, maybe none)."""

    job_id: str
    k: int
    filters: dict[str, str]
    min_seq: int
    pixels: list[np.ndarray]  # the photos to embed: a search's one, a recommendation's example photos
    crop: Crop | None = None  # the part of the upload searched, None for the whole of it
    several: SeveralPhotos | None = None  # the search this photo is one of, and its place there
    place: int = 0
    examples: dict[str, Any] | None = None  # a recommendation's: {positive, negative: [{id} or {photo}], strategy}

    def query(self, vectors: np.ndarray) -> dict[str, Any]:
        """What an index reader is asked, given the vectors of this search's photos."""
        asked: dict[str, Any] = {"k": self.k, "filters": self.filters}
        if self.examples is None:
            return {**asked, "vector": encode_vector(vectors[0])}

        def side(examples: list[dict[str, Any]]) -> list[dict[str, str]]:
            return [{"vector": encode_vector(vectors[example["photo"]])} if "photo" in example else
                    {"id": str(example["id"])} for example in examples]  # fmt: skip

        positive, negative = side(self.examples["positive"]), side(self.examples["negative"])
        return {**asked, "positive": positive, "negative": negative, "strategy": self.examples["strategy"]}

    def finish(self, result: dict[str, Any]) -> None:
        if self.several is None:
            runtime.jobs().finish(self.job_id, result)
            return
        self.several.answers[self.place] = result
        self.several.close()

    def fail(self, error: dict[str, str]) -> None:
        if self.several is None:
            runtime.jobs().fail(self.job_id, error)
            return
        self.several.answers[self.place] = {"error": error}
        self.several.close()


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
        """Wait for a first search, then take the searches queued behind it (up to a batch), and wait at most
        LOOKALIKE_QUERY_WAIT_MS for more: a lone search goes at once, a busy queue fills the batch by itself."""
        while not self.held and not self.stopping.is_set():
            try:
                connection.drain_events(timeout=IDLE_SECONDS)
            except TimeoutError:
                return
        deadline = time.monotonic() + self.settings.query_wait_ms / 1000
        queued = runtime.state().redis.llen(QUEUE) if self.held else 0
        while len(self.held) < self.settings.query_batch and not self.stopping.is_set():
            waiting_for_queued = queued > 0
            wait = max(deadline - time.monotonic(), QUEUED_SECONDS if waiting_for_queued else 0)
            if wait <= 0:
                return
            try:
                connection.drain_events(timeout=wait)
                queued -= 1
            except TimeoutError:
                if not waiting_for_queued or time.monotonic() >= deadline:
                    return
                queued = 0  # another query process took them

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
    """Each message: (job id, image as base64 or a list of them, k, filters, min_seq, crop or None, a
    recommendation's examples or None). Every photo of every search is embedded together, and asked for in one read
    per sequence number they wait for (nearly always one: 0, any reader's present state)."""
    settings = runtime.settings()
    model = runtime.embedding_model(settings.query_threads)
    searches = [search for message in messages for search in _started(message, model.contract.size)]
    if not searches:
        return
    try:
        vectors = _embedded(model, searches)
    except Exception as error:  # a search job must never stay "running"
        log.exception("a batch of %d searches could not be embedded", len(searches))
        _fail(searches, item_error(ErrorCode.SEARCH_FAILED, f"the search failed: {error}"))
        return
    waits: dict[int, list[tuple[Search, np.ndarray]]] = {}
    for search, rows in zip(searches, vectors, strict=True):
        waits.setdefault(search.min_seq, []).append((search, rows))
    for min_seq, group in waits.items():
        # A search that waits for a write is answered within the web's patience, or told `behind`.
        _answer_group(model.sha256, group, min_seq, settings.call_timeout if min_seq else settings.search_timeout)


def _embedded(model: EmbeddingModel, searches: list[Search]) -> list[np.ndarray]:
    """Each search's photos' vectors (a row each), from onnxruntime runs of at most LOOKALIKE_QUERY_BATCH photos (a
    search of several photos counts each)."""
    photos = [pixels for search in searches for pixels in search.pixels]
    run = runtime.settings().query_batch
    vectors = [model.embed(np.stack(photos[first : first + run])) for first in range(0, len(photos), run)]
    ends = np.cumsum([len(search.pixels) for search in searches])
    return np.split(np.concatenate(vectors) if vectors else np.empty((0, 0), dtype=np.float32), ends[:-1])


def _started(message: tuple[Any, ...], size: tuple[int, int]) -> list[Search]:
    """The searches a message asks for (one per photo; a recommendation is one), decoded; none when there is nothing
    to do (its job failed already, or every photo of it did)."""
    jobs = runtime.jobs()
    job_id, images, k, filters, *rest = message
    min_seq = rest[0] if rest else 0  # messages of older web processes end earlier
    box = rest[1] if len(rest) > 1 else None
    examples = rest[2] if len(rest) > 2 else None
    if not jobs.start(job_id):
        return []  # timed out while it waited, or answered already (a message given back twice)
    try:
        crop = Crop(*map(int, box)) if box else None
        if examples is not None:  # a recommendation: every example photo must be read
            pixels = [_decoded(image, size, None) for image in images]
            return [Search(job_id, k, filters or {}, min_seq, pixels, examples=examples)]
    except ImageError as error:
        jobs.fail(job_id, error.as_dict())
        return []
    except (ValueError, TypeError) as error:  # not base64, a crop of other than four numbers: no web made it
        jobs.fail(job_id, item_error(ErrorCode.SEARCH_FAILED, f"the search message is damaged: {error}"))
        return []
    several = SeveralPhotos(job_id, [None] * len(images)) if isinstance(images, list) else None
    if several and not images:
        jobs.fail(job_id, item_error(ErrorCode.SEARCH_FAILED, "the search message is damaged: it has no photo"))
        return []
    searches = []
    for place, image in enumerate(images if several else [images]):
        search = Search(job_id, k, filters or {}, min_seq, [], crop, several, place)
        try:
            search.pixels = [_decoded(image, size, crop)]
        except ImageError as error:
            search.fail(error.as_dict())
            continue
        except (ValueError, TypeError) as error:  # not base64: no web made it
            search.fail(item_error(ErrorCode.SEARCH_FAILED, f"the search message is damaged: {error}"))
            continue
        searches.append(search)
    return searches


def _decoded(image: str, size: tuple[int, int], crop: Crop | None) -> np.ndarray:
    settings = runtime.settings()
    data = check_size(base64.b64decode(image, validate=True), settings.max_upload)
    return decode_image(data, size, settings.resize, settings.max_search_pixels, crop)


def _answer_group(model_sha256: str, group: list[tuple[Search, np.ndarray]], min_seq: int, timeout: float) -> None:
    jobs, settings = runtime.jobs(), runtime.settings()
    searches = [search for search, _ in group]
    queries = [search.query(vectors) for search, vectors in group]
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
            search.fail(hits["error"])
        else:
            crop = {"crop": search.crop.as_dict()} if search.crop else {}
            search.finish({"hits": [compact_hit(hit) for hit in hits], **(verdict or {}), **crop})


def _embedded_again(
    model_sha256: str, group: list[tuple[Search, np.ndarray]]
) -> tuple[str, list[tuple[Search, np.ndarray]]] | None:
    """The searches embedded with the serving index's model, when it is another than `model_sha256`; else None."""
    model = runtime.embedding_model(runtime.settings().query_threads)
    if model.sha256 == model_sha256:
        return None
    searches = [search for search, _ in group]
    try:
        vectors = _embedded(model, searches)
    except Exception:  # decoded for the old model's input size: such a search fails with the mismatch it met
        log.exception("a batch of %d searches could not be embedded again with %s", len(group), model.path.name)
        return None
    return model.sha256, list(zip(searches, vectors, strict=True))


def _fail(searches: list[Search], error: dict[str, str]) -> None:
    for search in searches:
        search.fail(error)
