"""Every setting of lookalike, declared once: a field of `Settings` per `LOOKALIKE_*` environment variable.

Each field says its type, the default an unset variable stands for, its bounds and its meaning. `from_env` reads
them, `lookalike settings` prints them, and docs/configuration.md's table is `markdown_table()` (a test checks).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import LookalikeError

PREFIX = "LOOKALIKE_"
CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Variable:
    """What the docs say of one setting; `default` is the text an unset variable stands for ("": derived)."""

    default: str
    meaning: str
    minimum: int | None = None
    choices: tuple[str, ...] = ()


def variable(default: str, meaning: str, *, minimum: int | None = None, choices: tuple[str, ...] = (),
             secret: bool = False) -> Any:  # fmt: skip
    """A `Settings` field read from LOOKALIKE_<FIELD NAME IN CAPITALS>; a secret never shows in a repr or a log."""
    return field(metadata={"variable": Variable(default, meaning, minimum, choices)}, repr=not secret)


@dataclass(frozen=True)
class Settings:
    redis_url: str = variable(
        "redis://127.0.0.1:6379/0",
        "Redis: the Celery broker and result store, and job records; or its sentinels, "
        "`sentinel://host:port;sentinel://host:port/db` (the primary's password as `sentinel://:password@host:port`)",
    )
    redis_master: str = variable("mymaster", "with sentinels: the name they know the Redis primary by")
    redis_sentinel_password: str = variable(
        "", "with sentinels: the sentinels' own password (`requirepass` in sentinel.conf); empty: none", secret=True
    )
    data_dir: Path = variable("./lookalike-data", "state: the index, extracted archives, logs")
    model: Path = variable("models/resnet50_max.onnx", "the ONNX model (any model with the contract)")
    model_wait: int = variable(
        "0",
        "seconds a starting worker waits for the model file to appear (a deployment's export service writes it)",
        minimum=0,
    )
    index_dir: Path = variable("", "the index files; empty: DATA_DIR/index")
    catalog_root: Path = variable(".", "catalogue loads may only read files under this folder")
    batch: int = variable("32", "images per embedding batch (one task, one onnxruntime run)", minimum=1)
    providers: tuple[str, ...] = variable("auto", "onnxruntime providers, best first: auto, cuda, cpu or full names")
    embed_processes: int = variable("", "processes of `lookalike worker embed`; empty: one per core", minimum=1)
    threads: int = variable("", "onnxruntime intra-op threads per process; empty: cores / processes", minimum=1)
    embed_nice: int = variable(
        "10",
        "niceness of bulk embedding processes (above 0 also Linux's idle scheduling class): searches get the CPU first",
        minimum=0,
    )
    resize: str = variable(
        "stretch", "resize policy: stretch (the tutorial's) or pad (to square, on white)", choices=("stretch", "pad")
    )
    max_upload: int = variable(str(10 * 1024 * 1024), "largest accepted image upload, bytes", minimum=1)
    max_pixels: int = variable("50000000", "largest accepted image, pixels (decompression bomb guard)", minimum=1)
    max_search_pixels: int = variable("24000000", "largest image a search decodes, pixels", minimum=1)
    max_image_bytes: int = variable(
        str(50 * 1024 * 1024),
        "largest file a load or a thumbnail reads (catalogue images, archive members), bytes",
        minimum=1,
    )
    web_decodes: int = variable("2", "uploads one web process decodes at once (each holds a decoded image)", minimum=1)
    max_archive_members: int = variable("500000", "members a catalogue archive may hold", minimum=1)
    max_archive_bytes: int = variable(
        str(64 * 1024**3), "bytes a catalogue archive may unpack to, all members together", minimum=1
    )
    max_csv_bytes: int = variable(str(512 * 1024**2), "largest catalogue CSV, bytes", minimum=1)
    max_csv_rows: int = variable("2000000", "rows a catalogue CSV may hold", minimum=1)
    max_photos: int = variable(
        "16", "photos a product may have; a product's further photos are refused as errors of their rows", minimum=1
    )
    hnsw_m: int = variable("16", "hnswlib M (graph degree)", minimum=2)
    hnsw_ef_construction: int = variable("100", "hnswlib ef_construction", minimum=1)
    hnsw_ef: int = variable("128", "hnswlib ef at query time (at least k)", minimum=1)
    pca_dim: int = variable("0", "reduce the index's vectors to this many dimensions by PCA; 0: off", minimum=0)
    pca_fit_items: int = variable("10000", "items the index must hold before the PCA is fitted on them", minimum=2)
    snapshot_every: int = variable("20000", "changes between index snapshots (the log is cut after each)", minimum=1)
    query_processes: int = variable(
        "1", "query processes `lookalike up` starts; each query process runs on cores / this many threads", minimum=1
    )
    query_batch: int = variable(
        "16", "searches a query process embeds together in one onnxruntime run, at most", minimum=1
    )
    query_wait_ms: int = variable(
        "0",
        "milliseconds a query process waits for more searches than are queued before it embeds what it has",
        minimum=0,
    )
    replicas: int = variable(
        "1", "index replicas `lookalike up` starts (0: the index owner answers every read)", minimum=0
    )
    max_lag: int = variable(
        "5", "seconds a replica may fall behind the index owner before it stops taking reads", minimum=1
    )
    read_timeout: int = variable(
        "2", "seconds a search waits for an index reader's answer before it asks another", minimum=1
    )
    search_ttl: int = variable("3600", "seconds a search job's record is kept", minimum=1)
    search_timeout: int = variable(
        "60", "seconds a search may wait for a query worker and an index reader before it fails", minimum=1
    )
    max_queued_searches: int = variable(
        "100", "searches that may wait at once; another gets 503 + Retry-After", minimum=1
    )
    max_live_searches: int = variable(
        "100000",
        "search records kept at once (each for LOOKALIKE_SEARCH_TTL); another search gets 503 + Retry-After",
        minimum=1,
    )
    redis_maxmemory: str = variable(
        "2gb",
        "memory cap of the Redis `lookalike up` starts (noeviction: nothing is ever evicted); with any Redis, searches "
        "are refused (503) once it holds 80% of its maxmemory, keeping the rest for loads, queues and the change feed",
    )
    task_time_limit: int = variable("600", "seconds before a task is killed", minimum=10)
    max_deliveries: int = variable(
        "3", "times a message may be handed to a worker that dies on it; then its items fail as worker_lost", minimum=1
    )
    load_stall: int = variable(
        "300",
        "seconds a load may go without progress, none of its messages queued or held, before a watchdog "
        "re-queues its missing items",
        minimum=5,
    )
    job_retention: int = variable("604800", "seconds a finished load's records are kept (7 days)", minimum=60)
    max_job_errors: int = variable(
        "10000", "per-item errors a job stores (its counts by code stay exact beyond)", minimum=1
    )
    api_key: str = variable(
        "",
        "the key every write (loads, deletes) needs, as a Bearer token; empty: the key in DATA_DIR/api-key, which "
        "`lookalike up` and `lookalike web` make at their first start",
        secret=True,
    )
    max_catalog_upload: int = variable(str(2 * 1024**3), "largest catalogue upload (archive + CSV), bytes", minimum=1)
    web_threads: int = variable("8", "request threads of `lookalike web`", minimum=1)
    web_waiting: int = variable(
        "32",
        "requests of one `lookalike web` process that may wait for their job at once (`wait`), each on a thread "
        "of its own beside the LOOKALIKE_WEB_THREADS that answer; beyond, the answer comes at once, as without `wait`",
        minimum=0,
    )
    trusted_proxies: int = variable(
        "0",
        "reverse proxies in front of `lookalike web` whose X-Forwarded-For, -Proto and -Host it believes (0: none; "
        "the headers are ignored)",
        minimum=0,
    )
    call_timeout: int = variable("5", "seconds the web waits for Redis or the index worker before a 503", minimum=1)

    @property
    def archives_dir(self) -> Path:
        """Where tar archives from the catalogue are unpacked once, by content hash."""
        return self.data_dir / "archives"

    @property
    def query_threads(self) -> int:
        """onnxruntime intra-op threads of each query process: this machine's cores shared among them."""
        return max(1, CORES // self.query_processes)

    @property
    def uploads_dir(self) -> Path:
        """Catalogue files uploaded through the web; loads may read from here as well as the catalogue root."""
        return self.data_dir / "uploads"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings `environ` (default: this process's environment) gives; unset or empty means the default."""
        given = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, kind, spec in declared():
            raw = given.get(env_name(name)) or spec.default
            if raw or kind is str:
                values[name] = _parse(env_name(name), raw, kind, spec)
        # The derived defaults: what an empty variable means
        values.setdefault("index_dir", values["data_dir"] / "index")
        values.setdefault("embed_processes", CORES)
        values.setdefault("threads", max(1, CORES // values["embed_processes"]))
        settings = cls(**values)
        if not re.fullmatch(r"\d+(b|k|kb|m|mb|g|gb)?", settings.redis_maxmemory, re.IGNORECASE):
            raise LookalikeError(
                f"LOOKALIKE_REDIS_MAXMEMORY is {settings.redis_maxmemory!r}; give bytes or a size such as 512mb or 2gb"
            )
        scheme = settings.redis_url.split("://", 1)[0]
        sentinels = settings.redis_url.split(";")
        if scheme not in ("redis", "rediss", "unix", "sentinel") or (
            scheme == "sentinel" and not all(re.match(r"\s*sentinel://[^/;]*[^:/;@]", part) for part in sentinels)
        ):
            raise LookalikeError(
                f"LOOKALIKE_REDIS_URL is {settings.redis_url!r}; give redis://host:port/db or, with Redis Sentinel, "
                "sentinel://host:port;sentinel://host:port/db"
            )
        if settings.pca_dim and settings.pca_fit_items <= settings.pca_dim:
            raise LookalikeError(
                f"LOOKALIKE_PCA_FIT_ITEMS ({settings.pca_fit_items}) must be more than LOOKALIKE_PCA_DIM "
                f"({settings.pca_dim}): a PCA needs more items than dimensions (ten times as many is better)"
            )
        return settings


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def declared() -> Iterator[tuple[str, type, Variable]]:
    """(field name, type, declaration) of every setting, in the order of the class."""
    hints = typing.get_type_hints(Settings)
    for declared_field in dataclasses.fields(Settings):
        kind = typing.get_origin(hints[declared_field.name]) or hints[declared_field.name]
        yield declared_field.name, kind, declared_field.metadata["variable"]


def defaults() -> dict[str, str]:
    """Every environment variable lookalike reads, with the default an unset one stands for ("": derived)."""
    return {env_name(name): spec.default for name, _, spec in declared()}


def _parse(variable_name: str, raw: str, kind: type, spec: Variable) -> Any:
    parsers: dict[type, Callable[[str], Any]] = {
        str: str,
        Path: lambda text: Path(text).expanduser().resolve(),
        tuple: lambda text: tuple(name.strip() for name in text.split(",") if name.strip()),
        int: lambda text: _integer(variable_name, text, spec.minimum),
    }
    value = parsers[kind](raw)
    if spec.choices and value not in spec.choices:
        raise LookalikeError(f"{variable_name} is {value!r}; choose {' or '.join(spec.choices)}")
    return value


def _integer(variable_name: str, text: str, minimum: int | None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise LookalikeError(f"{variable_name} must be a whole number, not {text!r}") from None
    if minimum is not None and value < minimum:
        raise LookalikeError(f"{variable_name} must be at least {minimum}, not {value}")
    return value


def allowed(kind: type, spec: Variable) -> str:
    """The values a setting takes, in words, for the docs table."""
    if spec.choices:
        return ", ".join(spec.choices)
    if kind is int:
        return f"whole number, at least {spec.minimum}" if spec.minimum is not None else "whole number"
    return {Path: "path", tuple: "comma-separated names"}.get(kind, "text")


def markdown_table() -> str:
    """docs/configuration.md's table of every variable, made from the declarations above."""
    rows = ["| variable | default | values | meaning |", "| --- | --- | --- | --- |"]
    for name, kind, spec in declared():
        default = f"`{spec.default}`" if spec.default else "(empty)"
        rows.append(f"| `{env_name(name)}` | {default} | {allowed(kind, spec)} | {spec.meaning} |")
    return "\n".join(rows) + "\n"
