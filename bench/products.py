"""Products, not photos: the same products indexed with 3 photos each against 1, on search quality and on cost.

    .venv/bin/python bench/products.py [--products 2000] [--catalog PATH] [--model PATH] [--seed 0]

No real catalogue has several photos per product here, so they are made: N real products (a photo and its
articleType from styles.csv, drawn with --seed from the 39,072-image archive, else the 1,002 sample) each get 4
views of their one photo made with PIL (a random resized crop keeping 60-95% of the area, a mirror half the time, a
turn within +-12 degrees on white, brightness and contrast within +-15%), each saved as JPEG 90 and decoded as the
service decodes a photo. Views 1-3 are the product's catalogue photos; view 4 is its query, a photo the catalogue
doesn't hold. The embeddings are cached under bench/output/cache, so a second run embeds nothing.

1. Quality: the service's VectorIndex (LOOKALIKE_HNSW_* settings) with view 1 only, and with views 1-3; each query
   asks for the 5 best products: articleType precision@5, its own product first and in the top 5, top 5s that name
   a product twice (none may), and recall@5 of products against exact search (every photo, a product its best).
2. Cost: p50 and p95 of `search(query, 5)` in this process on one thread, after a warm-up; the index's memory
   (its hnswlib file) and its photos.

Exits 1 if the 3-photo precision@5 is below the 1-photo one by more than 0.005, or a top 5 names a product twice.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from chaos import cpu_model
from PIL import Image, ImageEnhance

from common.files import file_sha256
from common.images import DEFAULT_MAX_PIXELS, WHITE, ResizePolicy, decode_image
from common.model import EmbeddingModel, load_model
from common.settings import CORES, Settings
from common.vectors import unit_rows
from worker.index import IndexParams, Item, Photo, VectorIndex

SHARED = Path(os.environ.get("LOOKALIKE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
ARCHIVE = SHARED / "data" / "fashion-catalog.tar.gz"
SAMPLE = SHARED / "data" / "fashion"
LABEL = "articleType"
VIEWS = 4  # views 1-3: the product's catalogue photos; the last: its query
QUERY_VIEW = VIEWS - 1
K = 5
WARM_UP = 100  # searches before the timed ones
EMBED_BATCH = 64
EXACT_CHUNK = 256  # queries scored at once by exact search
CROP_AREA = (0.60, 0.95)
CROP_ASPECT = (3 / 4, 4 / 3)  # the crop's aspect ratio against the photo's
TURN_DEGREES = 12
JITTER = 0.15  # brightness and contrast
JPEG_QUALITY = 90
MAX_PRECISION_DROP = 0.005


@dataclass
class Products:
    """The products drawn: their ids, labels and every view's embedding, `(products, VIEWS, dimension)`."""

    ids: list[str]
    labels: list[str]
    vectors: np.ndarray


@dataclass
class Measured:
    """One index's figures: quality against the queries and against exact search, and its cost."""

    photos: int
    precision: float
    same_first: float
    same_top: float
    named_twice: int
    recall: float
    p50_ms: float
    p95_ms: float
    mib: float


def read_labels(metadata: Path) -> dict[str, str]:
    """Each product id's articleType, from styles.csv (empty or NA cells left out)."""
    with metadata.open(newline="") as file:
        return {row["id"]: row[LABEL] for row in csv.DictReader(file) if row[LABEL] not in ("", "NA")}


def catalogue_photos(catalog: Path) -> dict[str, bytes]:
    """Every .jpg of a folder (any depth) or a tar archive, by its name without the suffix (the product id)."""
    if catalog.is_dir():
        return {path.stem: path.read_bytes() for path in sorted(catalog.rglob("*.jpg"))}
    with tarfile.open(catalog) as tar:
        return {Path(member.name).stem: tar.extractfile(member).read()
                for member in tar if member.isfile() and member.name.endswith(".jpg")}  # fmt: skip


def draw_products(photos: dict[str, bytes], labels: dict[str, str], count: int, seed: int) -> list[str]:
    """`count` ids (all, if fewer) drawn at random by `seed` among the labelled photos, in id order."""
    labelled = sorted(item_id for item_id in photos if item_id in labels)
    chosen = np.random.default_rng(seed).choice(len(labelled), size=min(count, len(labelled)), replace=False)
    return [labelled[number] for number in sorted(chosen)]


