"""What a search costs through lookalike against the simplest anchor, in one run: searches/s, p50 and p95 at 1, 8
and 32 clients, the HTTP requests and the CPU of each process a search takes, and (--profile) where its time goes.

    .venv/bin/python bench/search_cost.py [--seconds 10] [--clients 1,8,32] [--profile] [--set NAME=VALUE]

Starts on this machine the anchor (bench/anchor.py: one Flask process under waitress that decodes, embeds with
onnxruntime and asks hnswlib inside the request) and lookalike as `lookalike up` starts it (Redis, the index owner,
1 replica, 1 query process, an embed worker, `lookalike web`), both over the 1,002 sample photos with the same model
and settings. Then, at each number of clients (threads of this process, on the same cores), the clients search
with the sample's photos for --seconds each, the three systems taking turns at each number of clients:
(a) the anchor: POST /search, the hits in its answer; (b) lookalike, polling as the results page did before `wait`:
POST /api/search, then GET /api/jobs/<id> after 50 ms and 1.5 times longer each time (bench/shoppers.py);
(c) lookalike with `wait=10`: POST /api/search answers the finished job, or 202 when no thread of the web could
wait, which the client follows with GET ?wait=10 as the page does now. The stack stays up, idle, while the anchor
runs (its CPU then is printed too). --set passes a LOOKALIKE_* setting to lookalike's processes only (a what-if;
the anchor keeps the defaults).
--profile then breaks a 1-client search with `wait` into its stages (bench/search_profile.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from anchor import MODEL, SAMPLE, sample_photos
from chaos import cpu_model
from searchers import AnchorSearcher, WaitingSearcher, cpu_by_part, stack_processes, web_requests
from shoppers import FAILED, Shopper, run_clients

from common.settings import Settings
from lookalike.redis_server import EmbeddedRedis, free_port
from lookalike.stack import Stack
from lookalike.up import start_workers
from protocol.client import Client

BENCH = Path(__file__).resolve().parent
ANCHOR, POLLING, WAITING = "anchor", "lookalike, polling", "lookalike, wait=10"
SYSTEMS = {ANCHOR: AnchorSearcher, POLLING: Shopper, WAITING: WaitingSearcher}
STACK_PARTS = ("web", "query", "replica", "owner, embed", "Redis")
WARM_UP_SECONDS = 2.0  # of each system, one client, before the rows: sessions, connections, first runs
ANCHOR_START_SECONDS = 600  # embedding the sample for its index, when its vectors are not cached yet


def start_anchor(args: argparse.Namespace, port: int, work: Path) -> subprocess.Popen:
    command = [sys.executable, str(BENCH / "anchor.py"), "--port", str(port), "--model", str(args.model),
               "--sample", str(args.sample)]  # fmt: skip
    with open(work / "anchor.log", "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_for_anchor(process: subprocess.Popen, port: int, work: Path) -> None:
    deadline = time.monotonic() + ANCHOR_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the anchor exited ({process.returncode}): {(work / 'anchor.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the anchor did not answer within {ANCHOR_START_SECONDS} s")


def measure(
    system: str, port: int, photos: list[Path], clients: int, seconds: float, parts: dict, web_url: str
) -> dict:
    """One row: `clients` clients of `system` for `seconds`; the CPU of every part, the web's requests."""
    cpu_before, requests_before = cpu_by_part(parts), web_requests(web_url)
    started = time.monotonic()
    latencies, statuses, refusals = run_clients(port, photos, clients, seconds, kind=SYSTEMS[system])
    wall = time.monotonic() - started
    cpu_after, requests_after = cpu_by_part(parts), web_requests(web_url)
    return {
        "system": system, "clients": clients, "latencies": latencies, "wall": wall, "refusals": refusals,
        "not_done": statuses[FAILED] + sum(count for status, count in statuses.items() if status >= 400),
        "cpu": {part: cpu_after[part] - cpu_before[part] for part in parts},
        "requests": requests_after[0] - requests_before[0], "web_seconds": requests_after[1] - requests_before[1],
    }  # fmt: skip


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def figures(row: dict) -> dict:
    """searches/s, p50 and p95 (ms), CPU ms a search and cores busy of a row's own processes."""
    done = len(row["latencies"])
    own = ("anchor", "clients") if row["system"] == ANCHOR else (*STACK_PARTS, "clients")
    cpu = sum(row["cpu"][part] for part in own)
    return {
        "done": done, "rate": done / row["wall"],
        "p50": statistics.median(row["latencies"]) * 1000 if done else float("nan"),
        "p95": quantile(row["latencies"], 0.95) * 1000, "cpu_ms": 1000 * cpu / max(1, done), "cores": cpu / row["wall"],
    }  # fmt: skip


