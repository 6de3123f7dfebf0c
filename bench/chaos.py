"""Chaos: kill -9 worker processes, and Redis once (or its primary every few kills, with Sentinel), while a
catalogue loads and shoppers search; then account for every catalogue item.

    .venv/bin/python bench/chaos.py [--catalog ../shared/data/fashion-catalog.tar.gz] [--metadata CSV]
                                    [--every 15] [--kills N] [--clients 8] [--seed 1] [--timeout S]
                                    [--sentinel [--down-after-ms 2000] [--redis-every 3]] [--json OUT]

Starts a whole service on loopback (embedded Redis, the index owner, a replica, a query process, embed workers,
`lookalike web`), a load of the catalogue and `--clients` shoppers searching through the web. Every `--every`
seconds until the load ends (with `--kills`: until that many kills, also after the load ended) it SIGKILLs one
process, chosen at random among the workers' processes: a pool process (its worker starts another), or a worker's
main process (then the rest of its group too, and the worker is started again, as a supervisor would). The Redis
server is killed once instead, at the third kill (the second of a run of at most four), and started again on its
append-only file. With `--sentinel`, Redis is a primary, a replica and three sentinels (`down-after-milliseconds`
`--down-after-ms`), every process on the sentinels, and every `--redis-every`th kill is the primary's: a failover,
the old primary started again as a replica once the other is promoted. Prints the kills, each failover's promotion
and the time from the primary's death to the first search answered again (with the searches refused meanwhile),
the longest gap between two answered searches, the searches answered and refused by code, and the load's
accounting: its totals add up to the catalogue's items, every item is in the index or reported with a code, none
missing and none twice. Exits 1 when they don't.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis
from catalog_load import SHARED
from shoppers import ANSWERED, FAILED, Shopper

from common.images import IMAGE_SUFFIXES
from lookalike.redis_server import EmbeddedRedis, SentinelRedis, free_port
from lookalike.stack import Stack
from lookalike.up import start_workers
from protocol import keys
from protocol.client import Client
from protocol.jobs import FINISHED

MODEL = SHARED / "models" / "efficientnet_lite0_max.onnx"
PHOTOS = SHARED / "data" / "fashion" / "images"
# Short enough that a load whose message was lost is re-queued within the run, long enough for a worker's restart
STALL_SECONDS = "20"


def catalogue_ids(catalog: Path) -> list[str]:
    """The item ids the catalogue holds, read independently of lookalike: image file names without suffix."""
    if catalog.is_dir():
        names = [path.name for path in catalog.rglob("*") if path.is_file()]
    else:
        with tarfile.open(catalog) as archive:
            names = [Path(member.name).name for member in archive.getmembers() if member.isfile()]
    return sorted(Path(name).stem for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES)


class Chaos:
    """The service under test, and what has been done to it."""

    def __init__(self, work: Path, redis_server: EmbeddedRedis | SentinelRedis, seed: int) -> None:
        self.redis_server = redis_server
        self.stack = Stack(
            redis_server.url, work / "data", MODEL, SHARED / "data",
            LOOKALIKE_LOAD_STALL=STALL_SECONDS, LOOKALIKE_API_KEY="chaos",
        )  # fmt: skip
        self.random = random.Random(seed)
        self.kills: list[dict] = []

    def workers(self) -> list[str]:
        return [name for name in self.stack.processes if name != "web"]

    def kill_a_worker_process(self) -> None:
        name = self.random.choice(self.workers())
        main = self.stack.processes[name].pid
        pid = self.random.choice([main, *self.stack.pool_children(name)])
        started = time.monotonic()
        if pid != main:
            os.kill(pid, signal.SIGKILL)  # the worker's main process starts another pool process itself
            self.kills.append({"victim": f"{name} pool process", "restart_s": 0.0})
            return
        os.kill(main, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(main, signal.SIGKILL)  # its pool processes go with it, as a container's do
        self.stack.processes.pop(name).wait(30)
        kind = name.split("-")[0]
        self.stack.start(kind, name)
        self.kills.append({"victim": name, "restart_s": round(time.monotonic() - started, 1)})

    def kill_redis(self) -> None:
        if isinstance(self.redis_server, SentinelRedis):
            self.fail_over()
            return
        started = time.monotonic()
        self.redis_server.process.kill()
        self.redis_server.process.wait()
        time.sleep(1)
        self.redis_server.start()
        self.kills.append({"victim": "redis", "restart_s": round(time.monotonic() - started, 1)})

    def fail_over(self) -> None:
        """kill -9 the primary; once a replica is promoted, the old primary comes back as a replica."""
        died = time.monotonic()
        self.redis_server.wait_for_promotion(self.redis_server.kill_primary())
        promoted = time.monotonic()
        self.redis_server.bring_back()
        self.kills.append({"victim": "redis primary", "died": died, "promoted_s": round(promoted - died, 1)})


def answered_again(kills: list[dict], shoppers: list[Shopper]) -> list[dict]:
    """For each failover: how long from the primary's death to the first search (sent after it) answered again, and
    how many searches were refused or failed meanwhile."""
    searches = sorted(search for shopper in shoppers for search in shopper.timeline)
    result = []
    for kill in (kill for kill in kills if kill["victim"] == "redis primary"):
        after = [search for search in searches if search[0] >= kill["died"]]
        again = min((ended for _, ended, outcome in after if outcome == ANSWERED), default=None)
        missed = sum(1 for started, _, outcome in after if outcome != ANSWERED and (again is None or started < again))
        gone = None if again is None else round(again - kill["died"], 1)
        result.append({"promoted_s": kill["promoted_s"], "answered_again_s": gone, "refused_or_failed": missed})
    return result


def longest_gap(shoppers: list[Shopper]) -> float:
    """The longest time between two answered searches (their ends), over the whole run."""
    ends = sorted(ended for shopper in shoppers for _, ended, outcome in shopper.timeline if outcome == ANSWERED)
    return round(max((later - earlier for earlier, later in itertools.pairwise(ends)), default=0.0), 1)


def account(client: Client, job_id: str, expected: list[str]) -> dict:
    """The load's totals against the catalogue: every item indexed once, or reported with a code; none missing."""
    job = client.jobs.get(job_id, 0, 0)
    progress, redis = job["progress"], client.jobs.redis
    done = {item_id.decode() for item_id in redis.smembers(keys.job_key(job_id, keys.DONE))}
    failures = {key.decode(): code.decode() for key, code in redis.hgetall(keys.job_key(job_id, keys.FAILED)).items()}
    failed = {key[2:]: code for key, code in failures.items() if key.startswith("i:")}  # "p:" rows: while planning
    indexed = client.stats()["items"]
    failed_but_indexed = [item_id for item_id in failed if client.get_item(item_id) is not None]
    checks = {
        "total is the catalogue's items": progress["total"] == len(expected),
        "indexed + failed = total": progress["done"] + progress["failed"] == progress["total"],
        "every item indexed or failed, none missing": done | set(failed) == set(expected),
        "no item both indexed and failed": not done & set(failed),
        "the index holds exactly the indexed items": indexed == len(done),
        "no failed item is in the index": not failed_but_indexed,
    }
    return {
        "state": job["state"],
        "total": progress["total"],
        "indexed": progress["done"],
        "failed": progress["failed"],
        "failed_by_code": dict(Counter(failures.values())),
        "index_items": indexed,
        "checks": checks,
    }


