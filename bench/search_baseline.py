"""The tutorial's search against lookalike's: a cosine matrix of all pairs, then a sort, versus one hnswlib query.

    .venv/bin/python bench/search_baseline.py [--sizes 1000 10000 39072]

The tutorial computes `1 - sklearn.metrics.pairwise_distances(embeddings, metric="cosine")` over the whole
catalogue (an n x n matrix) and answers "top 5 like item i" by sorting row i. Each size runs in a process of its
own (peak memory is per process); a size whose two float32 matrices (the distances and `1 - distances`) would
take more than 60 % of the memory available is not attempted, and a process that dies on the way is reported.
The vectors are the 39,072-image catalogue embedded by the shared EfficientNet-Lite0 (cached by
bench/index_recall.py).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import hnswlib
import numpy as np
from index_recall import SHARED, catalogue_embeddings

QUERIES = 100
K = 5
HEADROOM = 0.6  # of the memory available: what the tutorial's matrices may take before we stop


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def tutorial(vectors: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """The all-pairs matrix (timed, with the process's peak memory), then top-K by sorting a row per query."""
    from sklearn.metrics import pairwise_distances

    started = time.perf_counter()
    similarity = 1 - pairwise_distances(vectors, metric="cosine")
    build = time.perf_counter() - started
    started = time.perf_counter()
    top = [np.argsort(similarity[row])[::-1][1 : K + 1] for row in queries]
    query = (time.perf_counter() - started) / len(queries)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"build": build, "query": query, "peak": peak, "top": np.array(top)}


def lookalike(vectors: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """hnswlib with the service's defaults (M=16, ef_construction=100, ef=128), one query at a time."""
    started = time.perf_counter()
    index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=16, ef_construction=100)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(128)
    build = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        index.save_index(f"{folder}/index.bin")
        size = Path(f"{folder}/index.bin").stat().st_size
    started = time.perf_counter()
    top = [index.knn_query(vectors[row : row + 1], k=K + 1)[0][0][1:] for row in queries]
    query = (time.perf_counter() - started) / len(queries)
    return {"build": build, "query": query, "size": size, "top": np.array(top)}


def one_size(vectors: np.ndarray, queries: np.ndarray) -> tuple[dict, dict]:
    return tutorial(vectors, queries), lookalike(vectors, queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 39072])
    parser.add_argument("--archive", type=Path, default=SHARED / "data" / "fashion-catalog.tar.gz")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "efficientnet_lite0_max.onnx")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lookalike-bench")
    args = parser.parse_args()
    everything = catalogue_embeddings(args.archive, args.model, args.cache).astype(np.float32)
    queries = np.random.default_rng(0).choice(min(args.sizes), QUERIES, replace=False)

    print(f"\n{len(everything):,} catalogue embeddings of {everything.shape[1]} dimensions; top-{K} of "
          f"{QUERIES} catalogue items each\n")  # fmt: skip
    print("| items | tutorial: all-pairs matrix, s | its peak memory, GB | tutorial: sort a row, ms | "
          "hnswlib build, s | hnswlib index, GB | hnswlib query, ms | top-5 agreement |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        vectors = everything[:size]
        # the float32 matrix and `1 - matrix` exist at once
        needed = 2 * size * size * vectors.itemsize
        if needed > HEADROOM * available_bytes():
            print(f"| {size:,} | not attempted: needs ~{needed / 1e9:.1f} GB, {available_bytes() / 1e9:.1f} GB "
                  "available | | | | | | |")  # fmt: skip
            continue
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                baseline, ours = pool.submit(one_size, vectors, queries).result()
        except BrokenProcessPool:  # killed by the kernel or crashed inside the BLAS on the huge matrix
            print(f"| {size:,} | the process died building the {size:,} x {size:,} matrix (~{needed / 1e9:.1f} GB) "
                  "| | | | | | |")  # fmt: skip
            continue
        agreement = np.mean([len(set(a) & set(b)) / K for a, b in zip(baseline["top"], ours["top"], strict=True)])
        tutorial_row = f"{baseline['build']:.2f} | {baseline['peak'] / 1e9:.2f} | {baseline['query'] * 1e3:.2f}"
        ours_row = f"{ours['build']:.2f} | {ours['size'] / 1e9:.3f} | {ours['query'] * 1e3:.3f}"
        print(f"| {size:,} | {tutorial_row} | {ours_row} | {agreement:.3f} |")


if __name__ == "__main__":
    main()
