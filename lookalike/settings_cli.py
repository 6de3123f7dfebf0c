"""`lookalike settings`: the configuration this environment gives, or the docs' table of every variable."""

from __future__ import annotations

import argparse
import dataclasses
import os

from common.settings import Settings, declared, env_name, markdown_table


def configure(show: argparse.ArgumentParser) -> None:
    show.add_argument("--markdown", action="store_true", help="print the table of every variable (the docs' table)")
    show.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown_table(), end="")
        return 0
    settings = Settings.from_env()  # refuses a bad value in one line, as every command does
    secret = {declared_field.name for declared_field in dataclasses.fields(Settings) if not declared_field.repr}
    for name, _, _ in declared():
        value = getattr(settings, name)
        shown = ",".join(value) if isinstance(value, tuple) else str(value)
        if name in secret and value:
            shown = "(hidden)"
        origin = "  # set" if os.environ.get(env_name(name)) else ""
        print(f"{env_name(name)}={shown}{origin}")
    return 0