def run(catalog: Path, metadata: Path | None, args: argparse.Namespace) -> dict:
    every, kills, clients, timeout = args.every, args.kills, args.clients, args.timeout
    expected = catalogue_ids(catalog)
    photos = sorted(PHOTOS.glob("*.jpg"))[:200]
    work = Path(tempfile.mkdtemp(prefix="lookalike-chaos-"))
    if args.sentinel:
        redis_server: EmbeddedRedis | SentinelRedis = SentinelRedis(work / "redis", down_after_ms=args.down_after_ms)
    else:
        redis_server = EmbeddedRedis(work / "redis")
    redis_server.start()
    chaos = Chaos(work, redis_server, args.seed)
    stack = chaos.stack
    try:
        start_workers(stack, stack.settings)
        port = free_port()
        stack.start_web(port)
        client = Client(stack.settings)
        started = time.monotonic()
        job_id = client.start_load(catalog, metadata)
        shoppers = [Shopper(port, photos, float("inf"), offset=97 * n) for n in range(clients)]
        for shopper in shoppers:
            shopper.start()
        redis_at = 3 if kills is None or kills > 4 else 2

        def redis_next() -> bool:
            if args.redis_every:
                return (len(chaos.kills) + 1) % args.redis_every == 0
            return len(chaos.kills) + 1 == redis_at

        load_seconds, during_load = None, 0
        while load_seconds is None or (kills is not None and len(chaos.kills) < kills):
            if load_seconds is None and load_state(client, job_id) in FINISHED:
                load_seconds, during_load = time.monotonic() - started, len(chaos.kills)
                continue
            if time.monotonic() - started > timeout:
                raise SystemExit(f"the load did not end within {timeout:.0f} s: stuck (job {job_id})")
            if kills is not None and len(chaos.kills) >= kills:
                time.sleep(1)
                continue
            time.sleep(every)
            chaos.kill_redis() if redis_next() else chaos.kill_a_worker_process()
            print(f"{time.monotonic() - started:7.1f} s  killed {chaos.kills[-1]['victim']}", file=sys.stderr)
        # every process is back (a restarted worker reported in): the searches after the last kill are answered
        time.sleep(every)
        for shopper in shoppers:
            shopper.until = 0.0
        for shopper in shoppers:
            shopper.join(180)
        statuses, refusals = Counter(), Counter()
        for shopper in shoppers:
            statuses.update(shopper.statuses)
            refusals.update(shopper.refusals)
        return {
            "catalog": str(catalog),
            "cpu": cpu_model(),
            "load_seconds": round(load_seconds, 1),
            "redis": f"Sentinel, down-after-milliseconds {args.down_after_ms}" if args.sentinel else "one server",
            "kills": chaos.kills,
            "kills_during_load": during_load,
            "failovers": answered_again(chaos.kills, shoppers),
            "longest_gap_s": longest_gap(shoppers),
            "searches": {
                "accepted": statuses[202],
                "answered": statuses[202] - statuses[FAILED],
                "failed after acceptance": statuses[FAILED],
                "refused by code": dict(refusals),
            },
            "load": account(client, job_id, expected),
        }
    finally:
        stack.stop()
        redis_server.stop()


