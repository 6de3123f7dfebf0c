"""Searches that scale out: query processes and replicas, kNN at one replica, and micro-batching.

    .venv/bin/python bench/search_scaling.py [--seconds 20] [--configs 1x0,2x0,1x1,2x1] [--providers cpu]

1. End to end through the web: for each configuration (query processes x replicas) a stack of its own on this
   machine (Redis, the index owner, the replicas, the query processes, an embed worker, `lookalike web`), the
   1,002 sample photos loaded; then 1, 8 and 32 clients search (POST /api/search, poll the job as the results page
   does) idle and while the 39,072-image catalogue loads. Prints searches/s, p50/p95/p99 and the mean batch the
   query processes formed.
2. kNN alone at one replica: the 39,072 catalogue's EfficientNet-Lite0 vectors (embedded once, cached), 1,000 held
   out as queries, top-10 at ef 128; in this process on one core (`IndexReader.nearest`, one query a call), and
   asked directly of one replica process (`protocol.readers.ask_replicas`).
3. Micro-batching: query images/s of the model at batch 1 against larger batches, on the providers asked for
   (`--providers cuda` on an NVIDIA machine: batch 1/8/32/64, and the provider really used).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from catalog_load import SHARED, percentiles
from index_recall import catalogue_embeddings
from shoppers import run_clients

from common.images import decode_image
from common.model import load_model
from common.settings import Settings
from common.vectors import encode_vector
from lookalike.redis_server import EmbeddedRedis, free_port
from lookalike.stack import Stack
from lookalike.up import start_workers
from protocol.client import Client
from protocol.heartbeats import Role
from protocol.queues import Task
from protocol.readers import ask_replicas
from worker.index import IndexParams, Item, Photo, VectorIndex
from worker.reader import IndexReader
from worker.snapshots import ModelIdentity, write_snapshot
from worker.state import IndexState

CONCURRENCY = (1, 8, 32)
TICK = os.sysconf("SC_CLK_TCK")
HELD_OUT = 1000
K, EF = 10, 128
BATCHES = (1, 8, 16, 32, 64)
QUERY_BATCH = 16


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes have used so far; a process gone since counts nothing."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def machine_pids(stack: Stack, redis_server: EmbeddedRedis) -> tuple[list[int], list[int]]:
    """(every process of the run: the stack's, their pool children, Redis and this one's clients; the query ones)"""
    queries = [process.pid for name, process in stack.processes.items() if name.startswith("query")]
    every = [redis_server.process.pid, os.getpid()]
    for name, process in stack.processes.items():
        every += [process.pid, *stack.pool_children(name)]
    return every, queries


def batching(stack: Stack) -> tuple[int, int]:
    """(batches, searches) the live query processes have embedded so far."""
    beats = stack.heartbeat(Role.QUERY, since=time.time() - 30)
    return sum(beat.get("batches", 0) for beat in beats), sum(beat.get("searches", 0) for beat in beats)


def end_to_end(args: argparse.Namespace, queries: int, replicas: int, work: Path) -> list[dict]:
    """Every row of one configuration: idle, then during the catalogue load, at each concurrency."""
    photos = sorted((SHARED / "data" / "fashion" / "images").glob("*.jpg"))
    config = f"{queries} query, {replicas} replica{'s' * (replicas != 1)}"
    rows = []
    with EmbeddedRedis(work / "redis") as redis_server:
        env = {"LOOKALIKE_QUERY_PROCESSES": str(queries), "LOOKALIKE_REPLICAS": str(replicas)}
        stack = Stack(redis_server.url, work / "data", args.model, SHARED / "data", **env)
        try:
            start_workers(stack, stack.settings)
            port = free_port()
            stack.start_web(port)
            client = Client(stack.settings)
            client.follow(client.start_load(SHARED / "data" / "fashion"), timeout=600)

            def measure(state: str) -> None:
                every, query_pids = machine_pids(stack, redis_server)
                for clients in CONCURRENCY:
                    before, cpu_before, query_before = batching(stack), cpu_seconds(every), cpu_seconds(query_pids)
                    started = time.monotonic()
                    latencies, statuses, _ = run_clients(port, photos, clients, args.seconds)
                    wall = time.monotonic() - started
                    after = batching(stack)
                    rows.append({
                        "config": config, "state": state, "clients": clients, "latencies": latencies,
                        "mean_batch": (after[1] - before[1]) / max(1, after[0] - before[0]),
                        "refused": sum(count for status, count in statuses.items() if status != 202),
                        "cores": (cpu_seconds(every) - cpu_before) / wall,
                        "query_cores": (cpu_seconds(query_pids) - query_before) / wall,
                    })  # fmt: skip

            measure("idle")
            load_id = client.start_load(args.archive, args.metadata)
            embedding = lambda: client.jobs.get(load_id, error_limit=0)["progress"]["done"] > 0  # noqa: E731
            stack.wait_for(embedding, "the load to be embedding", timeout=300)
            measure("during a catalogue load")
            rows[-1]["indexed"] = client.jobs.get(load_id, error_limit=0)["progress"]["done"]
        finally:
            stack.stop()
    return rows


def knn_alone(args: argparse.Namespace, work: Path) -> list[tuple[str, float]]:
    """Queries/s of top-10 by vector at one replica: in this process on one core, and asked directly of it."""
    vectors = catalogue_embeddings(args.archive, args.model, args.cache)
    queries, catalogue = vectors[:HELD_OUT], vectors[HELD_OUT:]
    model = load_model(args.model, ["cpu"], intra_op_threads=1)
    identity = ModelIdentity(model.sha256, model.contract.dimension, "stretch")
    params = IndexParams(dim=model.contract.dimension, ef=EF)
    entries = [(f"p{number}", Item({}, [Photo(str(number))])) for number in range(len(catalogue))]
    index = VectorIndex.build(params, entries, catalogue)
    state = IndexState(identity, params)
    state.index = index
    reader = IndexReader(state)
    messages = [[{"vector": encode_vector(query), "k": K, "filters": {}}] for query in queries]
    index.hnsw.set_num_threads(1)
    started = time.perf_counter()
    for message in messages:
        reader.nearest(identity.sha256, "stretch", message, 0)
    rows = [(f"in one process, one core ({len(catalogue):,} items, ef {EF}, top-{K})", len(messages) /
             (time.perf_counter() - started))]  # fmt: skip

    index_dir = work / "knn" / "index"
    index_dir.mkdir(parents=True)
    write_snapshot(index_dir, "bench", len(catalogue), identity, index, None)
    with EmbeddedRedis(work / "knn" / "redis") as redis_server:
        stack = Stack(redis_server.url, work / "knn" / "data", args.model, SHARED / "data",
                      LOOKALIKE_INDEX_DIR=str(index_dir))  # fmt: skip
        try:
            stack.start("index")
            stack.start("replica", "replica-1")
            client = Client(stack.settings)
            for threads in (1, 8):
                rows.append((f"asked directly of one replica, {threads} caller{'s' * (threads > 1)}, one "
                             "query a message", through_queue(client, identity, messages, threads)))  # fmt: skip
            queries_each = [message[0] for message in messages]
            batched = [queries_each[start : start + QUERY_BATCH] for start in range(0, len(messages), QUERY_BATCH)]
            rows.append((f"asked directly of one replica, 8 callers, {QUERY_BATCH} queries a message (as "
                         "query processes send a batch)", through_queue(client, identity, batched, 8)))  # fmt: skip
        finally:
            stack.stop()
    return rows


def through_queue(client: Client, identity: ModelIdentity, messages: list, threads: int) -> float:
    """Queries/s of `nearest` messages sent from `threads` callers, each waiting for its answer."""

    def ask(share: list) -> None:
        for message in share:
            answer = ask_replicas(client.jobs.redis, Task.NEAREST, [identity.sha256, "stretch", message, 0], 30)
            assert answer is not None and "answers" in answer

    shares = [messages[number::threads] for number in range(threads)]
    callers = [threading.Thread(target=ask, args=(share,)) for share in shares]
    started = time.perf_counter()
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    return sum(len(message) for message in messages) / (time.perf_counter() - started)


def micro_batching(args: argparse.Namespace) -> tuple[str, list[tuple[int, float]]]:
    """Images/s of the query processes' model at each batch size, on the providers asked for."""
    model = load_model(args.model, args.providers.split(","), intra_op_threads=os.cpu_count())
    photos = sorted((SHARED / "data" / "fashion" / "images").glob("*.jpg"))[: max(BATCHES) * 2]
    pixels = np.stack([decode_image(photo.read_bytes(), model.contract.size) for photo in photos])
    rows = []
    for batch in BATCHES:
        model.embed(pixels[:batch])  # warm up this shape
        best = 0.0
        for _ in range(3):
            started, done = time.perf_counter(), 0
            while time.perf_counter() - started < 2.0:
                model.embed(pixels[:batch])
                done += batch
            best = max(best, done / (time.perf_counter() - started))
        rows.append((batch, best))
    return model.provider, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="how long each concurrency level runs")
    parser.add_argument("--configs", default="1x0,2x0,1x1,2x1", help="query processes x replicas, comma-separated")
    parser.add_argument("--providers", default="cpu", help="onnxruntime providers of the micro-batching rows")
    parser.add_argument("--skip-end-to-end", action="store_true", help="only the kNN and micro-batching sections")
    parser.add_argument("--end-to-end-only", action="store_true", help="only the searches through the web")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "efficientnet_lite0_max.onnx")
    parser.add_argument("--archive", type=Path, default=SHARED / "data" / "fashion-catalog.tar.gz")
    parser.add_argument("--metadata", type=Path, default=SHARED / "data" / "fashion" / "styles.csv")
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "output" / "cache")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lookalike-scaling-"))
    print(f"{os.cpu_count()} cores, {args.model.name}, {args.seconds:.0f} s per row; "
          f"{Settings.from_env().query_batch} searches per batch at most", flush=True)  # fmt: skip

    if not args.skip_end_to_end:
        rows = []
        for config in args.configs.split(","):
            queries, replicas = map(int, config.split("x"))
            rows += end_to_end(args, queries, replicas, work / config)
        print_end_to_end(rows, args.seconds)
    if args.end_to_end_only:
        return
    print("\n| kNN alone (searches by vector) | queries/s |\n| --- | ---: |")
    for name, rate in knn_alone(args, work):
        print(f"| {name} | {rate:,.0f} |")
    provider, batches = micro_batching(args)
    print(f"\n| micro-batching: batch ({provider}) | images/s | vs batch 1 |\n| ---: | ---: | ---: |")
    for batch, rate in batches:
        print(f"| {batch} | {rate:,.1f} | {rate / batches[0][1]:.2f} |")


