"""The Flask app factory: settings in, pages + JSON API + health and metrics out."""

from __future__ import annotations

import dataclasses
import time

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry
from werkzeug.middleware.proxy_fix import ProxyFix

from common.api_key import read_api_key
from common.products import MAX_METADATA_BYTES
from common.settings import Settings
from protocol.celery_app import create_celery
from protocol.client import Client
from web.api import api
from web.auth import is_write, require_writer
from web.csrf import form_token, set_nonce_cookie
from web.errors import register_error_handlers
from web.metrics import RequestMetrics, SharedFigures
from web.ops import ops
from web.pages import pages
from web.service import Service

FORM_ALLOWANCE = 64 * 1024  # room for the other form fields and multipart boundaries beside an image
CATALOG_UPLOADS = {"api.start_load", "pages.start_load"}
PRODUCT_UPLOADS = {"api.put_item"}  # a product's photos, each up to LOOKALIKE_MAX_UPLOAD, and its metadata
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
}


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    if not settings.api_key:  # the key `lookalike web` or `lookalike up` made at its first start, if any
        settings = dataclasses.replace(settings, api_key=read_api_key(settings.data_dir))
    app = Flask(__name__)
    app.url_map.merge_slashes = False  # "/api/items//similar" is a 404 in JSON, not a redirect to an HTML page
    if settings.trusted_proxies:
        # The browser's host, scheme and address as the proxies saw them: the CSRF check compares Origin with that
        # host, not the one a proxy rewrote. X-Forwarded-Port stays ignored: neither nginx nor Caddy sets it, so a
        # client could (X-Forwarded-Host carries the port).
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    app.config["LOOKALIKE"] = settings
    # The one Celery app of this process, as Flask's own Celery example makes it: built here, kept in extensions.
    app.extensions["celery"] = celery = create_celery(settings)
    app.extensions["lookalike"] = Service(settings, Client(settings, celery, timeout=settings.call_timeout))
    # Each app its own registry: this process's request figures, and the shared ones read from Redis per scrape.
    app.extensions["lookalike.metrics"] = registry = CollectorRegistry(auto_describe=True)
    metrics = RequestMetrics(registry)
    registry.register(SharedFigures(app.extensions["lookalike"].jobs))
    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.register_blueprint(ops)
    register_error_handlers(app)
    app.add_template_global(form_token, "csrf_token")

    @app.before_request
    def start() -> None:
        g.started = time.perf_counter()
        g.upload_cap = upload_cap(settings, request.endpoint)
        request.max_content_length = g.upload_cap + FORM_ALLOWANCE
        if is_write():  # here, before a view reads the body: a 2 GB upload without the key is not parsed
            require_writer()

    @app.after_request
    def finish(response: Response) -> Response:
        for header, value in SECURITY_HEADERS.items():
            response.headers.setdefault(header, value)
        route = request.url_rule.rule if request.url_rule else "(no route)"
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        metrics.observe(route, request.method, response.status_code, seconds)
        return set_nonce_cookie(response)

    return app


def upload_cap(settings: Settings, endpoint: str | None) -> int:
    """The most bytes a request to `endpoint` may upload (its body: this and FORM_ALLOWANCE), refused with 413."""
    if endpoint in CATALOG_UPLOADS:
        return settings.max_catalog_upload
    if endpoint in PRODUCT_UPLOADS:
        return settings.max_photos * settings.max_upload + MAX_METADATA_BYTES
    return settings.max_upload
