"""`lookalike web`: the pages and the JSON API under waitress, a production WSGI server."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)
CONNECTION_LIMIT = 1000


def configure(web: argparse.ArgumentParser) -> None:
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    web.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    web.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from waitress import serve

    from common.settings import Settings
    from web.app import create_app

    settings = Settings.from_env()
    app = create_app(settings)
    log.info("lookalike web on http://%s:%d/ (%d threads)", args.host, args.port, settings.web_threads)
    serve(
        app,
        host=args.host,
        port=args.port,
        threads=settings.web_threads,
        # waitress stops accepting at 100 open connections: one more keep-alive client than that waits in the
        # kernel's queue until its SYN retries (up to ~30 s); idle connections are cheap to hold.
        connection_limit=CONNECTION_LIMIT,
        max_request_body_size=settings.max_catalog_upload + 1024 * 1024,
        ident="lookalike",
        # Keep X-Forwarded-For and friends: their presence tells web.auth that a proxy relays the request,
        # so a local reverse proxy can't make every client look like loopback.
        clear_untrusted_proxy_headers=False,
    )
    return 0
