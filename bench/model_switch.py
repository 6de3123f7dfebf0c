"""What a model change costs: an index built beside the serving one and switched in, while a shopper searches.

    .venv/bin/python bench/model_switch.py --tuned TUNED.onnx [--catalog ../shared/data/fashion]
                                           [--model ../shared/models/efficientnet_lite0_max.onnx] [--json OUT]

TUNED.onnx is a `lookalike tune` of --model (its head beside it). Starts a whole service on loopback (embedded
Redis, the index owner, a replica, a query process, embed workers), loads the catalogue with --model, then:
builds an index of TUNED (re-projected: the head runs on the vectors the serving index holds), rolls back,
builds an index of the same network exported again (another sha256: every photo is embedded again through the
embed workers), and one of TUNED again (re-projected from the raw index, kept for a rollback). Each build is timed
from the request to the owner's heartbeat naming the new index; one shopper searches all along. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnx
from catalog_load import SHARED
from chaos import cpu_model

from lookalike.redis_server import EmbeddedRedis
from lookalike.stack import Stack
from lookalike.up import start_workers
from protocol.client import Client
from protocol.heartbeats import Role

PHOTO = SHARED / "data" / "fashion" / "images" / "10186.jpg"


class Shopper(threading.Thread):
    """Searches one photo again and again, counting answers and failures."""

    def __init__(self, client: Client) -> None:
        super().__init__(daemon=True)
        self.client, self.photo = client, PHOTO.read_bytes()
        self.answered, self.failed, self.stop = 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            job = self.client.follow(self.client.search(self.photo, 5), timeout=120)
            if job["state"] == "done" and job["result"]["hits"]:
                self.answered += 1
            else:
                self.failed += 1


def serving_index(stack: Stack) -> dict:
    beats = stack.heartbeat(Role.INDEX)
    return beats[0] if beats else {}


def timed_build(stack: Stack, client: Client, shopper: Shopper, model: Path, how: str) -> dict:
    answered, failed = shopper.answered, shopper.failed
    started = time.monotonic()
    index_id = client.build_index(str(model))["index_id"]
    beat = stack.wait_for(lambda: serving_index(stack).get("index_id") == index_id and serving_index(stack),
                          f"the switch to {model.name}", timeout=3600)  # fmt: skip
    seconds = time.monotonic() - started
    return {
        "change": f"to {model.name}",
        "how": how,
        "items": beat["items"],
        "seconds": round(seconds, 1),
        "items_per_second": round(beat["items"] / seconds),
        "searches_answered": shopper.answered - answered,
        "searches_failed": shopper.failed - failed,
    }


def run(catalog: Path, model: Path, tuned: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="lookalike-switch-"))
    again = work / "again.onnx"
    graph = onnx.load(str(model))
    graph.doc_string = "the same weights, exported again"
    onnx.save(graph, str(again))
    redis_server = EmbeddedRedis(work / "redis").start()
    stack = Stack(redis_server.url, work / "data", model, catalog if catalog.is_dir() else catalog.parent)
    try:
        start_workers(stack, stack.settings)
        client = Client(stack.settings)
        started = time.monotonic()
        load = client.follow(client.start_load(catalog), timeout=7200)
        load_seconds = time.monotonic() - started
        shopper = Shopper(client)
        shopper.start()
        rows = [timed_build(stack, client, shopper, tuned, "re-projected (head on the stored vectors)")]
        started = time.monotonic()
        client.rollback_index()
        seconds = round(time.monotonic() - started, 1)
        rows.append({"change": f"rollback to {model.name}", "how": "the kept index serves again",
                     "items": serving_index(stack).get("items"), "seconds": seconds})  # fmt: skip
        rows.append(timed_build(stack, client, shopper, again, "embedded again (another export)"))
        rows.append(timed_build(stack, client, shopper, tuned, "re-projected from the kept raw index"))
        shopper.stop.set()
        shopper.join(120)
        return {"cpu": cpu_model(), "catalog": str(catalog), "load": {"items": load["progress"]["done"],
                "seconds": round(load_seconds, 1)}, "changes": rows}  # fmt: skip
    finally:
        stack.stop()
        redis_server.stop()


def print_table(report: dict) -> None:
    print(f"CPU: {report['cpu']}; catalogue {report['catalog']}: {report['load']['items']:,} items loaded in "
          f"{report['load']['seconds']} s")  # fmt: skip
    print("| change | how | items | build and switch (s) | items/s | searches answered meanwhile | failed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in report["changes"]:
        print(f"| {row['change']} | {row['how']} | {row['items']:,} | {row['seconds']} | "
              f"{row.get('items_per_second', '')} | {row.get('searches_answered', '')} | "
              f"{row.get('searches_failed', '')} |")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=SHARED / "data" / "fashion")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "efficientnet_lite0_max.onnx")
    parser.add_argument("--tuned", type=Path, required=True, help="a `lookalike tune` of --model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = run(args.catalog.resolve(), args.model.resolve(), args.tuned.resolve())
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    failed = sum(row.get("searches_failed", 0) for row in report["changes"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
