"""Every setting of lookalike, read from `LOOKALIKE_*` environment variables in this one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import LookalikeError

CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Setting:
    """One environment variable: its default and what it means (the README's configuration table)."""

    variable: str
    default: str
    meaning: str


SETTINGS = [
    Setting(
        "LOOKALIKE_REDIS_URL", "redis://127.0.0.1:6379/0", "Redis: the Celery broker and result store, and job records"
    ),
    Setting("LOOKALIKE_DATA_DIR", "./lookalike-data", "state: the index, extracted archives, logs"),
    Setting("LOOKALIKE_MODEL", "models/resnet50_max.onnx", "the ONNX model (any model with the contract)"),
    Setting("LOOKALIKE_INDEX_DIR", "", "the index files; empty: DATA_DIR/index"),
    Setting("LOOKALIKE_CATALOG_ROOT", ".", "catalogue loads may only read files under this folder"),
    Setting("LOOKALIKE_BATCH", "32", "images per embedding batch (one task, one onnxruntime run)"),
    Setting("LOOKALIKE_PROVIDERS", "auto", "onnxruntime providers, best first: auto, cuda, cpu or full names"),
    Setting("LOOKALIKE_EMBED_PROCESSES", "", "processes of `lookalike worker embed`; empty: one per core"),
    Setting("LOOKALIKE_THREADS", "", "onnxruntime intra-op threads per process; empty: cores / processes"),
    Setting("LOOKALIKE_EMBED_NICE", "10", "niceness of bulk embedding processes, so searches get the CPU first"),
    Setting("LOOKALIKE_RESIZE", "stretch", "resize policy: stretch (the tutorial's) or pad (to square, on white)"),
    Setting("LOOKALIKE_MAX_UPLOAD", str(10 * 1024 * 1024), "largest accepted image upload, bytes"),
    Setting("LOOKALIKE_MAX_PIXELS", "50000000", "largest accepted image, pixels (decompression bomb guard)"),
    Setting("LOOKALIKE_HNSW_M", "16", "hnswlib M (graph degree)"),
    Setting("LOOKALIKE_HNSW_EF_CONSTRUCTION", "100", "hnswlib ef_construction"),
    Setting("LOOKALIKE_HNSW_EF", "128", "hnswlib ef at query time (at least k)"),
    Setting("LOOKALIKE_PCA_DIM", "0", "reduce the index's vectors to this many dimensions by PCA; 0: off"),
    Setting("LOOKALIKE_PCA_FIT_ITEMS", "10000", "items the index must hold before the PCA is fitted on them"),
    Setting("LOOKALIKE_SNAPSHOT_EVERY", "20000", "changes between index snapshots (the log is cut after each)"),
    Setting("LOOKALIKE_SEARCH_TTL", "3600", "seconds a search job's record is kept"),
    Setting("LOOKALIKE_SEARCH_TIMEOUT", "60", "seconds a search may wait for the index worker before it fails"),
    Setting("LOOKALIKE_MAX_QUEUED_SEARCHES", "100", "searches that may wait at once; another gets 503 + Retry-After"),
    Setting("LOOKALIKE_TASK_TIME_LIMIT", "600", "seconds before a task is killed"),
    Setting(
        "LOOKALIKE_API_KEY", "", "bearer token for the write endpoints (loads, deletes); empty: loopback clients only"
    ),
    Setting("LOOKALIKE_MAX_CATALOG_UPLOAD", str(2 * 1024**3), "largest catalogue upload (archive + CSV), bytes"),
    Setting("LOOKALIKE_WEB_THREADS", "8", "request threads of `lookalike web`"),
    Setting("LOOKALIKE_CALL_TIMEOUT", "5", "seconds the web waits for Redis or the index worker before a 503"),
]
DEFAULTS = {setting.variable: setting.default for setting in SETTINGS}


@dataclass(frozen=True)
class Settings:
    redis_url: str
    data_dir: Path
    model: Path
    index_dir: Path
    catalog_root: Path
    batch: int
    providers: tuple[str, ...]
    embed_processes: int
    threads: int
    embed_nice: int
    resize: str
    max_upload: int
    max_pixels: int
    hnsw_m: int
    hnsw_ef_construction: int
    hnsw_ef: int
    pca_dim: int
    pca_fit_items: int
    snapshot_every: int
    search_ttl: int
    search_timeout: int
    max_queued_searches: int
    task_time_limit: int
    api_key: str = field(repr=False)  # never in a log line
    max_catalog_upload: int
    web_threads: int
    call_timeout: int

    @property
    def archives_dir(self) -> Path:
        """Where tar archives from the catalogue are unpacked once, by content hash."""
        return self.data_dir / "archives"

    @property
    def uploads_dir(self) -> Path:
        """Catalogue files uploaded through the web; loads may read from here as well as the catalogue root."""
        return self.data_dir / "uploads"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        given = os.environ if environ is None else environ
        env = {**{k: v for k, v in DEFAULTS.items() if v != ""}, **{k: v for k, v in given.items() if v != ""}}
        data_dir = Path(env["LOOKALIKE_DATA_DIR"]).expanduser().resolve()
        processes = (
            _integer(env, "LOOKALIKE_EMBED_PROCESSES", minimum=1) if "LOOKALIKE_EMBED_PROCESSES" in env else CORES
        )
        threads = _integer(env, "LOOKALIKE_THREADS", minimum=1) if "LOOKALIKE_THREADS" in env else CORES // processes
        settings = cls(
            redis_url=env["LOOKALIKE_REDIS_URL"],
            data_dir=data_dir,
            model=Path(env["LOOKALIKE_MODEL"]).expanduser().resolve(),
            index_dir=Path(env.get("LOOKALIKE_INDEX_DIR", data_dir / "index")).expanduser().resolve(),
            catalog_root=Path(env["LOOKALIKE_CATALOG_ROOT"]).expanduser().resolve(),
            batch=_integer(env, "LOOKALIKE_BATCH", minimum=1),
            providers=tuple(name.strip() for name in env["LOOKALIKE_PROVIDERS"].split(",") if name.strip()),
            embed_processes=processes,
            threads=max(1, threads),
            embed_nice=_integer(env, "LOOKALIKE_EMBED_NICE", minimum=0),
            resize=env["LOOKALIKE_RESIZE"],
            max_upload=_integer(env, "LOOKALIKE_MAX_UPLOAD", minimum=1),
            max_pixels=_integer(env, "LOOKALIKE_MAX_PIXELS", minimum=1),
            hnsw_m=_integer(env, "LOOKALIKE_HNSW_M", minimum=2),
            hnsw_ef_construction=_integer(env, "LOOKALIKE_HNSW_EF_CONSTRUCTION", minimum=1),
            hnsw_ef=_integer(env, "LOOKALIKE_HNSW_EF", minimum=1),
            pca_dim=_integer(env, "LOOKALIKE_PCA_DIM", minimum=0),
            pca_fit_items=_integer(env, "LOOKALIKE_PCA_FIT_ITEMS", minimum=2),
            snapshot_every=_integer(env, "LOOKALIKE_SNAPSHOT_EVERY", minimum=1),
            search_ttl=_integer(env, "LOOKALIKE_SEARCH_TTL", minimum=1),
            search_timeout=_integer(env, "LOOKALIKE_SEARCH_TIMEOUT", minimum=1),
            max_queued_searches=_integer(env, "LOOKALIKE_MAX_QUEUED_SEARCHES", minimum=1),
            task_time_limit=_integer(env, "LOOKALIKE_TASK_TIME_LIMIT", minimum=10),
            api_key=env.get("LOOKALIKE_API_KEY", ""),
            max_catalog_upload=_integer(env, "LOOKALIKE_MAX_CATALOG_UPLOAD", minimum=1),
            web_threads=_integer(env, "LOOKALIKE_WEB_THREADS", minimum=1),
            call_timeout=_integer(env, "LOOKALIKE_CALL_TIMEOUT", minimum=1),
        )
        if settings.resize not in ("stretch", "pad"):
            raise LookalikeError(f"LOOKALIKE_RESIZE is {settings.resize!r}; choose stretch or pad")
        if settings.pca_dim and settings.pca_fit_items <= settings.pca_dim:
            raise LookalikeError(
                f"LOOKALIKE_PCA_FIT_ITEMS ({settings.pca_fit_items}) must be more than LOOKALIKE_PCA_DIM "
                f"({settings.pca_dim}): a PCA needs more items than dimensions (ten times as many is better)"
            )
        return settings


def _integer(env: dict[str, str], variable: str, minimum: int) -> int:
    try:
        value = int(env[variable])
    except ValueError:
        raise LookalikeError(f"{variable} must be a whole number, not {env[variable]!r}") from None
    if value < minimum:
        raise LookalikeError(f"{variable} must be at least {minimum}, not {value}")
    return value
