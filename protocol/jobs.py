"""Job records in Redis: one per user request (a search, a catalogue load), read by the web and the CLI alike.

A job's done items are a set and its failed items a hash keyed by item id, so a task that runs twice (a
redelivery after a worker died) never counts an item twice.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import redis

from common.errors import ErrorCode
from protocol import keys

STATES = ("queued", "running", "done", "failed", "partial")
FINISHED = ("done", "failed", "partial")
ERROR_PAGE = 50
SEARCH_SECONDS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))

# Marks items done or failed and finishes the job when every item is accounted for, atomically.
# KEYS: job hash, done set, errors hash, error counts by code, the list a waiting client blocks on, metrics.
# ARGV: now, number of done ids, done ids..., then (failed id, error code, error json) triples.
RECORD_SCRIPT = """
local function forget_error(id)
  local previous = redis.call('HGET', KEYS[3], id)
  if previous then
    redis.call('HINCRBY', KEYS[4], cjson.decode(previous).code, -1)
    redis.call('HDEL', KEYS[3], id)
  end
end
local done_count = tonumber(ARGV[2])
for i = 3, 2 + done_count do
  redis.call('SADD', KEYS[2], ARGV[i])
  forget_error(ARGV[i])
end
for i = 3 + done_count, #ARGV, 3 do
  if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then
    forget_error(ARGV[i])
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2])
    redis.call('HINCRBY', KEYS[4], ARGV[i + 1], 1)
  end
end
local done = redis.call('SCARD', KEYS[2])
local failed = redis.call('HLEN', KEYS[3])
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '-1')
if total >= 0 and done + failed >= total and redis.call('HGET', KEYS[1], 'state') == 'running' then
  local state = 'done'
  if failed > 0 then state = (done > 0) and 'partial' or 'failed' end
  redis.call('HSET', KEYS[1], 'state', state, 'finished', ARGV[1])
  redis.call('LPUSH', KEYS[5], state)
  redis.call('EXPIRE', KEYS[5], 60)
  redis.call('HINCRBY', KEYS[6], 'finished:' .. redis.call('HGET', KEYS[1], 'kind') .. ':' .. state, 1)
end
return {done, failed}
"""

# Marks a job running unless it is finished already (a search that timed out, a redelivered task) or gone.
# KEYS: job hash. ARGV: now.
START_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[1])
return 1
"""

