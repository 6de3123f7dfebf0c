"""`lookalike index`: build an index of another model beside the serving one and switch to it, roll back, list and
delete indexes (through the index owner), and check an index folder (read-only, beside a live owner too)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

INDEX_DIR_HELP = "the index folder (default LOOKALIKE_INDEX_DIR, else LOOKALIKE_DATA_DIR/index)"


def configure(index: argparse.ArgumentParser) -> None:
    actions = index.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="build an index of MODEL beside the serving one (searches go on against it) and switch to it when "
        "complete; the replaced index is kept for `lookalike index rollback`",
    )
    build.add_argument(
        "--model",
        type=Path,
        help="the new model, at a path every embed worker reaches (default: the serving model: a rebuild with "
        "today's settings, such as LOOKALIKE_PCA_DIM)",
    )
    build.add_argument(
        "--wait",
        action="store_true",
        help="show the build's progress until it is switched in; exit 1 if it stops short of the switch",
    )
    build.add_argument(
        "--allow-missing",
        type=int,
        default=0,
        metavar="N",
        help="switch even if up to N serving items could not be carried over to the new index (their photos gone, "
        "unreadable); without it such a build stops before the switch and names them. Run again for the build under "
        "way to try every item anew (after putting a photo back) or to change N",
    )
    build.set_defaults(handler=run_build)
    rollback = actions.add_parser("rollback", help="serve the index the last switch replaced again")
    rollback.set_defaults(handler=run_rollback)
    listing = actions.add_parser("list", help="the indexes in the index folder: serving, previous, building, kept")
    listing.add_argument("--index-dir", type=Path, help=INDEX_DIR_HELP)
    listing.set_defaults(handler=run_list)
    delete = actions.add_parser("delete", help="delete a kept index, or the one being built (ending its build)")
    delete.add_argument("index_id", help="the index's id, as `lookalike index list` shows it")
    delete.set_defaults(handler=run_delete)
    check = actions.add_parser(
        "check",
        help="report the serving index's snapshot (its files' sizes and sha256 verified) and each log file, without "
        "starting the owner or taking its lock; exit 1 when damaged",
    )
    check.add_argument("--index-dir", type=Path, help=INDEX_DIR_HELP)
    check.set_defaults(handler=run_check)


def _client():
    from common.settings import Settings
    from protocol.client import Client

    return Client(Settings.from_env(os.environ), timeout=60)


def run_build(args: argparse.Namespace) -> int:
    from protocol.heartbeats import Role, alive

    client = _client()
    model = str(args.model.resolve()) if args.model else None
    if args.allow_missing < 0:
        print("--allow-missing must be 0 or more", file=sys.stderr)
        return 2
    started = client.build_index(model, args.allow_missing)
    answered = time.time()  # a heartbeat taken before the answer may not show the build yet
    print(f"building index {started['index_id']} of {started['model']} beside the serving one")
    if not args.wait:
        print("`lookalike index list` or /healthz shows its progress; it is switched in when complete")
        return 0
    shown = False  # whether a heartbeat has shown this build
    while True:
        owners = alive(client.jobs.redis, Role.INDEX)
        owner = owners[0] if owners else {}
        if owner.get("index_id") == started["index_id"]:
            print(f"switched: index {started['index_id']} serves, {owner.get('items')} items")
            return 0
        building = owner.get("building") or {}
        if building.get("index_id") == started["index_id"]:
            shown = True
            if building.get("missing") and owner["seen"] > answered:
                print(stopped_short(building), file=sys.stderr)
                return 1
            print(f"  round {building['round']}: {building['items']:,} of {building['of']:,} items", flush=True)
        elif owner and (shown or owner["seen"] > answered):
            print(f"the build of index {started['index_id']} ended without a switch (deleted?)", file=sys.stderr)
            return 1
        time.sleep(2)


def stopped_short(building: dict) -> str:
    """Why a build is not switched in: the serving items it could not carry over, and what to do."""
    missing = building["missing"]
    lines = [f"  {item['id']}: {item['code']}: {item['message']}" for item in building["missing_items"]]
    if missing > len(lines):
        lines.append(f"  ... and {missing - len(lines):,} more (in the build's round jobs)")
    return "\n".join([
        f"index {building['index_id']} is not switched in: {missing:,} serving items could not be carried over "
        f"(--allow-missing {building['allow_missing']}):",
        *lines,
        f"put their photos back and run `lookalike index build` again, or accept the loss with --allow-missing "
        f"{missing}",
    ])  # fmt: skip


def run_rollback(args: argparse.Namespace) -> int:
    answer = _client().rollback_index()
    print(f"index {answer['serving']} serves again ({answer['model']}); {answer['previous']} is kept")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    answer = _client().delete_index(args.index_id)
    print(f"deleted index {answer['deleted']} ({answer['folder']})")
    return 0


def _index_dir(args: argparse.Namespace) -> Path:
    from common.settings import Settings

    return args.index_dir or Settings.from_env(os.environ).index_dir


def run_list(args: argparse.Namespace) -> int:
    from worker.aliases import describe

    for row in describe(_index_dir(args)):
        calibrated = f"  calibrated: {row['calibrated']}" if row["calibrated"] else ""
        print(f"{row['index_id']}  {row['role']:<23} {row['items']:>9,} items  change {row['seq']:<8} "
              f"{row['model']}  ({row['folder']}){calibrated}")  # fmt: skip
    return 0


def run_check(args: argparse.Namespace) -> int:
    from worker.aliases import serving_folder
    from worker.check import check_index

    directory = serving_folder(_index_dir(args))
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
