"""The Redis key layout: every key lookalike writes, besides kombu's queues (named as `protocol.queues.Queue`)."""

from __future__ import annotations

PREFIX = "lookalike"

LOADS = f"{PREFIX}:loads"  # sorted set: load job id -> created (seconds); the catalogue's history, newest last
METRICS = f"{PREFIX}:metrics"  # hash of counters across all processes: jobs created/finished, search times
WORKERS = f"{PREFIX}:workers"  # hash: "<role>:<host>:<pid>" -> JSON status, refreshed by each process
CHECKSUMS = f"{PREFIX}:index:checksums"  # id -> "image sha256:metadata sha256", rebuilt by the index owner at start
CHANGES = f"{PREFIX}:index:changes"  # stream: the owner's change feed, followed by the replicas (worker.feed)
FORM_SECRET = f"{PREFIX}:web:form-secret"  # the HMAC key of the forms' CSRF tokens, shared by web processes

# The parts of a job beside its record (a hash at job_key(id)):
DONE = "done"  # set of item ids done
ERRORS = "errors"  # hash: item id -> error JSON
ERROR_CODES = "error_codes"  # hash: code -> how many items failed with it
FINISHED = "finished"  # a list a waiting client blocks on; pushed once when the job finishes
PREVIEW = "preview"  # a search's small query JPEG
ROWS = "rows"  # list of JSON rows of a result built in steps (near-duplicate pairs)


def job_key(job_id: str, part: str = "") -> str:
    """A job's record (`part` empty) or one of its parts."""
    return f"{PREFIX}:job:{job_id}{':' + part if part else ''}"
