"""Job records in Redis: one per user request (a search, a catalogue load), read by the web and the CLI alike.

A job's done items are a set and its failures a hash keyed by item (or, for rows refused while planning, by row),
so a task that runs twice (a redelivery after a worker died) never counts an item twice. Only the first
LOOKALIKE_MAX_JOB_ERRORS failures keep their message, in a sorted set that a page is read from; the counts stay
exact. A finished job and all its parts expire together: a load after LOOKALIKE_JOB_RETENTION, the rest after
LOOKALIKE_SEARCH_TTL.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from common.errors import ErrorCode
from common.settings import Settings
from protocol import keys
from protocol.connection import wait_for_replica
from protocol.queues import Queue
from protocol.sentinel import uses_sentinel

STATES = ("queued", "running", "done", "failed", "partial")
FINISHED = ("done", "failed", "partial")
ERROR_PAGE = 50
HIT_FIELDS = 12  # metadata values a search record keeps of each hit (the image besides)
HIT_CHARS = 100  # a longer value stays with the item: GET /api/items/<id> has it
HIT_PHOTOS = 4  # photos a search record keeps of each hit: the item has them all
SEARCH_SECONDS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))
ITEM, PLANNING = "i:", "p:"  # how a failure is keyed: an item's id, or a row refused while planning
SCAN_CHUNK = 1000

# The keys every script below is given, in this order: 1 the record, 2-10 its parts as keys.PARTS lists them
# (2 done, 3 failed, 4 errors, 5 error ids, 6 error codes, 7 items, 8 deliveries, 9 preview, 10 rows), 11 the list
# a waiting client blocks on, 12 the metrics, 13 the active loads. ARGV starts with: now (ISO), now (epoch
# seconds), a load's retention, the other jobs' time-to-live, the most errors stored, the job id.
SCRIPT_PRELUDE = """
local PARTS = 10
local function keep_for(ttl)
  for i = 1, PARTS do redis.call('EXPIRE', KEYS[i], ttl) end
end
local function follow_record()
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    for i = 2, PARTS do
      if redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ttl) end
    end
  end
end
local function close(state)
  redis.call('HSET', KEYS[1], 'state', state, 'finished', ARGV[1])
  redis.call('DEL', KEYS[7])
  redis.call('SREM', KEYS[13], ARGV[6])
  redis.call('LPUSH', KEYS[11], state)
  redis.call('EXPIRE', KEYS[11], 60)  -- how long the word waits for its waiters (each moves it back: BLMOVE)
  if redis.call('HGET', KEYS[1], 'kind') == 'load' then keep_for(ARGV[3]) else keep_for(ARGV[4]) end
end
"""

# Marks items done or failed and finishes the job when every item is accounted for, atomically; a job that is
# gone (expired) is left alone, and a part written after the job finished expires with it.
# ARGV after the prelude's: number of done ids, done ids..., then (failure key, code, error json, order) quads.
RECORD_SCRIPT = (
    SCRIPT_PRELUDE
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 0} end
local function forget(key)
  local code = redis.call('HGET', KEYS[3], key)
  if code then
    redis.call('HINCRBY', KEYS[6], code, -1)
    redis.call('HDEL', KEYS[3], key)
    redis.call('HDEL', KEYS[4], key)
    redis.call('ZREM', KEYS[5], key)
  end
end
local counted = redis.call('SCARD', KEYS[2]) + redis.call('HLEN', KEYS[3])
local done_count = tonumber(ARGV[7])
for i = 8, 7 + done_count do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then forget('i:' .. ARGV[i]) end
end
local most_errors = tonumber(ARGV[5])
for i = 8 + done_count, #ARGV, 4 do
  local key, code = ARGV[i], ARGV[i + 1]
  if string.sub(key, 1, 2) ~= 'i:' or redis.call('SISMEMBER', KEYS[2], string.sub(key, 3)) == 0 then
    forget(key)
    redis.call('HSET', KEYS[3], key, code)
    redis.call('HINCRBY', KEYS[6], code, 1)
    if redis.call('ZCARD', KEYS[5]) < most_errors then
      redis.call('HSET', KEYS[4], key, ARGV[i + 2])
      redis.call('ZADD', KEYS[5], tonumber(ARGV[i + 3]), key)
    end
  end
end
local done = redis.call('SCARD', KEYS[2])
local failed = redis.call('HLEN', KEYS[3])
if done + failed ~= counted then redis.call('HSET', KEYS[1], 'progressed', ARGV[2]) end
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '-1')
if total >= 0 and done + failed >= total and state == 'running' then
  local outcome = 'done'
  if failed > 0 then outcome = (done > 0) and 'partial' or 'failed' end
  close(outcome)
  redis.call('HINCRBY', KEYS[12], 'finished:' .. redis.call('HGET', KEYS[1], 'kind') .. ':' .. outcome, 1)
else
  follow_record()
end
return {done, failed}
"""
)

