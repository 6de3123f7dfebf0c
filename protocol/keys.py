"""The Redis key layout: every key lookalike writes, besides kombu's queues (named as `protocol.queues.Queue`)."""

from __future__ import annotations

PREFIX = "lookalike"

LOADS = f"{PREFIX}:loads"  # sorted set: load job id -> created (seconds); the catalogue's history, newest last
ACTIVE_LOADS = f"{PREFIX}:loads:active"  # set: loads not finished yet, which the owner's watchdog looks after
METRICS = f"{PREFIX}:metrics"  # hash of counters across all processes: jobs created/finished, search times
WORKERS = f"{PREFIX}:workers"  # hash: "<role>:<host>:<pid>" -> JSON status, refreshed by each process
CHECKSUMS = f"{PREFIX}:index:checksums"  # id -> "image sha256:metadata sha256", rebuilt by the index owner at start
CHANGES = f"{PREFIX}:index:changes"  # stream: the owner's change feed, followed by the replicas (worker.feed)
SERVING = f"{PREFIX}:index:serving"  # JSON: the serving index's id and model, set by the owner at start and each switch
CALIBRATION = f"{PREFIX}:index:calibration"  # hash: the serving index's calibration (index_id, sha256, calibration)
SEARCHES = f"{PREFIX}:searches"  # sorted set: search job id -> created; those within LOOKALIKE_SEARCH_TTL are live
READS = f"{PREFIX}:reads"  # list: reads for the replicas that keep up, JSON, each naming where its answer goes
REPLICATION_MARK = f"{PREFIX}:replication-mark"  # a counter written to learn when a Redis replica holds all before it
FORM_SECRET = f"{PREFIX}:web:form-secret"  # the HMAC key of the forms' CSRF tokens, shared by web processes

# The parts of a job beside its record (a hash at job_key(id)):
DONE = "done"  # set of item ids done
# Failures are keyed "i:<item id>" (an item) or "p:<row>" (refused while planning), so neither erases the other.
FAILED = "failed"  # hash: failure key -> error code, every failure (the counts)
ERRORS = "errors"  # hash: failure key -> error JSON, the first LOOKALIKE_MAX_JOB_ERRORS failures only
ERROR_IDS = "error_ids"  # sorted set of the stored failure keys: planning (score 0), then items, by key
ERROR_CODES = "error_codes"  # hash: code -> how many items failed with it
ITEMS = "items"  # hash: item id -> its reference, the items a running load queued (the watchdog re-queues them)
DELIVERIES = "deliveries"  # hash: task id -> how many times a worker started it
FINISHED = "finished"  # a list a waiting client blocks on; pushed once when the job finishes
PREVIEW = "preview"  # a search's small query JPEG
ROWS = "rows"  # list of JSON rows of a result built in steps (near-duplicate pairs)
PARTS = (DONE, FAILED, ERRORS, ERROR_IDS, ERROR_CODES, ITEMS, DELIVERIES, PREVIEW, ROWS)  # expire with the record


def job_key(job_id: str, part: str = "") -> str:
    """A job's record (`part` empty) or one of its parts."""
    return f"{PREFIX}:job:{job_id}{':' + part if part else ''}"


def read_answer(read_id: str) -> str:
    """The list a read's answer is pushed to, which its asker blocks on."""
    return f"{PREFIX}:read:{read_id}"
