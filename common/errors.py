"""The error type every part raises for a problem the user can fix, and the stable codes errors carry at the edges.

The codes are part of the protocol between the web, the workers and clients (job records, per-item errors, the
JSON API); they are defined here, in the ground, because the ground's image reading already produces them.
"""

from enum import StrEnum


class LookalikeError(Exception):
    """A problem with the user's input or setup, explained in one sentence (no traceback needed)."""


class UsageError(LookalikeError):
    """A request its input can't serve (a label no item has, too few items to learn from): refused before the work,
    with exit status 2 as for a mistyped option."""


class ErrorCode(StrEnum):
    """Every code an error may carry; clients match on these, so a code's meaning never changes."""

    # an image that can't be used (an upload, or a catalogue item's file)
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    TOO_LARGE = "too_large"
    # a catalogue item that can't be loaded
    MISSING_FILE = "missing_file"
    OUTSIDE_ROOT = "outside_root"
    INVALID_ROW = "invalid_row"
    DUPLICATE_ID = "duplicate_id"
    MODEL_MISMATCH = "model_mismatch"
    INDEX_UNWRITABLE = "index_unwritable"
    INDEX_ERROR = "index_error"
    EMBED_FAILED = "embed_failed"
    INVALID_NAME = "invalid_name"
    INVALID_ID = "invalid_id"
    WORKER_LOST = "worker_lost"
    LOST = "lost"
    # a job that ended without its result
    BAD_CATALOG = "bad_catalog"
    PLAN_FAILED = "plan_failed"
    ENQUEUE_FAILED = "enqueue_failed"
    TIMED_OUT = "timed_out"
    SEARCH_FAILED = "search_failed"
    DUPLICATES_FAILED = "duplicates_failed"
    # a request the web refuses, or can't answer now
    NOT_FOUND = "not_found"
    BAD_PARAMETER = "bad_parameter"
    UNKNOWN_FIELD = "unknown_field"
    BAD_REQUEST = "bad_request"
    MISSING_IMAGE = "missing_image"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    CROSS_SITE = "cross_site"
    CSRF = "csrf"
    BUSY = "busy"
    BEHIND = "behind"
    NO_WORKER = "no_worker"
    INDEX_UNAVAILABLE = "index_unavailable"
    BROKER_UNAVAILABLE = "broker_unavailable"
    STORAGE_ERROR = "storage_error"
    INTERNAL_ERROR = "internal_error"
