"""What operators and their tools read: /healthz (200 or 503) and /metrics (Prometheus)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from web.service import current_service as service

ops = Blueprint("ops", __name__)


@ops.get("/healthz")
def healthz() -> tuple[Response, int]:
    health = service().health()
    return jsonify(health), 200 if health["status"] == "ok" else 503


@ops.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(current_app.extensions["lookalike.metrics"]), content_type=CONTENT_TYPE_LATEST)