# Marks a job running unless it is finished already (a search that timed out, a redelivered task) or gone.
# KEYS: job hash. ARGV: now (ISO), now (epoch seconds).
START_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[1], 'progressed', ARGV[2])
return 1
"""

# Closes a job once: the first outcome recorded (a result, a failure, a time-out) is the one that stays.
# ARGV after the prelude's: state, field, value, done ids...
CLOSE_SCRIPT = (
    SCRIPT_PRELUDE
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'done' or state == 'failed' or state == 'partial' then return 0 end
for i = 10, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
redis.call('HSET', KEYS[1], ARGV[8], ARGV[9])
close(ARGV[7])
return 1
"""
)

# Counts a start of a task; 0 when its job is gone. KEYS: job hash, its deliveries. ARGV: task id.
DELIVERY_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local count = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return count
"""

# Raises a job's `seq` to ARGV[1] unless it is there already (or the job is gone): a load's items may be noted by
# several workers in any order. KEYS: job hash.
NOTE_SEQ_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
if tonumber(ARGV[1]) <= seq then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1])
return 1
"""


@dataclass(frozen=True)
class LoadActivity:
    """What the watchdog needs to know of a load that has not finished."""

    state: str
    total: int | None
    idle_seconds: float  # since its counts last moved (or it started, or was re-queued)
    requeued: int  # how many times the watchdog re-queued what it was missing
    params: dict[str, Any]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def compact_hit(hit: dict[str, Any]) -> dict[str, Any]:
    """A hit as a search record keeps it: its id, score (and confidence), its image and its first HIT_FIELDS metadata
    values of at most HIT_CHARS characters; long ones (descriptions, HTML) stay with the item, a read away. Of its
    photos, the matched one and the first others up to HIT_PHOTOS (`photo_count` says how many it has)."""
    metadata: dict[str, Any] = hit.get("metadata") or {}
    short = [(name, value) for name, value in metadata.items() if name != "image" and len(str(value)) <= HIT_CHARS]
    kept = dict(short[:HIT_FIELDS]) | ({"image": metadata["image"]} if "image" in metadata else {})
    photos, matched = hit.get("photos") or [], hit.get("photo", 0)
    if len(photos) <= HIT_PHOTOS:
        return {**hit, "metadata": kept}
    places = sorted([matched, *[place for place in range(len(photos)) if place != matched][: HIT_PHOTOS - 1]])
    shown = {"photos": [photos[place] for place in places], "photo": places.index(matched), "photo_count": len(photos)}
    return {**hit, "metadata": kept, **shown}


def item_error(code: ErrorCode, message: str) -> dict[str, str]:
    """An error as job records and per-item errors carry it."""
    return {"code": code, "message": message}


