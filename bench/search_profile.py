"""Where a lookalike search's time and CPU go: one client, `wait=10`, broken into stages (`bench/search_cost.py
--profile`, on the stack and the anchor that run started; nothing in the product is changed for it).

1. A timeline: searches one after another through the web with wait=10. Each finished job says when the web
   created its record, when the query process started it and when it finished it (`created`, `started`,
   `finished`, in milliseconds); the client knows when it sent the upload and when the answer came. The same number
   of anchor searches before them, while lookalike idles: what its processes and Redis do idle is subtracted below.
   During both, the CPU each process used (/proc) and the commands Redis ran (INFO commandstats).
2. The parts of each stage, timed in this process by calling what each process calls, one search at a time on the
   same stack: the web's preview and checks, the job record, the message (then `started` on the record tells the
   hop to the query process), the decode, the embedding (the query process's threads), the read round trip to the
   replica and the kNN alone, the finish, the wake of a waiting client, the re-read.
3. The CPU by function of the web and of the query process: cProfile of each run in this process (bench/
   search_cprofile.py).
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis
from anchor import build_catalogue, sample_photos
from search_cprofile import QUERY_FUNCTIONS, WEB_FUNCTIONS, function_costs, print_functions, query_profile, web_profile
from searchers import WAIT_SECONDS, cpu_by_part
from shoppers import K, post_form

from common.images import decode_image, thumbnail_jpeg
from common.model import load_model
from common.vectors import encode_vector
from lookalike.redis_server import EmbeddedRedis
from lookalike.stack import Stack
from protocol import keys
from protocol.client import Client
from protocol.connection import redis_client
from protocol.jobs import Jobs
from protocol.queues import Task
from protocol.readers import ask_reader
from web.service import PREVIEW_SIDE, Service

STAMP_ROUNDING = 0.0005  # a job record's times are cut to the millisecond: half of one, on average
STACK_PARTS = ("web", "query", "replica", "owner, embed", "Redis")
SPREAD = 97  # photos apart from one search to the next, as the shoppers take them
WARM_UP = 5  # searches of each step not counted: a session's first runs, connections made


def stamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp() + STAMP_ROUNDING


def mean_ms(values: list[float]) -> float:
    return 1000 * statistics.fmean(values) if values else float("nan")


@contextmanager
def timed(times: dict[str, list[float]], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    times[name].append(time.perf_counter() - started)


def commandstats(client: redis.Redis) -> tuple[Counter[str], Counter[str]]:
    """Redis's commands so far: calls and microseconds by command."""
    stats = client.info("commandstats")
    calls: Counter[str] = Counter()
    usec: Counter[str] = Counter()
    for name, figures in stats.items():
        command = name.removeprefix("cmdstat_")
        calls[command], usec[command] = figures["calls"], figures["usec"]
    return calls, usec


def timeline(port: int, path: str, fields: dict[str, str], photos: list[Path], searches: int, parts: dict,
             client: redis.Redis) -> dict[str, Any]:  # fmt: skip
    """`searches` searches one after another: each one's stages (from its job record, when it has one), and the CPU
    of each part and Redis's commands over the whole run."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    stages: dict[str, list[float]] = defaultdict(list)
    cpu, commands, started = cpu_by_part(parts), commandstats(client), time.monotonic()
    not_at_once = 0
    for number in range(searches):
        sent = time.time()
        status, body, _ = post_form(connection, path, photos[(SPREAD * number) % len(photos)], fields)
        answered = time.time()
        if status != 200:
            not_at_once += 1  # a 202: the web had no thread free to wait (or a refusal); not timed
            continue
        stages["total"].append(answered - sent)
        if "created" in body:
            created, began, finished = (stamp(body[field]) for field in ("created", "started", "finished"))
            stages["web"].append(created - sent)
            stages["queue"].append(began - created)
            stages["query"].append(finished - began)
            stages["back"].append(answered - finished)
    wall = time.monotonic() - started
    after_cpu, after_commands = cpu_by_part(parts), commandstats(client)
    return {
        "stages": stages, "wall": wall, "not_at_once": not_at_once,
        "cpu": {part: after_cpu[part] - cpu[part] for part in parts},
        "calls": after_commands[0] - commands[0], "usec": after_commands[1] - commands[1],
    }  # fmt: skip


def stage_parts(stack: Stack, photos: list[Path], searches: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Each part of a search timed here, as the process that does it calls it, one search at a time."""
    settings = stack.settings
    client = Client(settings)
    service = Service(settings, client)
    waiter = Jobs(redis_client(settings, WAIT_SECONDS + settings.call_timeout))
    model = load_model(args.model, settings.providers, intra_op_threads=settings.query_threads)
    catalogue = build_catalogue(model, args.sample, settings)  # the anchor's index: its vectors are cached
    times: dict[str, list[float]] = defaultdict(list)
    for number in range(-WARM_UP, searches):
        if number == 0:
            times.clear()
        data = photos[(SPREAD * number) % len(photos)].read_bytes()
        with timed(times, "preview"):
            preview = thumbnail_jpeg(data, PREVIEW_SIDE, settings.max_search_pixels)
        with timed(times, "checks"):
            service.refuse_when_busy()
            service.check_fields({})
            service.searchable()
        with timed(times, "create"):  # a record of its own, finished below: the web's create, alone
            spare = client.jobs.create("search", {"k": K, "filters": {}}, preview)
        with timed(times, "search call"):
            job_id = client.search(data, K, {}, preview)
        published = time.time()
        waiter.wait_until_finished(job_id, WAIT_SECONDS)
        woken = time.time()
        with timed(times, "reread"):
            job = client.jobs.get(job_id)
        times["hop"].append(stamp(job["started"]) - published)
        times["query"].append(stamp(job["finished"]) - stamp(job["started"]))
        times["wake"].append(woken - stamp(job["finished"]))
        with timed(times, "decode"):
            pixels = decode_image(data, model.contract.size, settings.resize, settings.max_search_pixels)
        with timed(times, "embed"):
            vector = model.embed(pixels[np.newaxis])[0]
        queries = [{"vector": encode_vector(vector), "k": K, "filters": {}}]
        with timed(times, "read"):
            ask_reader(client.celery, client.jobs.redis, Task.NEAREST, [model.sha256, settings.resize, queries, 0],
                       settings.search_timeout, settings.max_lag, settings.read_timeout)  # fmt: skip
        with timed(times, "knn"):
            catalogue.index.knn_query(vector, k=K)
        client.jobs.start(spare)
        with timed(times, "finish"):
            client.jobs.finish(spare, job.get("result"))
    return times


