"""`lookalike web`: the pages and the JSON API under waitress, a production WSGI server."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)
CONNECTION_LIMIT = 1000
HEALTHCHECK_SECONDS = 5


def configure(web: argparse.ArgumentParser) -> None:
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    web.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    web.set_defaults(handler=run)


def configure_healthcheck(healthcheck: argparse.ArgumentParser) -> None:
    healthcheck.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the web's base URL (default http://127.0.0.1:8000)"
    )
    healthcheck.set_defaults(handler=check_health)


def check_health(args: argparse.Namespace) -> int:
    """Exit 0 when the web answers /healthz with 200 (searches are answered), else 1: a container's health check
    with no argument that needs quoting, which every compose implementation passes through intact."""
    import json
    import urllib.error
    import urllib.request

    url = f"{args.url.rstrip('/')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=HEALTHCHECK_SECONDS) as response:
            print(json.load(response)["status"])
            return 0
    except urllib.error.HTTPError as error:  # 503: searches can't be answered
        try:
            status = json.load(error).get("status")
        except ValueError:
            status = "no JSON"
        print(f"{url}: {error.code} {status} (see the whole answer there)")
    except (OSError, ValueError, KeyError) as error:
        print(f"{url}: no answer ({error})")
    return 1


def announce_api_key(data_dir: Path) -> None:
    """With no LOOKALIKE_API_KEY, the key in DATA_DIR/api-key, made at the first start and shown only then."""
    from common.api_key import ensure_api_key, key_path

    key, made = ensure_api_key(data_dir)
    if made:
        print(f"API key for loads and deletes (shown only now; kept in {key_path(data_dir)}): {key}", flush=True)
    else:
        print(f"API key for loads and deletes: in {key_path(data_dir)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from waitress import serve

    from common.settings import Settings
    from web.app import create_app

    settings = Settings.from_env()
    if not settings.api_key:
        announce_api_key(settings.data_dir)
    app = create_app(settings)  # which reads the key file when LOOKALIKE_API_KEY is empty
    threads = settings.web_threads + settings.web_waiting  # the requests that wait have threads of their own
    log.info("lookalike web on http://%s:%d/ (%d threads)", args.host, args.port, threads)
    serve(
        app,
        host=args.host,
        port=args.port,
        threads=threads,
        # waitress stops accepting at 100 open connections: one more keep-alive client than that waits in the
        # kernel's queue until its SYN retries (up to ~30 s); idle connections are cheap to hold.
        connection_limit=CONNECTION_LIMIT,
        max_request_body_size=settings.max_catalog_upload + 1024 * 1024,
        # waitress removes X-Forwarded-* unless told otherwise; the app's ProxyFix reads them from trusted proxies
        clear_untrusted_proxy_headers=not settings.trusted_proxies,
        ident="lookalike",
    )
    return 0