def print_tables(rows: list[dict]) -> None:
    anchors = {row["clients"]: figures(row) for row in rows if row["system"] == ANCHOR}
    print("\n| system | clients | searches | searches/s | vs anchor | p50 ms | p95 ms | p50 vs anchor | p95 vs anchor "
          "| HTTP requests a search | CPU ms a search | cores busy | not done |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        mine, base = figures(row), anchors.get(row["clients"])
        ratio = {key: f"{mine[key] / base[key]:.2f}" if base else "-" for key in ("rate", "p50", "p95")}
        requests = 1.0 if row["system"] == ANCHOR else _api_requests(row) / max(1, mine["done"])
        print(f"| {row['system']} | {row['clients']} | {mine['done']} | {mine['rate']:.1f} | {ratio['rate']} | "
              f"{mine['p50']:.0f} | {mine['p95']:.0f} | {ratio['p50']} | {ratio['p95']} | {requests:.2f} | "
              f"{mine['cpu_ms']:.1f} | {mine['cores']:.2f} | {row['not_done']} |")  # fmt: skip
    parts = ("clients", "anchor", *STACK_PARTS)
    print("\n| CPU ms a search | clients | " + " | ".join(f"{part}" for part in parts[1:]) + " | total |")
    print("| --- | ---: | " + " | ".join("---:" for _ in parts[1:]) + " | ---: |")
    for row in rows:
        done = max(1, len(row["latencies"]))
        own = ("clients", "anchor") if row["system"] == ANCHOR else ("clients", *STACK_PARTS)
        cells = [f"{1000 * row['cpu'][part] / done:.1f}" if part in own else "" for part in parts]
        total = sum(row["cpu"][part] for part in own)
        print(f"| {row['system']}, {row['clients']} | " + " | ".join(cells) + f" | {1000 * total / done:.1f} |")
    idle = [sum(row["cpu"][part] for part in STACK_PARTS) / row["wall"] for row in rows if row["system"] == ANCHOR]
    if idle:
        print(f"\n(lookalike's processes, idle beside the anchor's rows, used {max(idle):.3f} cores at most)")
    print("\n| lookalike's web | clients | POST /api/search a search | GET /api/jobs a search | ms a POST | ms a GET |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        if row["system"] == ANCHOR:
            continue
        done = max(1, len(row["latencies"]))
        posts, gets = row["requests"]["POST /api/search"], row["requests"]["GET /api/jobs/<job_id>"]
        post_ms = 1000 * row["web_seconds"]["/api/search"] / max(1, posts)
        get_ms = 1000 * row["web_seconds"]["/api/jobs/<job_id>"] / max(1, gets)
        print(f"| {row['system']} | {row['clients']} | {posts / done:.2f} | {gets / done:.2f} | {post_ms:.1f} | "
              f"{get_ms:.1f} |")  # fmt: skip
    refusals = sum((row["refusals"] for row in rows), Counter())
    if refusals:
        print(f"\n(refused: {', '.join(f'{count} x {why}' for why, count in refusals.most_common())})")


def _api_requests(row: dict) -> float:
    return row["requests"]["POST /api/search"] + row["requests"]["GET /api/jobs/<job_id>"]


def describe(settings: Settings) -> str:
    """The settings a search's cost depends on, as lookalike's processes have them."""
    shown = ("web_threads", "web_waiting", "query_processes", "replicas", "query_batch", "query_wait_ms")
    return ", ".join(f"LOOKALIKE_{name.upper()}={getattr(settings, name)}" for name in shown)


def setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name.startswith("LOOKALIKE_"):
        raise argparse.ArgumentTypeError(f"expected LOOKALIKE_NAME=VALUE, not {text!r}")
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="how long each row runs (default 10)")
    parser.add_argument("--clients", default="1,8,32", help="numbers of clients, comma-separated")
    parser.add_argument("--profile", action="store_true", help="also break a 1-client search with wait into stages")
    parser.add_argument("--profile-searches", type=int, default=200, help="searches each profile step times")
    parser.add_argument("--set", type=setting, action="append", default=[], metavar="LOOKALIKE_NAME=VALUE",
                        help="a setting for lookalike's processes (not the anchor's), repeatable")  # fmt: skip
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="photos (images/*.jpg) and styles.csv")
    args = parser.parse_args()
    levels = [int(clients) for clients in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lookalike-cost-"))
    settings_note = ", ".join(f"{name}={value}" for name, value in args.set) or "default settings"
    photos = sample_photos(args.sample)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {args.model.name}; {len(photos):,} photos; "
          f"{args.seconds:.0f} s a row; {settings_note}", flush=True)  # fmt: skip
    try:
        run(args, work, photos, levels)
    except BaseException:
        print(f"(the logs of the anchor and of lookalike's processes are kept in {work})", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)  # the index, Redis's file and the logs: about 60 MB


def run(args: argparse.Namespace, work: Path, photos: list[Path], levels: list[int]) -> None:
    """The anchor and lookalike started in `work`, every row measured and printed (and the profile), both stopped."""
    anchor_port = free_port()
    anchor = start_anchor(args, anchor_port, work)
    try:
        with EmbeddedRedis(work / "redis") as redis_server:
            env = {"LOOKALIKE_QUERY_PROCESSES": "1", "LOOKALIKE_REPLICAS": "1", **dict(args.set)}
            stack = Stack(redis_server.url, work / "data", args.model, args.sample.parent, **env)
            try:
                start_workers(stack, stack.settings)
                web_port = free_port()
                web_url = stack.start_web(web_port)
                client = Client(stack.settings)
                progress = client.follow(client.start_load(args.sample), timeout=600)["progress"]
                wait_for_anchor(anchor, anchor_port, work)
                parts = {"clients": [os.getpid()], "anchor": [anchor.pid], **stack_processes(stack, redis_server)}
                ports = {ANCHOR: anchor_port, POLLING: web_port, WAITING: web_port}
                print(f"lookalike: {progress['done']:,} photos indexed ({progress['failed']:,} rows of the CSV "
                      f"without one); {describe(stack.settings)}", flush=True)  # fmt: skip
                for system, port in ports.items():
                    run_clients(port, photos, 1, WARM_UP_SECONDS, kind=SYSTEMS[system])
                rows = [measure(system, ports[system], photos, clients, args.seconds, parts, web_url)
                        for clients in levels for system in SYSTEMS]  # fmt: skip
                print_tables(rows)
                if args.profile:
                    from search_profile import profile

                    profile(stack, redis_server, parts, web_port, anchor_port, args)
            finally:
                stack.stop()
    finally:
        anchor.terminate()
        anchor.wait(30)


if __name__ == "__main__":
    main()
