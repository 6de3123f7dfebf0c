"""The `lookalike` command: one entry point, a sub-command for each part of the service."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

import redis

from common.errors import LookalikeError
from lookalike import __version__

OWN_PACKAGES = ("common", "export", "worker", "web", "lookalike")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line that points at --help instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from export.cli import register as register_export
    from lookalike.settings_command import register as register_settings
    from lookalike.up import register as register_up
    from web.cli import register as register_web
    from worker.cli import register as register_worker
    from worker.cli import register_duplicates, register_evaluate

    parser = OneLineParser(prog="lookalike", description="Self-hosted visual similarity search for products.")
    parser.add_argument("--version", action="version", version=f"lookalike {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_export(commands)
    register_worker(commands)
    register_web(commands)
    register_evaluate(commands)
    register_duplicates(commands)
    register_up(commands)
    register_settings(commands)
    return parser


def configure_logging() -> None:
    """Our own packages at INFO; libraries (onnxruntime's quantiser logs every scale it adjusts) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for package in OWN_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    try:
        return args.handler(args) or 0
    except LookalikeError as error:
        print(f"lookalike {args.command}: error: {error}", file=sys.stderr)
        return 1
    except redis.ConnectionError as error:
        print(f"lookalike {args.command}: error: can't reach Redis ({error}); is LOOKALIKE_REDIS_URL right?",
              file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
