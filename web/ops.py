"""What operators and their tools read: /healthz (200 or 503) and /metrics (Prometheus)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from web.metrics import CONTENT_TYPE, exposition
from web.service import current_service as service

ops = Blueprint("ops", __name__)


@ops.get("/healthz")
def healthz() -> tuple[Response, int]:
    health = service().health()
    return jsonify(health), 200 if health["status"] == "ok" else 503


@ops.get("/metrics")
def metrics() -> Response:
    return Response(exposition(current_app.extensions["lookalike.metrics"], service().jobs), content_type=CONTENT_TYPE)
