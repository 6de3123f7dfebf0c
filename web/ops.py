"""What operators and their tools read: /healthz (200 while searches are answered, else 503) and /metrics."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from web.service import current_service as service

ops = Blueprint("ops", __name__)


@ops.get("/healthz")
def healthz() -> tuple[Response, int]:
    health = service().health()
    # degraded is 200: searches are answered, and a health check that restarts or unroutes the web can't bring back
    # the owner or the embed workers; the body says what is missing
    return jsonify(health), 503 if health["status"] == "unavailable" else 200


@ops.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(current_app.extensions["lookalike.metrics"]), content_type=CONTENT_TYPE_LATEST)
