"""`lookalike index check`: is an index folder sound? Read-only, so it runs beside a live owner too."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def configure(index: argparse.ArgumentParser) -> None:
    actions = index.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="report the snapshot (its files' sizes and sha256 verified) and each log file, without starting the "
        "owner or taking its lock; exit 1 when damaged",
    )
    check.add_argument(
        "--index-dir", type=Path, help="the index folder (default LOOKALIKE_INDEX_DIR, else LOOKALIKE_DATA_DIR/index)"
    )
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    from common.settings import Settings
    from worker.check import check_index

    directory = args.index_dir or Settings.from_env(os.environ).index_dir
    check = check_index(directory)
    print("\n".join(check.lines))
    if check.damage:
        print(
            f"damaged ({'; '.join(check.damage)}): the index owner refuses to start; restore {directory} from a backup",
            file=sys.stderr,
        )
        return 1
    print(f"sound: the owner starts from the snapshot and {check.logged_changes:,} logged changes after it")
    return 0
