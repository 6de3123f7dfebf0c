"""Search latency through the web, upload to result, for 1, 8 and 32 concurrent clients, idle and during a load.

    .venv/bin/python bench/search_latency.py [--seconds 20] [--model M.onnx]

Starts its own Redis, the workers `lookalike up` starts and `lookalike web` (waitress) on this machine, loads the
1,002 shared sample images, then runs clients that each POST a catalogue photo to /api/search and poll
/api/jobs/<id> the way the results page does (after 50 ms, then 1.5x longer each time) until the result is
there. Then it starts a load of the 39,072-image shared catalogue and runs the same clients while it loads.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from catalog_load import SHARED, percentiles

from lookalike.redis_server import EmbeddedRedis, free_port
from lookalike.stack import Stack
from lookalike.up import start_workers
from protocol.client import Client

CONCURRENCY = (1, 8, 32)
FIRST_POLL, BACKOFF, LONGEST_POLL = 0.05, 1.5, 2.0  # as web/static/app.js polls
PATIENCE = 120  # seconds a client follows one job before it counts the search as failed
FAILED = -1  # the status under which a client counts an accepted search that did not end done


class Budget:
    """Uploads left to make, shared by every client of a run."""

    def __init__(self, uploads: int | None) -> None:
        self.left = uploads
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left is None:
                return True
            if self.left <= 0:
                return False
            self.left -= 1
            return True


class Shopper(threading.Thread):
    """One client: search, follow the job to its result, repeat until `until` (monotonic) or the budget is spent.

    A refused upload waits as its Retry-After says; `refusals` counts each answer but 202 by status and error
    code ("no reason" when the body has none, "no Retry-After" when a 429/503 lacks it). An accepted search that
    ends failed, can't be followed (its job answers other than 200) or takes longer than PATIENCE counts as
    FAILED; a client that breaks off (a dropped connection) counts its upload as FAILED too.
    """

    def __init__(
        self, port: int, photos: list[Path], until: float, offset: int, budget: Budget | None = None,
        host: str = "127.0.0.1",
    ) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.host, self.port, self.photos, self.until, self.offset = host, port, photos, until, offset
        self.budget = budget or Budget(None)
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.refusals: Counter[str] = Counter()

    def run(self) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        made = 0
        while time.monotonic() < self.until and self.budget.take():
            photo = self.photos[(self.offset + made) % len(self.photos)]
            made += 1
            started = time.perf_counter()
            try:
                status, body, headers = post_image(connection, photo)
                self.statuses[status] += 1
                if status != 202:
                    self.refusals[f"{status} {body.get('error', {}).get('code', 'no reason')}"] += 1
                    if status in (429, 503) and "Retry-After" not in headers:
                        self.refusals[f"{status} no Retry-After"] += 1
                    time.sleep(min(float(headers.get("Retry-After", 0.5)), 5.0))
                    continue
                if self.follow(connection, body["status_url"]):
                    self.latencies.append(time.perf_counter() - started)
                    continue
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                connection.close()  # the next request opens a new connection
            self.statuses[FAILED] += 1

    @staticmethod
    def follow(connection: http.client.HTTPConnection, status_url: str) -> bool:
        """Poll a search job like the results page does; True when it ends done within PATIENCE seconds."""
        delay, deadline = FIRST_POLL, time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * BACKOFF, LONGEST_POLL)
            connection.request("GET", status_url)
            response = connection.getresponse()
            job = json.loads(response.read())
            if response.status != 200:
                return False
            if job["state"] in ("done", "failed"):
                return job["state"] == "done"
        return False


def post_image(connection: http.client.HTTPConnection, photo: Path) -> tuple[int, dict, dict[str, str]]:
    """POST a photo to /api/search: the status, the JSON body (or {} when it isn't JSON) and the headers."""
    boundary = uuid.uuid4().hex
    body = b"".join([
        f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n10\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{photo.name}"\r\n'.encode(),
        b"Content-Type: image/jpeg\r\n\r\n", photo.read_bytes(), f"\r\n--{boundary}--\r\n".encode(),
    ])  # fmt: skip
    connection.request("POST", "/api/search", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = connection.getresponse()
    data = response.read()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {}
    return response.status, answer, dict(response.getheaders())


def run_clients(
    port: int, photos: list[Path], clients: int, seconds: float, uploads: int | None = None, host: str = "127.0.0.1"
) -> tuple[list[float], Counter[int], Counter[str]]:
    """`clients` shoppers for `seconds` (or until `uploads` uploads): latencies, answers by status, refusals."""
    until, budget = time.monotonic() + seconds, Budget(uploads)
    shoppers = [Shopper(port, photos, until, offset=97 * n, budget=budget, host=host) for n in range(clients)]
    for shopper in shoppers:
        shopper.start()
    for shopper in shoppers:
        shopper.join()
    statuses: Counter[int] = Counter()
    refusals: Counter[str] = Counter()
    for shopper in shoppers:
        statuses.update(shopper.statuses)
        refusals.update(shopper.refusals)
    return [value for shopper in shoppers for value in shopper.latencies], statuses, refusals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="how long each concurrency level runs")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "efficientnet_lite0_max.onnx")
    parser.add_argument("--archive", type=Path, default=SHARED / "data" / "fashion-catalog.tar.gz")
    parser.add_argument("--metadata", type=Path, default=SHARED / "data" / "fashion" / "styles.csv")
    args = parser.parse_args()

    photos = sorted((SHARED / "data" / "fashion" / "images").glob("*.jpg"))
    work = Path(tempfile.mkdtemp(prefix="lookalike-latency-"))
    rows = []
    with EmbeddedRedis(work / "redis") as redis_server:
        stack = Stack(redis_server.url, work / "data", args.model, SHARED / "data")
        try:
            start_workers(stack, stack.settings)
            port = free_port()
            stack.start_web(port)
            client = Client(stack.settings)
            client.follow(client.start_load(SHARED / "data" / "fashion"), timeout=600)
            for clients in CONCURRENCY:
                rows.append(("idle", clients, *run_clients(port, photos, clients, args.seconds)[:2]))
            load_id = client.start_load(args.archive, args.metadata)
            time.sleep(5)  # past the unpacking, into embedding
            for clients in CONCURRENCY:
                rows.append(("during a catalogue load", clients, *run_clients(port, photos, clients, args.seconds)[:2]))
            indexed = client.jobs.get(load_id, error_limit=0)["progress"]["done"]
        finally:
            stack.stop()

    idle_p95 = {clients: _p95(latencies) for state, clients, latencies, _ in rows if state == "idle"}
    print(f"\n{os.cpu_count()} cores, {args.model.name}, {args.seconds:.0f} s per row; {indexed:,} catalogue items "
          "indexed during the load rows")  # fmt: skip
    print("\n| system | clients | searches | p50 ms | p95 ms | p99 ms | searches/s | p95 vs idle | not 202 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for state, clients, latencies, statuses in rows:
        refused = sum(count for status, count in statuses.items() if status != 202) or 0
        ratio = _p95(latencies) / idle_p95[clients]
        print(f"| {state} | {clients} | {percentiles(latencies)} | {len(latencies) / args.seconds:.1f} | "
              f"{ratio:.2f} | {refused} |")  # fmt: skip


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


if __name__ == "__main__":
    main()