def print_end_to_end(rows: list[dict], seconds: float) -> None:
    """One row per configuration, system state and concurrency; ratios against 1 query process with as many
    replicas, and against the same row idle."""
    base = {(row["config"], row["state"], row["clients"]): len(row["latencies"]) for row in rows}
    idle_p95 = {(row["config"], row["clients"]): _p95(row["latencies"]) for row in rows if row["state"] == "idle"}
    print("\n| configuration | system | clients | searches | p50 ms | p95 ms | p99 ms | searches/s | vs 1 query, "
          "same replicas | p95 vs idle | mean batch | cores busy (query processes) | not 202 |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        one_query = row["config"].replace(row["config"].split(" query")[0], "1", 1)
        reference = base.get((one_query, row["state"], row["clients"]), 0)
        ratio = len(row["latencies"]) / reference if reference else float("nan")
        p95_ratio = _p95(row["latencies"]) / idle_p95[row["config"], row["clients"]]
        print(f"| {row['config']} | {row['state']} | {row['clients']} | {percentiles(row['latencies'])} | "
              f"{len(row['latencies']) / seconds:.1f} | {ratio:.2f} | {p95_ratio:.2f} | "
              f"{row['mean_batch']:.1f} | {row['cores']:.2f} ({row['query_cores']:.2f}) | "
              f"{row['refused']} |")  # fmt: skip
    indexed = [row.get("indexed") for row in rows if row.get("indexed") is not None]
    print(f"\n(catalogue items indexed during each configuration's load rows: {', '.join(f'{n:,}' for n in indexed)})")


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan")


if __name__ == "__main__":
    main()
