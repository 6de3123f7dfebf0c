"""The simplest thing a shop could run instead of lookalike: one Flask process under waitress that decodes the
upload, embeds it with onnxruntime and asks hnswlib, all inside the request. The baseline of bench/search_cost.py.

    .venv/bin/python bench/anchor.py [--port 8001] [--model M.onnx] [--sample ../shared/data/fashion]

POST /search (multipart `image`, `k`) answers `{"hits": [{"id", "score", "metadata"}]}` at once; GET /healthz
answers `ok`. The same parts as lookalike's: the project's decoder (`common.images.decode_image`, the model's size,
LOOKALIKE_RESIZE), its model loader (`common.model.load_model`, LOOKALIKE_PROVIDERS, the threads of one query
process), an hnswlib cosine index with LOOKALIKE_HNSW_* built in this process from the sample's photos (their
vectors cached under --cache), and waitress with LOOKALIKE_WEB_THREADS threads. No Redis, no Celery, no job.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
from flask import Flask, Response, jsonify, request

from common.images import ImageError, check_size, decode_image
from common.model import EmbeddingModel, load_model
from common.settings import Settings

SHARED = Path(os.environ.get("LOOKALIKE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
SAMPLE = SHARED / "data" / "fashion"
MODEL = SHARED / "models" / "efficientnet_lite0_max.onnx"
CACHE = Path(__file__).parent / "output" / "cache"
EMBED_BATCH = 32  # photos embedded at once while the index is built
MAX_K = 100
CONNECTION_LIMIT = 1000  # as `lookalike web` (lookalike/web_cli.py): more keep-alive clients than waitress's 100


@dataclass
class Catalogue:
    """The sample's products: an hnswlib index whose label is the place in `ids`, and each id's CSV row."""

    ids: list[str]
    metadata: dict[str, dict[str, str]]
    index: hnswlib.Index

    def nearest(self, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        labels, distances = self.index.knn_query(vector, k=min(k, len(self.ids)))
        found = [self.ids[int(label)] for label in labels[0]]
        return [
            {"id": item_id, "score": round(1.0 - float(distance), 6), "metadata": self.metadata.get(item_id)}
            for item_id, distance in zip(found, distances[0], strict=True)
        ]


def sample_photos(sample: Path) -> list[Path]:
    return sorted((sample / "images").glob("*.jpg"))


def sample_vectors(model: EmbeddingModel, photos: list[Path], resize: str, cache: Path | None) -> np.ndarray:
    """Each photo's embedding, decoded as a search decodes it; cached per (model, resize policy, photo files)."""
    names = hashlib.sha256("\n".join(f"{p.name}:{p.stat().st_size}" for p in photos).encode()).hexdigest()[:16]
    cached = cache / f"anchor-{model.sha256[:16]}-{resize}-{names}.npy" if cache else None
    if cached is not None and cached.exists():
        return np.load(cached)
    vectors = []
    for start in range(0, len(photos), EMBED_BATCH):
        pixels = [decode_image(path.read_bytes(), model.contract.size, resize) for path in photos[start:][:EMBED_BATCH]]
        vectors.append(model.embed(np.stack(pixels)))
    embeddings = np.concatenate(vectors)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, embeddings)
    return embeddings


def build_catalogue(model: EmbeddingModel, sample: Path, settings: Settings, cache: Path | None = CACHE) -> Catalogue:
    """The sample's photos embedded and indexed (cosine), with styles.csv's rows as metadata."""
    photos = sample_photos(sample)
    vectors = sample_vectors(model, photos, settings.resize, cache)
    index = hnswlib.Index(space="cosine", dim=model.contract.dimension)
    index.init_index(max_elements=len(photos), M=settings.hnsw_m, ef_construction=settings.hnsw_ef_construction)
    index.add_items(vectors, np.arange(len(photos)))
    index.set_ef(settings.hnsw_ef)
    index.set_num_threads(1)  # one query a request: the requests are the parallelism
    metadata = {}
    if (sample / "styles.csv").is_file():
        with open(sample / "styles.csv", newline="", encoding="utf-8") as rows:
            metadata = {row["id"]: row for row in csv.DictReader(rows)}
    return Catalogue([path.stem for path in photos], metadata, index)


def create_app(model_path: Path = MODEL, sample: Path = SAMPLE, settings: Settings | None = None,
               cache: Path | None = CACHE) -> Flask:  # fmt: skip
    """The anchor's app: its model and catalogue are loaded here, once, and every request uses them."""
    settings = settings or Settings.from_env()
    model = load_model(model_path, settings.providers, intra_op_threads=settings.query_threads)
    catalogue = build_catalogue(model, sample, settings, cache)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload + 64 * 1024
    app.extensions["anchor"] = catalogue

    @app.post("/search")
    def search() -> tuple[Response, int]:
        upload = request.files.get("image")
        if upload is None:
            return jsonify({"error": "send the image as the multipart file field `image`"}), 400
        try:
            k = max(1, min(MAX_K, int(request.form.get("k", "10"))))
            data = check_size(upload.read(settings.max_upload + 1), settings.max_upload)
            pixels = decode_image(data, model.contract.size, settings.resize, settings.max_search_pixels)
        except ImageError as error:
            return jsonify({"error": error.as_dict()}), 415
        except ValueError:
            return jsonify({"error": "k must be a whole number"}), 400
        vector = model.embed(pixels[np.newaxis])[0]
        return jsonify({"hits": catalogue.nearest(vector, k)}), 200

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="a folder with images/*.jpg and styles.csv")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the sample's vectors are cached")
    args = parser.parse_args()
    from waitress import serve

    settings = Settings.from_env()
    started = time.perf_counter()
    app = create_app(args.model, args.sample, settings, args.cache)
    items, seconds = len(app.extensions["anchor"].ids), time.perf_counter() - started
    print(f"anchor on http://{args.host}:{args.port}/: {items} photos indexed in {seconds:.1f} s, "
          f"{settings.web_threads} threads", flush=True)  # fmt: skip
    serve(app, host=args.host, port=args.port, threads=settings.web_threads, connection_limit=CONNECTION_LIMIT,
          ident="anchor")  # fmt: skip


if __name__ == "__main__":
    main()
