"""The `lookalike` command: one entry point, a sub-command for each part of the service."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

import redis

from common.errors import LookalikeError, UsageError
from lookalike import __version__

OWN_PACKAGES = ("common", "export", "worker", "web", "lookalike")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line that points at --help instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from lookalike.client_cli import (
        configure_duplicates,
        configure_ingest,
        configure_put,
        configure_recommend,
        configure_search,
    )
    from lookalike.export_cli import configure as export
    from lookalike.index_cli import configure as index
    from lookalike.settings_cli import configure as settings
    from lookalike.tune_cli import configure as tune
    from lookalike.up import configure as up
    from lookalike.web_cli import configure as web
    from lookalike.web_cli import configure_healthcheck
    from lookalike.worker_cli import configure_evaluate, configure_worker

    # Every command: its name, the line `lookalike --help` shows, and what adds its arguments and handler.
    commands = [
        ("export", "export ResNet50 + pooling to ONNX (once), or quantise a model to INT8", export),
        ("worker", "run a worker: embed, index (exactly one), query or replica", configure_worker),
        ("web", "serve the search pages and the JSON API (waitress)", web),
        ("healthcheck", "exit 0 when the web answers searches (its /healthz is 200), else 1", configure_healthcheck),
        ("up", "run everything on this machine (Redis included) until Ctrl-C", up),
        ("index", "build an index of another model beside the serving one, roll back, list, delete, check", index),
        ("ingest", "load a catalogue through the queue, with a progress bar", configure_ingest),
        ("put", "add or replace one product: its photos and metadata", configure_put),
        ("search", "find the catalogue items most like an image", configure_search),
        ("recommend", "find the products most like some examples and least like others", configure_recommend),
        ("duplicates", "list catalogue items that look the same (near-duplicates)", configure_duplicates),
        ("evaluate", "measure retrieval quality on a labelled catalogue", configure_evaluate),
        ("tune", "learn a projection head from the catalogue's labels and write the tuned model", tune),
        ("settings", "print every LOOKALIKE_* setting as this environment gives it", settings),
    ]
    parser = OneLineParser(prog="lookalike", description="Self-hosted visual similarity search for products.")
    parser.add_argument("--version", action="version", version=f"lookalike {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, configure in commands:
        configure(subcommands.add_parser(name, help=help_text))
    return parser


def configure_logging() -> None:
    """Our own packages at INFO; libraries (onnxruntime's quantiser logs every scale it adjusts) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for package in OWN_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)


class StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGHUP: a stop asked for, which ends as cleanly as Ctrl-C but exits 0 (systemd and container
    engines count any other status as a failure)."""


def stop_on_signals() -> None:
    """SIGTERM (docker stop, systemd, kill) and SIGHUP (a closed terminal) stop a command as Ctrl-C does. Said
    out loud because a container's first process, PID 1, ignores every signal it has no handler for: without
    this, `docker stop` waits its whole time-out and kills. A signal already ignored stays so (`nohup`, a
    background job's SIGINT); workers and the web put their own handlers in place later."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt if signum == signal.SIGINT else StopRequested

    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    stop_on_signals()
    try:
        return run(argv)
    except StopRequested:
        return 0
    except KeyboardInterrupt:
        return 130


def run(argv: Sequence[str] | None) -> int:
    """The command `argv` names, with the errors a user can fix as one line and a status."""
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return args.handler(args) or 0
    except LookalikeError as error:
        print(f"lookalike {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except redis.ConnectionError as error:
        print(f"lookalike {args.command}: error: can't reach Redis ({error}); is LOOKALIKE_REDIS_URL right?",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