def make_view(image: Image.Image, rng: np.random.Generator) -> bytes:
    """One new photo of `image` as JPEG: cropped and resized back, maybe mirrored, turned, lit differently."""
    width, height = image.size
    area = rng.uniform(*CROP_AREA) * width * height
    aspect = np.exp(rng.uniform(*np.log(CROP_ASPECT))) * width / height
    crop_width, crop_height = np.sqrt(area * aspect), np.sqrt(area / aspect)
    if crop_width > width:  # keep the area: what the width loses, the height gains (area < width x height)
        crop_width, crop_height = width, area / width
    elif crop_height > height:
        crop_width, crop_height = area / height, height
    crop_width, crop_height = max(1, round(crop_width)), max(1, round(crop_height))
    left, top = rng.integers(0, width - crop_width + 1), rng.integers(0, height - crop_height + 1)
    view = image.crop((left, top, left + crop_width, top + crop_height)).resize(image.size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = view.rotate(rng.uniform(-TURN_DEGREES, TURN_DEGREES), Image.Resampling.BILINEAR, fillcolor=WHITE)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    out = io.BytesIO()
    view.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def product_views(item_id: str, photo: bytes, seed: int) -> list[bytes]:
    """The VIEWS photos of one product; the same for a product whatever else is drawn."""
    rng = np.random.default_rng([seed, zlib.crc32(item_id.encode())])
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    return [make_view(image, rng) for _ in range(VIEWS)]


def decoded_views(ids: list[str], photos: dict[str, bytes], size: tuple[int, int], seed: int) -> Iterator[np.ndarray]:
    """Every view of every product, product by product, decoded as the service decodes a photo."""
    for item_id in ids:
        for view in product_views(item_id, photos[item_id], seed):
            yield decode_image(view, size, ResizePolicy.STRETCH, max_pixels=DEFAULT_MAX_PIXELS)


def embed_views(model: EmbeddingModel, ids: list[str], photos: dict[str, bytes], seed: int) -> np.ndarray:
    """`(products, VIEWS, dimension)` embeddings, in batches of EMBED_BATCH."""
    vectors, batch = [], []
    for pixels in decoded_views(ids, photos, model.contract.size, seed):
        batch.append(pixels)
        if len(batch) == EMBED_BATCH:
            vectors.append(model.embed(np.stack(batch)))
            batch = []
    if batch:
        vectors.append(model.embed(np.stack(batch)))
    return np.concatenate(vectors).reshape(len(ids), VIEWS, -1)


def cached_products(args: argparse.Namespace) -> Products:
    """The drawn products and their views' embeddings, from the cache when the same catalogue photos, model and
    seed were embedded before."""
    photos, labels = catalogue_photos(args.catalog), read_labels(args.metadata)
    ids = draw_products(photos, labels, args.products, args.seed)
    key = hashlib.sha256(f"{file_sha256(args.model)}:{args.seed}".encode())
    for item_id in ids:
        key.update(f":{item_id}:{hashlib.sha256(photos[item_id]).hexdigest()}".encode())
    cached = args.cache / f"products-{args.catalog.name}-{len(ids)}-seed{args.seed}-{key.hexdigest()[:16]}.npz"
    if cached.exists():
        vectors = np.load(cached)["vectors"]
        print(f"{len(ids):,} products: embeddings from {cached}", file=sys.stderr)
    else:
        started = time.perf_counter()
        vectors = embed_views(load_model(args.model, ["cpu"], intra_op_threads=CORES), ids, photos, args.seed)
        print(f"{len(ids):,} products: {vectors.shape[0] * VIEWS:,} views made and embedded in "
              f"{time.perf_counter() - started:.0f} s, cached in {cached}", file=sys.stderr)  # fmt: skip
        args.cache.mkdir(parents=True, exist_ok=True)
        np.savez(cached, vectors=vectors)
    return Products(ids, [labels[item_id] for item_id in ids], vectors)


def build_index(params: IndexParams, products: Products, photos_each: int) -> VectorIndex:
    """The service's index of every product with its first `photos_each` views as its photos."""
    entries = [(item_id, Item({LABEL: label}, [Photo(None, f"{item_id}/{view + 1}") for view in range(photos_each)]))
               for item_id, label in zip(products.ids, products.labels, strict=True)]  # fmt: skip
    return VectorIndex.build(params, entries, products.vectors[:, :photos_each].reshape(-1, params.dim))


def exact_products(photos: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Each query's K best products (their places) by brute force over `photos` `(products, photos, dimension)`,
    unit rows: a product scores its best photo's cosine."""
    count, photos_each, dimension = photos.shape
    flat = photos.reshape(-1, dimension)
    best = []
    for start in range(0, len(queries), EXACT_CHUNK):
        scores = (queries[start : start + EXACT_CHUNK] @ flat.T).reshape(-1, count, photos_each).max(axis=2)
        best.append(np.argsort(-scores, axis=1, kind="stable")[:, :K])
    return np.concatenate(best)


def timed_searches(index: VectorIndex, queries: np.ndarray) -> tuple[list[list[str]], list[float]]:
    """Each query's K best products' ids and the seconds its search took, one thread, after WARM_UP searches."""
    index.hnsw.set_num_threads(1)
    for query in queries[:WARM_UP]:
        index.search(query, K)
    found, seconds = [], []
    for query in queries:
        started = time.perf_counter()
        hits = index.search(query, K)
        seconds.append(time.perf_counter() - started)
        found.append([hit.id for hit in hits])
    return found, seconds


def index_mib(index: VectorIndex) -> float:
    """The index's memory: the size of its hnswlib file, MiB."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vectors.bin"
        index.save_vectors(path)
        return path.stat().st_size / 2**20


def measure(params: IndexParams, products: Products, photos_each: int) -> Measured:
    """Build the index of `photos_each` photos per product and ask it every query."""
    index = build_index(params, products, photos_each)
    queries = products.vectors[:, QUERY_VIEW]
    found, seconds = timed_searches(index, queries)
    exact = exact_products(unit_rows(products.vectors[:, :photos_each]), unit_rows(queries))
    label_of = dict(zip(products.ids, products.labels, strict=True))
    precision, same_first, same_top, named_twice, recall = [], [], [], 0, []
    for item_id, label, names, truth in zip(products.ids, products.labels, found, exact, strict=True):
        precision.append(sum(label_of[name] == label for name in names) / K)
        same_first.append(names[:1] == [item_id])
        same_top.append(item_id in names)
        named_twice += len(set(names)) < len(names)
        recall.append(len(set(names) & {products.ids[place] for place in truth}) / K)
    ms = sorted(second * 1000 for second in seconds)
    return Measured(
        photos=index.stats()["photos"],
        precision=float(np.mean(precision)),
        same_first=float(np.mean(same_first)),
        same_top=float(np.mean(same_top)),
        named_twice=named_twice,
        recall=float(np.mean(recall)),
        p50_ms=statistics.median(ms),
        p95_ms=ms[min(len(ms) - 1, int(0.95 * len(ms)))],
        mib=index_mib(index),
    )


def print_table(title: str, rows: list[tuple[str, float, float, str]]) -> None:
    """A markdown table of (measure, 1 photo, 3 photos, format) rows, with the ratio 3 / 1."""
    print(f"\n{title}\n\n| | 1 photo per product | 3 photos per product | 3 / 1 |\n| --- | ---: | ---: | ---: |")
    for name, one, three, spec in rows:
        ratio = f"{three / one:.2f}" if one else "-"
        print(f"| {name} | {one:{spec}} | {three:{spec}} | {ratio} |")


def failures(one: Measured, three: Measured) -> list[str]:
    """The issue's claims that these figures break."""
    broken = []
    if three.precision < one.precision - MAX_PRECISION_DROP:
        broken.append(f"3-photo precision@5 {three.precision:.4f} is below the 1-photo {one.precision:.4f} by more "
                      f"than {MAX_PRECISION_DROP}")  # fmt: skip
    for name, measured in (("1-photo", one), ("3-photo", three)):
        if measured.named_twice:
            broken.append(f"the {name} index named a product twice in {measured.named_twice} top-{K}s")
    return broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=2000, help="products drawn (all labelled ones if fewer)")
    parser.add_argument("--catalog", type=Path, default=ARCHIVE if ARCHIVE.exists() else SAMPLE,
                        help="a tar archive or a folder of <id>.jpg (default: the 39,072, else the 1,002)")  # fmt: skip
    parser.add_argument("--metadata", type=Path, default=SAMPLE / "styles.csv", help="the labels (styles.csv)")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "efficientnet_lite0_max.onnx")
    parser.add_argument("--seed", type=int, default=0, help="draws the products and makes their views")
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "output" / "cache")
    args = parser.parse_args()
    settings = Settings.from_env()
    products = cached_products(args)
    params = IndexParams(products.vectors.shape[-1], settings.hnsw_m, settings.hnsw_ef_construction, settings.hnsw_ef)
    one, three = measure(params, products, 1), measure(params, products, 3)
    print(f"{len(products.ids):,} products of {args.catalog.name} ({len(set(products.labels))} articleTypes), "
          f"{args.model.name}, seed {args.seed}; M={params.m} ef_construction={params.ef_construction} "
          f"ef={params.ef}, top {K}; {cpu_model()}, {CORES} cores")  # fmt: skip
    print_table("1. Quality: each product's 4th view as the query", [
        ("articleType precision@5", one.precision, three.precision, ".3f"),
        ("own product first (same-product@1)", one.same_first, three.same_first, ".3f"),
        ("own product in the top 5 (same-product@5)", one.same_top, three.same_top, ".3f"),
        ("top 5s naming a product twice", one.named_twice, three.named_twice, "d"),
        ("recall@5 of products against exact search", one.recall, three.recall, ".3f"),
    ])  # fmt: skip
    print_table(f"2. Cost: search(query, {K}) on one thread, {len(products.ids):,} queries", [
        ("photos", one.photos, three.photos, ",d"),
        ("index memory (hnswlib file), MiB", one.mib, three.mib, ".2f"),
        ("search p50, ms", one.p50_ms, three.p50_ms, ".3f"),
        ("search p95, ms", one.p95_ms, three.p95_ms, ".3f"),
    ])  # fmt: skip
    broken = failures(one, three)
    if broken:
        sys.exit("\nFAILED: " + "; ".join(broken))


if __name__ == "__main__":
    main()