def profile(stack: Stack, redis_server: EmbeddedRedis, parts: dict, web_port: int, anchor_port: int,
            args: argparse.Namespace) -> None:  # fmt: skip
    """Print where a 1-client search with wait=10 spends its time, its CPU by process, Redis's commands, and the
    CPU by function of the web and of the query process."""
    photos, searches = sample_photos(args.sample), args.profile_searches
    print(f"\n### Profile: 1 client, wait={WAIT_SECONDS}, {searches} searches a step", flush=True)
    wait_fields = {"k": str(K), "wait": str(WAIT_SECONDS)}

    def searching(count: int) -> dict[str, Any]:
        return timeline(web_port, "/api/search", wait_fields, photos, count, parts, stack.redis)

    anchor = timeline(anchor_port, "/search", {"k": str(K)}, photos, searches, parts, stack.redis)
    mine = searching(searches)
    pieces = stage_parts(stack, photos, searches, args)
    web = web_profile(stack, photos, searches)
    query = query_profile(stack, lambda count: len(searching(count)["stages"]["total"]), searches)
    print_stages(stack, mine, anchor, pieces)
    print_cpu(mine, anchor)
    print_commands(mine, anchor)
    beats = stack.redis.hgetall(keys.WORKERS)
    print(f"\n(heartbeats: {len(beats)} in `{keys.WORKERS}`, {sum(map(len, beats.values())) / 1024:.1f} KiB of JSON, "
          "read whole by every `alive` call)")  # fmt: skip
    print_functions("lookalike's web, in the bench: cProfile, CPU time", web["plain"], web["profiled"],
                    function_costs(web["profiler"], searches, WEB_FUNCTIONS))  # fmt: skip
    if set(web["statuses"]) != {200}:
        print(f"\n(answers of the web in this process: {dict(web['statuses'])})")
    print_functions("lookalike's query process, in the bench: cProfile, its thread's CPU time", query["plain"],
                    query["profiled"], function_costs(query["profiler"], searches, QUERY_FUNCTIONS))  # fmt: skip


