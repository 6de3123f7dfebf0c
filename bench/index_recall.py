"""hnswlib against exact cosine search: recall@10, queries/s, build time, memory and file size.

    .venv/bin/python bench/index_recall.py real        # the 39,072-image catalogue, shared EfficientNet-Lite0
    .venv/bin/python bench/index_recall.py synthetic --items 1000000 --dim 2048

`real` embeds the catalogue once (cached under --cache) through the worker's decoder and model loader.
Recall is measured on held-out queries (not in the index) against exact search over the same items.
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np

from common.files import file_sha256
from common.images import decode_image
from common.model import load_model

SHARED = Path(os.environ.get("LOOKALIKE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
QUERIES = 1000
K = 10


def catalogue_embeddings(archive: Path, model_path: Path, cache: Path) -> np.ndarray:
    """Embeddings of every image in the archive, computed once per (archive, model) and cached as .npy."""
    cached = cache / f"{file_sha256(archive)[:16]}-{file_sha256(model_path)[:16]}.npy"
    if cached.exists():
        return np.load(cached)
    model = load_model(model_path, ["cpu"], intra_op_threads=os.cpu_count())
    vectors, batch = [], []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                batch.append(decode_image(tar.extractfile(member).read(), model.contract.size))
                if len(batch) == 64:
                    vectors.append(model.embed(np.stack(batch)))
                    batch = []
    if batch:
        vectors.append(model.embed(np.stack(batch)))
    embeddings = np.concatenate(vectors)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(cached, embeddings)
    return embeddings


def clustered(items: int, dim: int, seed: int = 0) -> np.ndarray:
    """Synthetic vectors around 1,000 centres, like product photos grouped by category (float32, in chunks)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    out = np.empty((items, dim), dtype=np.float32)
    for start in range(0, items, 50_000):
        stop = min(items, start + 50_000)
        out[start:stop] = centres[rng.integers(0, 1000, stop - start)]
        out[start:stop] += rng.normal(scale=0.6, size=(stop - start, dim)).astype(np.float32)
    return out


def exact_top_k(index_vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """Brute-force cosine top-k over unit vectors, and the queries/s of the tutorial's way (one at a time)."""
    found = np.empty((len(queries), K), dtype=np.int64)
    for start in range(0, len(queries), 100):
        scores = index_vectors @ queries[start : start + 100].T
        top = np.argpartition(-scores, K, axis=0)[:K].T
        for row, candidates in enumerate(top, start=start):
            found[row] = candidates[np.argsort(-scores[candidates, row - start])]
    timed = queries[:20]
    started = time.perf_counter()
    for query in timed:
        np.argpartition(-(index_vectors @ query), K)[:K]
    return found, len(timed) / (time.perf_counter() - started)


def run(vectors: np.ndarray, settings: list[tuple[int, int]], efs: list[int], label: str) -> None:
    """`vectors` come in no particular order: the first QUERIES are held out as queries. Normalised in place
    (no copies: at 1M x 2048 one copy is 8 GB)."""
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries, items = vectors[:QUERIES].copy(), vectors[QUERIES:]
    truth, exact_qps = exact_top_k(items, queries)
    print(f"\n{label}: {len(items):,} items x {items.shape[1]}, {QUERIES} held-out queries, k={K}, "
          f"{os.cpu_count()} cores\n")  # fmt: skip
    print("| index | build s | inserts/s | ef | recall@10 | queries/s | file MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| exact numpy (brute force) | - | - | - | 1.000 | {exact_qps:.0f} | {items.nbytes / 1e6:.0f} |")
    for m, ef_construction in settings:
        index = hnswlib.Index(space="cosine", dim=items.shape[1])
        index.init_index(max_elements=len(items), M=m, ef_construction=ef_construction, allow_replace_deleted=True)
        index.set_num_threads(os.cpu_count())
        started = time.perf_counter()
        index.add_items(items, np.arange(len(items)))
        build = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "index.bin"
            index.save_index(str(path))
            size = path.stat().st_size
        index.set_num_threads(1)  # the service queries from one owner thread
        for ef in efs:
            index.set_ef(ef)
            started = time.perf_counter()
            labels = np.vstack([index.knn_query(query, k=K)[0] for query in queries])
            qps = len(queries) / (time.perf_counter() - started)
            recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(labels, truth, strict=True)])
            print(f"| hnswlib M={m} ef_construction={ef_construction} | {build:.1f} | {len(items) / build:.0f} | "
                  f"{ef} | {recall:.3f} | {qps:.0f} | {size / 1e6:.0f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["real", "synthetic"])
    parser.add_argument("--archive", type=Path, default=SHARED / "data" / "fashion-catalog.tar.gz")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "efficientnet_lite0_max.onnx")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lookalike-bench")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args()
    if args.dataset == "real":
        vectors = catalogue_embeddings(args.archive, args.model, args.cache)
        vectors = vectors[np.random.default_rng(1).permutation(len(vectors))]  # tar order groups similar items
        run(vectors, [(16, 100), (32, 200)], [32, 64, 128, 256], f"{args.archive.name}, {args.model.name}")
    else:
        run(clustered(args.items, args.dim), [(16, 100)], [64, 128, 256], "synthetic clustered vectors")


if __name__ == "__main__":
    main()
