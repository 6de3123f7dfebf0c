"""`lookalike up`: Redis, the index worker, embed workers and the web on this machine, started and stopped together."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from lookalike.errors import LookalikeError
from lookalike.redis_server import EmbeddedRedis
from lookalike.settings import DEFAULTS, Settings
from lookalike.stack import Stack

WATCH_SECONDS = 1.0


def register(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser("up", help="run everything on this machine (Redis included) until Ctrl-C")
    up.add_argument("--port", type=int, default=8000, help="port of the web pages and API (default 8000)")
    up.add_argument("--host", default="127.0.0.1", help="address the web listens on (default 127.0.0.1)")
    up.add_argument(
        "--model", type=Path, help=f"an ONNX model with the contract (default: {DEFAULTS['LOOKALIKE_MODEL']})"
    )
    up.add_argument(
        "--catalog", type=Path, help="load this catalogue on start: a CSV, folder, tar archive or styles.csv+images/"
    )
    up.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from worker.model import load_model

    environ = dict(os.environ)
    if args.model:
        environ["LOOKALIKE_MODEL"] = str(args.model.expanduser().resolve())
    catalog = args.catalog.expanduser().resolve() if args.catalog else None
    if catalog is not None:
        if not catalog.exists():
            raise LookalikeError(f"catalogue {args.catalog} does not exist")
        environ.setdefault("LOOKALIKE_CATALOG_ROOT", str(catalog.parent))
    settings = Settings.from_env(environ)
    if not settings.model.is_file():
        raise LookalikeError(
            f"no model at {settings.model}: export one with `lookalike export` (ResNet50, ImageNet weights) or pass "
            "--model PATH (any ONNX model with the contract)"
        )
    load_model(settings.model, ["cpu"])  # refuses a model that breaks the contract, here, in one line

    stop_on_signals()
    embedded = None if os.environ.get("LOOKALIKE_REDIS_URL") else EmbeddedRedis(settings.data_dir / "redis")
    stack = None
    try:
        if embedded is not None:
            embedded.start()
            print(f"redis: {embedded.url} (embedded, data in {embedded.directory})", file=sys.stderr)
        redis_url = embedded.url if embedded else settings.redis_url
        extra = {name: environ[name] for name in environ if name.startswith("LOOKALIKE_")}
        extra["LOOKALIKE_REDIS_URL"] = redis_url
        stack = Stack(redis_url, settings.data_dir, settings.model, settings.catalog_root, **extra)
        print(f"workers: starting (logs in {stack.logs})", file=sys.stderr)
        stack.start("index")
        stack.start("embed")
        url = stack.start_web(args.port, args.host)
        print(f"lookalike is up: {url}/  (Ctrl-C stops it)", flush=True)
        if catalog is not None:
            load(stack, catalog)
        watch(stack)
    except KeyboardInterrupt:
        print("\nstopping ...", file=sys.stderr)
    except AssertionError as error:  # a process did not come up: say which, and where its log is
        raise LookalikeError(f"{error} (see the logs in {settings.data_dir / 'logs'})") from None
    finally:
        if stack is not None:
            stack.stop()
        if embedded is not None:
            embedded.stop()
    return 0


def load(stack: Stack, catalog: Path) -> None:
    from worker.cli import follow_load
    from worker.client import Client

    client = Client(stack.settings)
    print(f"loading {catalog} (items the index already holds unchanged are not embedded again)", file=sys.stderr)
    try:
        follow_load(client, client.submit_load(catalog))
    except LookalikeError as error:  # the service still runs: a better catalogue can be loaded from the web
        print(f"the catalogue was not loaded: {error}", file=sys.stderr)


def watch(stack: Stack) -> None:
    """Wait for Ctrl-C or SIGTERM; a process that dies on its own takes the rest down, with a reason."""
    while True:
        for kind, process in stack.processes.items():
            if process.poll() is not None:
                raise LookalikeError(f"the {kind} process exited ({process.returncode}); see {stack.log_paths[kind]}")
        time.sleep(WATCH_SECONDS)


def stop_on_signals() -> None:
    """SIGTERM (docker stop, systemd, kill) stops everything the way Ctrl-C does."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
