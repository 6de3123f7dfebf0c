"""An index replica: a read-only copy of the owner's index that follows its changes in sequence order.

It loads the owner's latest snapshot (read-only, from the index folder the owner writes: shared storage when the
replica runs on another machine), then applies the change feed (`worker.feed`) from there, one change after the
other, never one twice. A gap (a trimmed stream, a restart after a long stop) is closed by loading a newer
snapshot, which the replica asks the owner to write when there is none. It never writes anything of the owner's.
It takes reads from the `lookalike:reads` list (`protocol.readers`) while at most LOOKALIKE_MAX_LAG seconds behind.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

from common.errors import ErrorCode
from common.settings import Settings
from protocol import keys
from protocol.heartbeats import Role, alive
from protocol.jobs import item_error
from protocol.queues import Task
from protocol.readers import ANSWER_SECONDS, READS
from worker.aliases import serving_folder
from worker.calibrations import PublishedCalibration
from worker.feed import ChangeFeed, Entry, entry_id
from worker.index import IndexParams
from worker.reader import IndexReader
from worker.snapshots import IndexStoreError, ModelIdentity, current_name, read_snapshot
from worker.state import IndexState

log = logging.getLogger(__name__)

WAIT_SECONDS = 1.0  # between looks for the owner's first snapshot, or for the one asked for
READ_BLOCK_MS = 1000  # a follower waits this long on the stream for new changes before it looks around
OWNER_CHECK_SECONDS = 5  # how often a follower compares its position with the owner's
SNAPSHOT_ASK_SECONDS = 30  # the least time between two requests for a new snapshot
GATE_SECONDS = 0.5


class Replica(IndexState):
    def __init__(self, settings: Settings, client: redis.Redis, app: Celery) -> None:
        super().__init__(ModelIdentity("", 0, settings.resize), IndexParams(dim=1, ef=settings.hnsw_ef))
        self.settings = settings
        self.directory = settings.index_dir  # the serving index's folder, as the alias last said (`worker.aliases`)
        self.redis = client
        self.app = app
        self.feed = ChangeFeed(client)
        self.position = entry_id(0)  # the ID of the last stream entry taken into account
        self.snapshot = ""
        self.head = 0  # the owner's last sequence number, as far as the feed and its heartbeat tell
        self.owner_seq = 0  # as its heartbeat last said
        # Since when (this machine's clock) the replica has been behind the owner; 0.0: by an unknown, long time
        # (changes missing from the feed, a snapshot that can't be read); None: it holds every change it knows of.
        self.behind_since: float | None = None
        self.lock = threading.RLock()  # reads see the state between two changes, never in the middle of one
        self.reader = IndexReader(self, self.lock, owns=False)
        self.calibration = PublishedCalibration(client)
        self.taking_reads = False
        self._asked_for_snapshot = 0.0
        self._owner_checked = 0.0

    # start ---------------------------------------------------------------------------------------------------

    def open(self) -> Replica:
        """Load the latest snapshot (waiting for the owner's first), then apply every change after it."""
        while not self._load(self._current()):
            log.info("replica: waiting for the index owner's first snapshot in %s", self.directory)
            time.sleep(WAIT_SECONDS)
        while self.follow_once(block_ms=None) or self._check_owner(now=True):
            pass  # nothing more in the feed, and nothing missing from it
        log.info("replica: %d items at change %d (snapshot %s)", len(self.index), self.seq, self.snapshot)
        return self

    def start_following(self) -> threading.Thread:
        thread = threading.Thread(target=self._follow, name="follow", daemon=True)
        thread.start()
        return thread

    # following -----------------------------------------------------------------------------------------------

    def _follow(self) -> None:
        while True:
            try:
                self.follow_once(READ_BLOCK_MS)
                self._check_owner()
            except Exception as error:  # the follower must survive anything; its lag shows it is stuck meanwhile
                self.behind_since = self.behind_since or time.time()
                if isinstance(error, redis.RedisError):
                    log.warning("replica: the change feed can't be read: %s", error)
                else:
                    log.exception("replica: following the change feed failed")
                time.sleep(WAIT_SECONDS)

    def follow_once(self, block_ms: int | None) -> bool:
        """Apply the entries that follow (waiting up to `block_ms` for one); True when there were any."""
        self.head = max(self.feed.head(), self.owner_seq)
        self.reader.calibration = self.calibration.for_index(self.index_id)
        self._note_lag()
        entries = self.feed.read(self.position, block_ms=block_ms)
        for raw_id, entry in entries:
            if not self._take(entry):
                return True  # reloaded, or waiting for a snapshot: read again from the new position
            self.position = raw_id
        self.head = max(self.head, self.seq)
        self._note_lag()
        return bool(entries)

    def _note_lag(self) -> None:
        if self.seq >= self.head:
            self.behind_since = None
        elif self.behind_since is None:
            self.behind_since = time.time()

    def _take(self, entry: Entry) -> bool:
        """Apply one entry in order; False when the replica had to reload a snapshot instead."""
        if entry.snapshot is not None:
            reduced = self.projection.dimension if self.projection else 0
            same_index = entry.projection == reduced and entry.index_id in ("", self.index_id)
            if same_index and entry.seq <= self.seq:
                return True
            # The owner fitted a PCA and rebuilt its index, or switched to another index: not one this replica
            # would build from the changes. Or a newer snapshot of this index: the stream was trimmed to it while
            # the replica was frozen, slow or away, so only the snapshot holds the changes before it.
            self._current()
            if not (self._load(entry.snapshot, force=True) or self._load(self._current(), force=True)):
                self.behind_since = 0.0  # it serves an index the owner no longer has: no reads until it loads one
                time.sleep(WAIT_SECONDS)
            return False
        if entry.first > self.seq + 1:
            self._close_gap(entry.first)
            return False
        with self.lock:
            for change in entry.changes or ():
                if change.seq > self.seq:
                    self.apply_change(change)
                    self.seq = change.seq
        return True

    def _close_gap(self, first: int) -> None:
        """Changes up to `first` are not in the stream: a snapshot must cover them."""
        self.behind_since = 0.0  # how long ago the missing changes were made is unknown: far behind, no reads
        name = self._current()
        if name and name != self.snapshot and self._load(name) and self.seq + 1 >= first:
            return
        if time.monotonic() - self._asked_for_snapshot > SNAPSHOT_ASK_SECONDS:
            log.warning("replica: changes %d to %d are not in the feed; asking the owner for a snapshot", self.seq + 1,
                        first - 1)  # fmt: skip
            self.app.send_task(Task.WRITE_SNAPSHOT, args=[])
            self._asked_for_snapshot = time.monotonic()
        time.sleep(WAIT_SECONDS)

    def _check_owner(self, now: bool = False) -> bool:
        """Compare with the owner's heartbeat (every OWNER_CHECK_SECONDS, or `now`): an owner of another index (its
        folder replaced) means starting again from its snapshot; an owner ahead with nothing more in the feed means
        changes the feed lost (Redis restarted without them, the stream trimmed), which a snapshot must bring.
        True when the replica had to do either."""
        if not now and time.monotonic() - self._owner_checked < OWNER_CHECK_SECONDS:
            return False
        self._owner_checked = time.monotonic()
        owners = alive(self.redis, Role.INDEX)
        if not owners:
            return False
        owner_seq = self.owner_seq = owners[0].get("seq", self.seq)
        if owners[0].get("index_id") not in (None, self.index_id):
            log.warning("replica: the owner holds another index (%s): loading its snapshot", owners[0]["index_id"])
            if not self._load(self._current(), force=True):
                self.behind_since = 0.0
                time.sleep(WAIT_SECONDS)
            return True
        if owner_seq > self.seq and self.feed.head() <= self.seq:
            self._close_gap(owner_seq + 1)
            return True
        return False

    def _load(self, name: str | None, force: bool = False) -> bool:
        """Load snapshot `name` if it is newer than what the replica holds; False when it can't be read now."""
        if name is None:
            return False
        try:
            snapshot = read_snapshot(self.directory / name, self.settings.hnsw_ef)
        except IndexStoreError as error:  # replaced by a newer one while it was read: the caller looks again
            log.info("replica: snapshot %s can't be read now: %s", name, error)
            return False
        if snapshot.seq < self.seq and not force:
            return True  # older than what the replica holds already
        with self.lock:
            self.adopt(snapshot)
            self.snapshot, self.position = name, entry_id(snapshot.seq, snapshot=True)
            self.behind_since = None  # what it knows to be missing is in the snapshot, or shows up as lag again
        log.info("replica: loaded snapshot %s (%d items at change %d)", name, len(self.index), self.seq)
        return True

    def _current(self) -> str | None:
        """The name of the serving index's current snapshot, the alias read again (a switch moves it)."""
        self.directory = serving_folder(self.settings.index_dir)
        return current_name(self.directory)

    # reads ---------------------------------------------------------------------------------------------------

    def lag(self) -> tuple[int, float]:
        """(changes, seconds) behind the owner, as far as the feed tells."""
        seconds = 0.0 if self.behind_since is None else max(0.0, time.time() - self.behind_since)
        return max(0, self.head - self.seq), seconds

    def status(self) -> dict[str, Any]:
        changes, seconds = self.lag()
        return {
            **self.reader.figures(),
            "role": Role.REPLICA,
            "pid": os.getpid(),
            "snapshot": self.snapshot,
            "lag_changes": changes,
            "lag_seconds": round(seconds, 3),
            "taking_reads": self.taking_reads,
        }

    def heartbeat(self) -> dict[str, Any]:
        return {**self.status(), **self.reader.filterable()}

    # serving -------------------------------------------------------------------------------------------------

    def serve_reads(self, answer: Callable[[str, list[Any]], Any], stopping: threading.Event) -> None:
        """Take reads from the `lookalike:reads` list and push each answer (`answer(task, args)`) where the read
        says, while at most LOOKALIKE_MAX_LAG seconds behind the owner; until `stopping` is set."""
        while not stopping.is_set():
            if not self.gate():
                stopping.wait(GATE_SECONDS)
                continue
            try:
                taken = self.redis.brpop([keys.READS], timeout=GATE_SECONDS)
                if taken is not None:
                    self._answer(taken[1], answer)
            except redis.RedisError as error:  # the asker gives up and asks the owner; this replica tries again
                log.warning("replica: reads can't be taken or answered now: %s", error)
                stopping.wait(WAIT_SECONDS)
            except Exception:  # nothing one read does may stop the replica answering the next
                log.exception("replica: a read could not be answered")

    def gate(self) -> bool:
        """Whether the replica takes reads: only while at most LOOKALIKE_MAX_LAG seconds behind the owner."""
        keeping_up = self.lag()[1] <= self.settings.max_lag
        if keeping_up and not self.taking_reads:
            log.info("replica: taking reads (at change %d)", self.seq)
        elif not keeping_up and self.taking_reads:
            log.warning("replica: %.1f s behind the owner: no reads until it caught up", self.lag()[1])
        self.taking_reads = keeping_up
        return keeping_up

    def _answer(self, raw: bytes, answer: Callable[[str, list[Any]], Any]) -> None:
        try:
            read = json.loads(raw)
            task, args, answer_to = read["task"], list(read["args"]), str(read["answer_to"])
            expires = float(read["expires"])
        except (ValueError, TypeError, KeyError) as error:
            log.error("replica: dropped a read it can't parse: %s", error)
            return
        if task not in READS or not answer_to.startswith(keys.read_answer("")):
            log.error("replica: dropped a read of %r answered to %r: not a read of the protocol", task, answer_to)
            return
        if time.time() > expires:
            return  # its asker gave up on it and asked the owner
        try:
            answered = answer(task, args)
        except Exception as error:  # that read's failure only; its asker asks the owner instead
            log.exception("replica: a %s read failed", task)
            answered = {"error": item_error(ErrorCode.INDEX_ERROR, f"the replica could not answer the read: {error}")}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(answer_to, json.dumps(answered))
            pipe.expire(answer_to, ANSWER_SECONDS)
            pipe.execute()