def load_state(client: Client, job_id: str) -> str:
    try:
        return client.jobs.get(job_id, 0, 0)["state"]
    except redis.RedisError:  # the Redis kill: workers and web reconnect by themselves, and so do we
        return "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def print_report(report: dict) -> None:
    load, searches = report["load"], report["searches"]
    print(f"catalogue {report['catalog']} on {report['cpu']}, {os.cpu_count()} cores, Redis: {report['redis']}")
    kinds = Counter(kill["victim"].split("-")[0] for kill in report["kills"])
    print("| | |\n| --- | --- |")
    print(f"| load time | {report['load_seconds']} s, ended `{load['state']}` |")
    victims = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
    print(f"| kills | {len(report['kills'])} ({report['kills_during_load']} while loading): {victims} |")
    codes = f" {load['failed_by_code']}" if load["failed_by_code"] else ""
    print(f"| items | {load['total']:,} total: {load['indexed']:,} indexed, {load['failed']:,} failed{codes}; "
          f"the index holds {load['index_items']:,} |")  # fmt: skip
    print(f"| searches | {searches['answered']:,} answered, {searches['failed after acceptance']:,} failed after "
          f"acceptance, refused: {searches['refused by code'] or 'none'} |")  # fmt: skip
    if report["failovers"]:
        promoted = ", ".join(f"{failover['promoted_s']}" for failover in report["failovers"])
        again = ", ".join(f"{failover['answered_again_s']} ({failover['refused_or_failed']})"
                          for failover in report["failovers"])  # fmt: skip
        print(f"| failovers | {len(report['failovers'])}: a replica promoted after {promoted} s |")
        print(f"| from the primary's death to a search answered again (searches refused or failed meanwhile) | "
              f"{again} s |")  # fmt: skip
    print(f"| longest gap between two answered searches | {report['longest_gap_s']} s |")
    for check, held in load["checks"].items():
        print(f"| {check} | {'yes' if held else '**NO**'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=SHARED / "data" / "fashion-catalog.tar.gz")
    parser.add_argument("--metadata", type=Path, default=SHARED / "data" / "fashion" / "styles.csv")
    parser.add_argument("--no-metadata", action="store_true", help="load the catalogue without a CSV")
    parser.add_argument("--every", type=float, default=15.0, help="seconds between kills")
    parser.add_argument("--kills", type=int, help="at most this many kills (default: until the load ends)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds the load may take before it counts as stuck"
    )
    parser.add_argument("--sentinel", action="store_true", help="Redis as a primary, a replica and three sentinels")
    parser.add_argument("--down-after-ms", type=int, default=2000, help="the sentinels' down-after-milliseconds")
    parser.add_argument(
        "--redis-every", type=int, help="every Nth kill is Redis's (with --sentinel: a failover); default: the 3rd only"
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    metadata = None if args.no_metadata else args.metadata
    report = run(args.catalog.resolve(), metadata, args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(report["load"]["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