def print_stages(stack: Stack, mine: dict, anchor: dict, pieces: dict[str, list[float]]) -> None:
    stage, part = mine["stages"], {name: mean_ms(values) for name, values in pieces.items()}
    web, queue, query, back = (mean_ms(stage[name]) for name in ("web", "queue", "query", "back"))
    total = mean_ms(stage["total"])
    wait_ms = stack.settings.query_wait_ms
    rows = [
        ("**upload sent -> job record created** (the web's request up to `Jobs.create`)", "record - client", web),
        ("preview: decode and 320 px JPEG (`thumbnail_jpeg`)", "timed here", part["preview"]),
        ("busy, field and live-worker checks (`refuse_when_busy`, `check_fields`, `searchable`)", "timed here",
         part["checks"]),
        ("the rest: HTTP and waitress, multipart, Flask", "difference", web - part["preview"] - part["checks"]),
        ("**job record created -> query process started**", "record", queue),
        ("job record (`Jobs.create`)", "timed here", part["create"]),
        ("message encoded and published (`Client.search` less `Jobs.create`)", "timed here",
         part["search call"] - part["create"]),
        (f"broker hop to the query process, its batch wait ({wait_ms} ms), `Jobs.start`",
         "published here -> record", part["hop"]),
        ("**query process: started -> finished**", "record", query),
        ("decode (`decode_image`)", "timed here", part["decode"]),
        (f"embed (onnxruntime, {stack.settings.query_threads} threads)", "timed here", part["embed"]),
        ("read round trip to the replica (`ask_reader`, `nearest`, 1 query)", "timed here", part["read"]),
        ("of which kNN in hnswlib (the same 1,002 photos)", "timed here", part["knn"]),
        ("job finished (`Jobs.finish`)", "timed here", part["finish"]),
        ("the rest: message, compact hits", "difference",
         query - part["decode"] - part["embed"] - part["read"] - part["finish"]),
        ("**job finished -> answer at the client**", "client - record", back),
        ("wake of the waiting request (BLMOVE after the finish)", "timed here", part["wake"]),
        ("job read again (`Jobs.get`)", "timed here", part["reread"]),
        ("the rest: answer, JSON, HTTP and waitress", "difference", back - part["wake"] - part["reread"]),
    ]  # fmt: skip
    print(f"\n| stage (mean of {len(stage['total'])} searches; indented: its parts) | measured | ms | share |")
    print("| --- | --- | ---: | ---: |")
    for label, how, ms in rows:
        indent = "" if label.startswith("**") else "&nbsp;&nbsp;"
        print(f"| {indent}{label} | {how} | {ms:.2f} | {ms / total:.0%} |")
    anchor_total = mean_ms(anchor["stages"]["total"])
    print(f"| **total: upload to answer** (p50 {1000 * statistics.median(stage['total']):.1f}) | client | "
          f"{total:.2f} | 100% |")  # fmt: skip
    print(f"| anchor: upload to answer (p50 {1000 * statistics.median(anchor['stages']['total']):.1f}) | client | "
          f"{anchor_total:.2f} | {anchor_total / total:.0%} |")  # fmt: skip
    print(f"\n(the parts timed here, in the query process's stead, for comparison: query process started -> finished "
          f"{part['query']:.2f} ms on the same searches; {mine['not_at_once']} of the timeline's searches were not "
          "answered in their first request)")  # fmt: skip


def print_cpu(mine: dict, anchor: dict) -> None:
    """CPU ms a search by process; lookalike's processes less what they use idle (measured beside the anchor's)."""
    searches = max(1, len(mine["stages"]["total"]))
    anchors = max(1, len(anchor["stages"]["total"]))
    print("\n| CPU ms a search, 1 client | lookalike, wait=10 | anchor |")
    print("| --- | ---: | ---: |")
    total_mine = total_anchor = 0.0
    for part in ("clients", "anchor", *STACK_PARTS):
        idle_rate = anchor["cpu"][part] / anchor["wall"] if part in STACK_PARTS else 0.0
        ms = 1000 * (mine["cpu"][part] - idle_rate * mine["wall"]) / searches if part != "anchor" else None
        anchor_ms = 1000 * anchor["cpu"][part] / anchors if part in ("clients", "anchor") else None
        total_mine += ms or 0.0
        total_anchor += anchor_ms or 0.0
        print(f"| {part} | {'' if ms is None else f'{ms:.2f}'} | {'' if anchor_ms is None else f'{anchor_ms:.2f}'} |")
    print(f"| total | {total_mine:.2f} | {total_anchor:.2f} |")


def print_commands(mine: dict, anchor: dict, shown: int = 14) -> None:
    """Redis's commands a search, less those lookalike's processes send idle (measured beside the anchor's)."""
    searches = max(1, len(mine["stages"]["total"]))
    scale = mine["wall"] / anchor["wall"]
    calls = {name: (mine["calls"][name] - scale * anchor["calls"][name]) / searches for name in mine["calls"]}
    usec = {name: (mine["usec"][name] - scale * anchor["usec"][name]) / searches for name in mine["usec"]}
    print("\n| Redis command (lookalike, wait=10, 1 client) | calls a search | Redis µs a search |")
    print("| --- | ---: | ---: |")
    for name in sorted(calls, key=lambda name: -calls[name])[:shown]:
        print(f"| {name.upper()} | {calls[name]:.2f} | {usec[name]:.1f} |")
    print(f"| all commands | {sum(calls.values()):.1f} | {sum(usec.values()):.0f} |")