class Jobs:
    """Create, update and read job records."""

    def __init__(
        self,
        client: redis.Redis,
        search_ttl: int = 3600,
        search_timeout: int = 60,
        retention: int = 7 * 24 * 3600,
        most_errors: int = 10_000,
        replicated: bool = False,
    ) -> None:
        self.redis = client
        self.replicated = replicated  # Redis has replicas (Sentinel): what a client is told is done waits for one
        self.search_ttl = search_ttl
        self.search_timeout = search_timeout
        self.retention = retention  # seconds a finished load is kept
        self.most_errors = most_errors  # failures a job stores with their message
        self._record = client.register_script(RECORD_SCRIPT)
        self._close_once = client.register_script(CLOSE_SCRIPT)
        self._start = client.register_script(START_SCRIPT)
        self._deliver = client.register_script(DELIVERY_SCRIPT)
        self._note_seq = client.register_script(NOTE_SEQ_SCRIPT)

    @classmethod
    def for_settings(cls, client: redis.Redis, settings: Settings) -> Jobs:
        limits = (settings.search_ttl, settings.search_timeout, settings.job_retention, settings.max_job_errors)
        return cls(client, *limits, replicated=uses_sentinel(settings.redis_url))

    def confirm_replicated(self) -> None:
        """With Redis replicas, before a client is told a load was accepted or finished: until one holds it (a
        failover then keeps it); searches don't wait, a lost one is asked again."""
        if self.replicated:
            wait_for_replica(self.redis)

    def _script_keys(self, job_id: str) -> list[str]:
        parts = [keys.job_key(job_id, part) for part in keys.PARTS]
        return [keys.job_key(job_id), *parts, keys.job_key(job_id, keys.FINISHED), keys.METRICS, keys.ACTIVE_LOADS]

    def _script_args(self, job_id: str) -> list[Any]:
        return [now(), time.time(), self.retention, self.search_ttl, self.most_errors, job_id]

    def create(self, kind: str, params: dict[str, Any], preview: bytes | None = None) -> str:
        job_id = uuid.uuid4().hex
        key = keys.job_key(job_id)
        record = {"id": job_id, "kind": kind, "state": "queued", "created": now(), "params": json.dumps(params)}
        if kind == "load":
            self._forget_expired_loads()
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping={**record, "progressed": time.time()})
            if preview is not None:
                pipe.set(keys.job_key(job_id, keys.PREVIEW), preview, ex=self.search_ttl)
            if kind == "load":  # loads are listed, and kept for their retention once finished; the rest expire
                pipe.zadd(keys.LOADS, {job_id: time.time()})
                pipe.sadd(keys.ACTIVE_LOADS, job_id)
            else:
                pipe.expire(key, self.search_ttl)
            if kind == "search":  # counted against LOOKALIKE_MAX_LIVE_SEARCHES until it expires
                pipe.zadd(keys.SEARCHES, {job_id: time.time()})
            pipe.hincrby(keys.METRICS, f"created:{kind}", 1)
            pipe.execute()
        return job_id

    def live_searches(self) -> tuple[int, float]:
        """How many search records are kept now, and in how many seconds the oldest of them expires."""
        _, live, oldest_expires_in = self.search_load()
        return live, oldest_expires_in

    def search_load(self) -> tuple[int, int, float]:
        """What a new search would join, in one round trip: the searches queued for the query processes, the search
        records kept, and in how many seconds the oldest of those expires."""
        with self.redis.pipeline() as pipe:
            pipe.llen(Queue.QUERY)
            pipe.zremrangebyscore(keys.SEARCHES, "-inf", time.time() - self.search_ttl)
            pipe.zcard(keys.SEARCHES)
            pipe.zrange(keys.SEARCHES, 0, 0, withscores=True)
            queued, _, live, oldest = pipe.execute()
        return queued, live, (oldest[0][1] + self.search_ttl - time.time()) if oldest else 0.0

    def _forget_expired_loads(self) -> None:
        """Unlist the loads whose records expired (only loads created longer ago than the retention can be)."""
        old = self.redis.zrangebyscore(keys.LOADS, "-inf", time.time() - self.retention)
        for start in range(0, len(old), SCAN_CHUNK):
            chunk = old[start : start + SCAN_CHUNK]
            with self.redis.pipeline() as pipe:
                for job_id in chunk:
                    pipe.exists(keys.job_key(job_id.decode()))
                gone = [job_id for job_id, exists in zip(chunk, pipe.execute(), strict=True) if not exists]
            if gone:
                self.redis.zrem(keys.LOADS, *gone)

    def start(self, job_id: str) -> bool:
        """Mark the job running; False when it is finished already or gone: its task has nothing left to do."""
        return bool(self._start(keys=[keys.job_key(job_id)], args=[now(), time.time()]))

    def count_delivery(self, job_id: str, task_id: str) -> int:
        """One more start of the task `task_id` of this job: how many there have been (0: the job is gone)."""
        return int(self._deliver(keys=[keys.job_key(job_id), keys.job_key(job_id, keys.DELIVERIES)], args=[task_id]))

    def remember_items(self, job_id: str, items: list[dict[str, Any]]) -> None:
        """The references of the items a load queues, kept until it finishes, so that lost ones can be re-queued."""
        key = keys.job_key(job_id, keys.ITEMS)
        for start in range(0, len(items), SCAN_CHUNK):
            chunk = items[start : start + SCAN_CHUNK]
            self.redis.hset(key, mapping={item["id"]: json.dumps(item) for item in chunk})

    def set_total(self, job_id: str, total: int) -> tuple[int, int]:
        """Fix the number of items; finishes the job at once if they are all accounted for already."""
        self.redis.hset(keys.job_key(job_id), mapping={"total": total, "progressed": time.time()})
        return self.record(job_id)

    def record(
        self,
        job_id: str,
        done: list[str] | tuple[str, ...] = (),
        errors: dict[str, dict[str, str]] | None = None,
        planning_errors: dict[str, dict[str, str]] | None = None,
    ) -> tuple[int, int]:
        """Mark items done or failed (idempotent), and rows refused while planning; returns (done, failed)."""
        quads = [
            value
            for prefix, order, failures in ((PLANNING, 0, planning_errors), (ITEM, 1, errors))
            for key, error in (failures or {}).items()
            for value in (prefix + key, error["code"], json.dumps(error), order)
        ]
        args = [*self._script_args(job_id), len(done), *done, *quads]
        done_count, failed_count = self._record(keys=self._script_keys(job_id), args=args)
        return int(done_count), int(failed_count)

    def note_seq(self, job_id: str, seq: int) -> None:
        """The index change a load's items reached: a read can wait for it (read your writes). Only ever raised: the
        owner notes the changes it applies, an embed worker the change that holds the items it found unchanged."""
        self._note_seq(keys=[keys.job_key(job_id)], args=[seq])

    def finish(self, job_id: str, result: Any, done: list[str] | tuple[str, ...] = (), partial: bool = False) -> bool:
        """Close the job with its result (`partial`: some of its parts failed), and mark `done` items done in the
        same step: a reader never sees the job finished without its result or short of its last items."""
        return self._close(job_id, "partial" if partial else "done", "result", json.dumps(result), done)

    def fail(self, job_id: str, error: dict[str, str]) -> bool:
        return self._close(job_id, "failed", "error", json.dumps(error))

    def _close(self, job_id: str, state: str, field: str, value: str, done: list[str] | tuple[str, ...] = ()) -> bool:
        """Record the outcome unless the job already has one (a task that runs twice, a search that timed out)."""
        key = keys.job_key(job_id)
        args = self._script_args(job_id)
        if not self._close_once(keys=self._script_keys(job_id), args=[*args, state, field, value, *done]):
            return False
        closed = args[0]
        kind, created = (raw.decode() if raw else "" for raw in self.redis.hmget(key, "kind", "created"))
        if kind == "load":
            self.confirm_replicated()
        with self.redis.pipeline() as pipe:
            pipe.hincrby(keys.METRICS, f"finished:{kind}:{state}", 1)
            if kind == "search" and created:
                seconds = (datetime.fromisoformat(closed) - datetime.fromisoformat(created)).total_seconds()
                bucket = next(bound for bound in SEARCH_SECONDS_BUCKETS if seconds <= bound)
                pipe.hincrby(keys.METRICS, f"search_seconds:{bucket}", 1)
                pipe.hincrbyfloat(keys.METRICS, "search_seconds:sum", seconds)
            pipe.execute()
        return True

    def metrics(self) -> dict[str, float]:
        """The counters of keys.METRICS: `created:<kind>`, `finished:<kind>:<state>`, `search_seconds:<bucket>`."""
        return {name.decode(): float(value) for name, value in self.redis.hgetall(keys.METRICS).items()}

    def add_rows(self, job_id: str, rows: list[dict[str, Any]]) -> None:
        """Part of a result that a job builds in steps (near-duplicate pairs, chunk by chunk)."""
        if rows:
            key = keys.job_key(job_id, keys.ROWS)
            self.redis.pipeline().rpush(key, *map(json.dumps, rows)).expire(key, self.search_ttl).execute()

    def rows(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(row) for row in self.redis.lrange(keys.job_key(job_id, keys.ROWS), 0, -1)]

    def preview(self, job_id: str) -> bytes | None:
        """The small JPEG of a search's query image, while its job record lives."""
        return self.redis.get(keys.job_key(job_id, keys.PREVIEW))

    def wait_until_finished(self, job_id: str, timeout: float) -> bool:
        """Block up to `timeout` seconds for the job to finish (woken at once when it does); every waiter of the job
        wakes: the word is moved back onto its own list as it is taken, for the next (in one command)."""
        key = keys.job_key(job_id, keys.FINISHED)
        return timeout > 0 and self.redis.blmove(key, key, timeout, "RIGHT", "LEFT") is not None

    def get(self, job_id: str, error_offset: int = 0, error_limit: int = ERROR_PAGE) -> dict[str, Any] | None:
        """The job as the API shows it: state, progress counters, a page of item errors, result or error."""
        with self.redis.pipeline() as pipe:  # the record and its counts as of one moment, in one round trip
            pipe.hgetall(keys.job_key(job_id))
            pipe.scard(keys.job_key(job_id, keys.DONE))
            pipe.hlen(keys.job_key(job_id, keys.FAILED))
            pipe.zcard(keys.job_key(job_id, keys.ERROR_IDS))
            fields, done, failed, stored = pipe.execute()
        raw = {k.decode(): v.decode() for k, v in fields.items()}
        if "kind" not in raw:
            return None
        if raw["kind"] == "search" and raw["state"] not in FINISHED and self._overdue(raw["created"]):
            # The index worker that should answer is gone or hopelessly behind: say so instead of "queued" forever.
            message = f"no index worker answered within {self.search_timeout} s; try again"
            self.fail(job_id, item_error(ErrorCode.TIMED_OUT, message))
            return self.get(job_id, error_offset, error_limit)
        job: dict[str, Any] = {
            "id": raw["id"],
            "kind": raw["kind"],
            "state": raw["state"],
            "params": json.loads(raw.get("params", "{}")),
            "progress": {"total": int(raw["total"]) if "total" in raw else None, "done": done, "failed": failed},
            "created": raw.get("created"),
            "started": raw.get("started"),
            "finished": raw.get("finished"),
        }
        if "seq" in raw:
            job["seq"] = int(raw["seq"])
        if "result" in raw:
            job["result"] = json.loads(raw["result"])
        if "error" in raw:
            job["error"] = json.loads(raw["error"])
        if failed and error_limit:
            job["errors"] = self.item_errors(job_id, error_offset, error_limit)
            job["errors_by_code"] = self.errors_by_code(job_id)
        if failed > stored:  # past LOOKALIKE_MAX_JOB_ERRORS: counted by code, without their messages
            job["errors_not_stored"] = failed - stored
        return job

    def _overdue(self, created: str) -> bool:
        age = datetime.now(UTC) - datetime.fromisoformat(created)
        return age.total_seconds() > self.search_timeout

    def item_errors(self, job_id: str, offset: int = 0, limit: int = ERROR_PAGE) -> list[dict[str, str]]:
        """A page of the stored errors: rows refused while planning first, then items, each in id order."""
        stored = self.redis.zrange(keys.job_key(job_id, keys.ERROR_IDS), offset, offset + limit - 1)
        values = self.redis.hmget(keys.job_key(job_id, keys.ERRORS), stored) if stored else []
        return [
            {"id": key.decode()[len(ITEM) :], **json.loads(value)}  # ITEM and PLANNING are as long
            for key, value in zip(stored, values, strict=True)
            if value is not None
        ]

    def errors_by_code(self, job_id: str) -> dict[str, int]:
        counts = self.redis.hgetall(keys.job_key(job_id, keys.ERROR_CODES))
        return {code.decode(): int(count) for code, count in sorted(counts.items()) if int(count) > 0}

    def list_loads(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent catalogue loads, newest first (without their item errors)."""
        ids = self.redis.zrevrange(keys.LOADS, 0, limit - 1)
        jobs = (self.get(job_id.decode(), error_limit=0) for job_id in ids)
        return [job for job in jobs if job is not None]

    # The watchdog's view (worker.watchdog): loads that have not finished, and what they are missing.

    def active_loads(self) -> list[str]:
        return sorted(job_id.decode() for job_id in self.redis.smembers(keys.ACTIVE_LOADS))

    def activity(self, job_id: str) -> LoadActivity | None:
        """A load that has not finished, or None (finished or gone: it is no longer an active load)."""
        fields = ("state", "total", "progressed", "requeued", "params")
        raw = dict(zip(fields, self.redis.hmget(keys.job_key(job_id), fields), strict=True))
        if raw["state"] is None or raw["state"].decode() in FINISHED:
            self.redis.srem(keys.ACTIVE_LOADS, job_id)
            return None
        return LoadActivity(
            state=raw["state"].decode(),
            total=int(raw["total"]) if raw["total"] is not None else None,
            idle_seconds=time.time() - float(raw["progressed"] or 0),
            requeued=int(raw["requeued"] or 0),
            params=json.loads(raw["params"] or "{}"),
        )

    def note_requeued(self, job_id: str) -> int:
        """The watchdog re-queued what the load was missing: the how-manieth time, and its stall clock restarts."""
        with self.redis.pipeline() as pipe:
            pipe.hincrby(keys.job_key(job_id), "requeued", 1)
            pipe.hset(keys.job_key(job_id), "progressed", time.time())
            return int(pipe.execute()[0])

    def missing_items(self, job_id: str) -> list[dict[str, Any]]:
        """The queued items of a running load that are neither done nor failed, with their references."""
        missing = []
        key = keys.job_key(job_id, keys.ITEMS)
        for chunk in _chunks(self.redis.hscan_iter(key, count=SCAN_CHUNK), SCAN_CHUNK):
            ids = [item_id for item_id, _ in chunk]
            with self.redis.pipeline() as pipe:
                pipe.smismember(keys.job_key(job_id, keys.DONE), ids)
                pipe.hmget(keys.job_key(job_id, keys.FAILED), [ITEM.encode() + item_id for item_id in ids])
                done, failed = pipe.execute()
            missing += [
                json.loads(reference)
                for (_, reference), is_done, failure in zip(chunk, done, failed, strict=True)
                if not is_done and failure is None
            ]
        return missing


def _chunks(pairs: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