# Closes a job once: the first outcome recorded (a result, a failure, a time-out) is the one that stays.
# KEYS: job hash, the list a waiting client blocks on, done set. ARGV: state, field, value, now, done ids...
CLOSE_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'done' or state == 'failed' or state == 'partial' then return 0 end
for i = 5, #ARGV do redis.call('SADD', KEYS[3], ARGV[i]) end
redis.call('HSET', KEYS[1], 'state', ARGV[1], ARGV[2], ARGV[3], 'finished', ARGV[4])
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], 60)
return 1
"""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def item_error(code: ErrorCode, message: str) -> dict[str, str]:
    """An error as job records and per-item errors carry it."""
    return {"code": code, "message": message}


class Jobs:
    """Create, update and read job records."""

    def __init__(self, client: redis.Redis, search_ttl: int = 3600, search_timeout: int = 60) -> None:
        self.redis = client
        self.search_ttl = search_ttl
        self.search_timeout = search_timeout
        self._record = client.register_script(RECORD_SCRIPT)
        self._close_once = client.register_script(CLOSE_SCRIPT)
        self._start = client.register_script(START_SCRIPT)

    def create(self, kind: str, params: dict[str, Any], preview: bytes | None = None) -> str:
        job_id = uuid.uuid4().hex
        key = keys.job_key(job_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(
                key,
                mapping={"id": job_id, "kind": kind, "state": "queued", "created": now(), "params": json.dumps(params)},
            )
            if preview is not None:
                pipe.set(keys.job_key(job_id, keys.PREVIEW), preview, ex=self.search_ttl)
            if kind == "load":  # loads are the catalogue's history and stay listed; the rest expire
                pipe.zadd(keys.LOADS, {job_id: time.time()})
            else:
                pipe.expire(key, self.search_ttl)
            pipe.hincrby(keys.METRICS, f"created:{kind}", 1)
            pipe.execute()
        return job_id

    def start(self, job_id: str) -> bool:
        """Mark the job running; False when it is finished already or gone: its task has nothing left to do."""
        return bool(self._start(keys=[keys.job_key(job_id)], args=[now()]))

    def set_total(self, job_id: str, total: int) -> tuple[int, int]:
        """Fix the number of items; finishes the job at once if they are all accounted for already."""
        self.redis.hset(keys.job_key(job_id), "total", total)
        return self.record(job_id)

    def record(
        self, job_id: str, done: list[str] | tuple[str, ...] = (), errors: dict[str, dict[str, str]] | None = None
    ) -> tuple[int, int]:
        """Mark items done or failed (idempotent); returns the (done, failed) counts."""
        triples = [
            value for item_id, error in (errors or {}).items() for value in (item_id, error["code"], json.dumps(error))
        ]
        parts = ("", keys.DONE, keys.ERRORS, keys.ERROR_CODES, keys.FINISHED)
        record_keys = [keys.job_key(job_id, part) for part in parts] + [keys.METRICS]
        done_count, failed_count = self._record(keys=record_keys, args=[now(), len(done), *done, *triples])
        return int(done_count), int(failed_count)

    def note_seq(self, job_id: str, seq: int) -> None:
        """The index change a load's items reached: a read can wait for it (read your writes)."""
        self.redis.hset(keys.job_key(job_id), "seq", seq)

    def finish(self, job_id: str, result: Any, done: list[str] | tuple[str, ...] = ()) -> bool:
        """Close the job with its result, and mark `done` items done in the same step: a reader never sees the
        job finished without its result or short of its last items."""
        return self._close(job_id, "done", "result", json.dumps(result), done)

    def fail(self, job_id: str, error: dict[str, str]) -> bool:
        return self._close(job_id, "failed", "error", json.dumps(error))

    def _close(self, job_id: str, state: str, field: str, value: str, done: list[str] | tuple[str, ...] = ()) -> bool:
        """Record the outcome unless the job already has one (a task that runs twice, a search that timed out)."""
        key = keys.job_key(job_id)
        closed = now()
        close_keys = [key, keys.job_key(job_id, keys.FINISHED), keys.job_key(job_id, keys.DONE)]
        if not self._close_once(keys=close_keys, args=[state, field, value, closed, *done]):
            return False
        kind, created = (raw.decode() if raw else "" for raw in self.redis.hmget(key, "kind", "created"))
        with self.redis.pipeline() as pipe:
            if kind != "load":
                pipe.expire(key, self.search_ttl)
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
        """Block up to `timeout` seconds for the job to finish (woken at once when it does)."""
        return self.redis.blpop([keys.job_key(job_id, keys.FINISHED)], timeout=timeout) is not None

    def get(self, job_id: str, error_offset: int = 0, error_limit: int = ERROR_PAGE) -> dict[str, Any] | None:
        """The job as the API shows it: state, progress counters, a page of item errors, result or error."""
        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.job_key(job_id)).items()}
        if "kind" not in raw:
            return None
        if raw["kind"] == "search" and raw["state"] not in FINISHED and self._overdue(raw["created"]):
            # The index worker that should answer is gone or hopelessly behind: say so instead of "queued" forever.
            message = f"no index worker answered within {self.search_timeout} s; try again"
            self.fail(job_id, item_error(ErrorCode.TIMED_OUT, message))
            return self.get(job_id, error_offset, error_limit)
        done = self.redis.scard(keys.job_key(job_id, keys.DONE))
        failed = self.redis.hlen(keys.job_key(job_id, keys.ERRORS))
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
        return job

    def _overdue(self, created: str) -> bool:
        age = datetime.now(UTC) - datetime.fromisoformat(created)
        return age.total_seconds() > self.search_timeout

    def item_errors(self, job_id: str, offset: int = 0, limit: int = ERROR_PAGE) -> list[dict[str, str]]:
        """A page of per-item errors, ordered by item id."""
        key = keys.job_key(job_id, keys.ERRORS)
        ids = sorted(self.redis.hkeys(key))[offset : offset + limit]
        values = self.redis.hmget(key, ids) if ids else []
        return [{"id": item_id.decode(), **json.loads(value)} for item_id, value in zip(ids, values, strict=True)]

    def errors_by_code(self, job_id: str) -> dict[str, int]:
        counts = self.redis.hgetall(keys.job_key(job_id, keys.ERROR_CODES))
        return {code.decode(): int(count) for code, count in sorted(counts.items()) if int(count) > 0}

    def list_loads(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent catalogue loads, newest first (without their item errors)."""
        ids = self.redis.zrevrange(keys.LOADS, 0, limit - 1)
        jobs = (self.get(job_id.decode(), error_limit=0) for job_id in ids)
        return [job for job in jobs if job is not None]
