"""Every failure as a status, a stable code and a sentence: JSON for the API, a page for people."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, Response, g, jsonify, make_response, render_template, request
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

from common.errors import ErrorCode
from common.images import ImageError

log = logging.getLogger(__name__)

# Image problems found before queueing: an empty upload or a crop box that does not fit it is a bad request, the rest
# are about the content.
IMAGE_ERROR_STATUS = {ErrorCode.EMPTY: 400, ErrorCode.BAD_PARAMETER: 400, ErrorCode.TOO_LARGE: 413}
UNSUPPORTED_MEDIA = 415


class ApiError(Exception):
    """A request we answer with `{error: {code, message}}` and `status`."""

    def __init__(self, status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def as_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    @classmethod
    def from_image_error(cls, error: ImageError) -> ApiError:
        return cls(IMAGE_ERROR_STATUS.get(error.code, UNSUPPORTED_MEDIA), error.code, error.message)


def bad_parameter(message: str) -> ApiError:
    return ApiError(400, ErrorCode.BAD_PARAMETER, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, ErrorCode.NOT_FOUND, message)


def busy(message: str, retry_after: int) -> ApiError:
    """503 `busy`: back-pressure; clients may retry after `retry_after` seconds."""
    return ApiError(503, ErrorCode.BUSY, message, {"Retry-After": str(retry_after)})


def unavailable(code: ErrorCode, message: str) -> ApiError:
    """503: the broker or a worker is missing; clients may retry."""
    return ApiError(503, code, message, {"Retry-After": "5"})


def register_error_handlers(app: Flask) -> None:
    """Every failure becomes an ApiError: JSON under /api and for operators' endpoints, a page elsewhere."""

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> Response:
        return _respond(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            return _respond(
                ApiError(413, ErrorCode.TOO_LARGE, f"the upload is over the cap of {g.get('upload_cap', 0):,} bytes")
            )
        code = HTTP_CODES.get(status, ErrorCode.BAD_REQUEST if status < 500 else ErrorCode.INTERNAL_ERROR)
        return _respond(ApiError(status, code, error.description or error.name))

    @app.errorhandler(redis.RedisError)
    @app.errorhandler(OperationalError)
    def broker_down(error: Exception) -> Response:
        log.warning("Redis is unreachable: %s", error)
        return _respond(unavailable(ErrorCode.BROKER_UNAVAILABLE, f"the queue (Redis) can't be reached: {error}"))

    @app.errorhandler(OSError)
    def storage_error(error: OSError) -> Response:
        log.error("file system error on %s %s: %s", request.method, request.path, error)
        return _respond(
            unavailable(ErrorCode.STORAGE_ERROR, f"the server can't read or write its files: {error.strerror}")
        )

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _respond(ApiError(500, ErrorCode.INTERNAL_ERROR, "something went wrong on our side; it has been logged"))


HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.TOO_LARGE,
}
JSON_PREFIXES = ("/api/", "/healthz", "/metrics")


def _respond(error: ApiError) -> Response:
    if request.path.startswith(JSON_PREFIXES) or request.accept_mimetypes.best == "application/json":
        response = jsonify(error.as_dict())
    else:
        response = make_response(render_template("error.html", error=error), error.status)
    response.status_code = error.status
    response.headers.update(error.headers)
    return response
