"""Shared fixtures: where the shared images and model are, and one real ResNet50 export per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
from hypothesis import settings as hypothesis_settings

from common.api_key import read_api_key
from common.settings import Settings
from lookalike.redis_server import EmbeddedRedis, free_port
from lookalike.stack import Stack
from lookalike.up import start_workers
from protocol.celery_app import create_celery
from protocol.client import Client
from protocol.jobs import Jobs
from web.app import create_app
from worker.watchdog import LoadWatchdog

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def int8_min_cosine() -> float:
    """How close an INT8 model must stay to fp32 on this CPU: 0.98 with VNNI; without it onnxruntime's kernels need
    7-bit weights, measured at 0.957 on a 2-core AMD EPYC with AVX2 only (export.quantize.has_vnni)."""
    from export.quantize import has_vnni

    return 0.98 if has_vnni() else 0.95


# Property tests and the decoder fuzz draw the same examples every run, so that main stays green or red for a
# reason; `pytest --hypothesis-profile explore` draws new ones.
hypothesis_settings.register_profile("repeatable", derandomize=True, database=None)
hypothesis_settings.register_profile("explore")
hypothesis_settings.load_profile("repeatable")


def _shared_dir() -> Path:
    return Path(os.environ.get("LOOKALIKE_SHARED_DIR", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data and models (`LOOKALIKE_SHARED_DIR`, default ../shared): required in CI, optional elsewhere."""
    path = _shared_dir()
    if not (path / "data" / "fashion" / "images").is_dir():
        message = f"shared test data not found at {path} (set LOOKALIKE_SHARED_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def sample_images(shared_dir: Path) -> Path:
    """1,002 labelled product photos."""
    return shared_dir / "data" / "fashion" / "images"


@pytest.fixture(scope="session")
def pretrained_model(shared_dir: Path) -> Path:
    """EfficientNet-Lite0 with real ImageNet features, in lookalike's model contract."""
    return shared_dir / "models" / "efficientnet_lite0_max.onnx"


@pytest.fixture(scope="session")
def resnet_export(tmp_path_factory: pytest.TempPathFactory):
    """ResNet50 + max pooling with random weights, through the real Keras -> tf2onnx -> parity path."""
    from export.exporter import export_resnet50
    from export.progress import Progress

    out = tmp_path_factory.mktemp("export") / "resnet50_max.onnx"
    return export_resnet50(out, pooling="max", weights="none", progress=Progress())


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real Redis server: `LOOKALIKE_REDIS_URL` when set (its database is flushed!), else a private one."""
    if os.environ.get("LOOKALIKE_REDIS_URL"):
        yield os.environ["LOOKALIKE_REDIS_URL"]
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


class Databases:
    """Hands each user (a stack, a module's tests) a Redis database of its own, so that two never share queues, and
    takes it back, emptied, when its user is done: a Redis server has 16 of them unless configured otherwise."""

    def __init__(self, redis_url: str) -> None:
        self.base = redis_url.rsplit("/", 1)[0]
        self.free = list(range(1, 16))  # database 0 is for a developer's own use of LOOKALIKE_REDIS_URL

    def take(self) -> str:
        assert self.free, "every Redis database is in use: give one back"
        return f"{self.base}/{self.free.pop(0)}"

    def give_back(self, url: str) -> None:
        redis.Redis.from_url(url).flushdb()
        self.free.insert(0, int(url.rsplit("/", 1)[1]))


@pytest.fixture(scope="session")
def redis_databases(redis_url) -> Databases:
    return Databases(redis_url)


@pytest.fixture(scope="module")
def module_redis(redis_databases):
    """A Redis database for the tests of one module (each test flushes it as it needs)."""
    url = redis_databases.take()
    yield url
    redis_databases.give_back(url)


@pytest.fixture
def load_watchdog(module_redis, tmp_path) -> LoadWatchdog:
    """The load watchdog with the shortest stall it allows (LOOKALIKE_LOAD_STALL 5 s), on an emptied Redis."""
    settings = Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis, "LOOKALIKE_LOAD_STALL": "5",
                                  "LOOKALIKE_DATA_DIR": str(tmp_path)})  # fmt: skip
    client = redis.Redis.from_url(module_redis)
    client.flushdb()
    return LoadWatchdog(create_celery(settings), Jobs.for_settings(client, settings), settings)


@pytest.fixture
def make_stack(redis_databases, tmp_path, pretrained_model, shared_dir):
    """Start a Stack of real worker processes (EfficientNet-Lite0, catalogue root = shared data); stopped after."""
    stacks = []

    def make(**env: str):
        data = tmp_path / f"data{len(stacks)}"
        stack = Stack(redis_databases.take(), data, pretrained_model, shared_dir / "data", **env)
        stack.redis.flushdb()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
        redis_databases.give_back(stack.env["LOOKALIKE_REDIS_URL"])


class Served(NamedTuple):
    stack: Stack
    url: str  # where `lookalike web` listens ("" without it)
    client: Client
    load: dict  # the finished job of the sample's load
    api_key: str  # the key `lookalike web` made in the data folder at its first start, as a user's would ("" without)


@contextmanager
def sample_service(redis_url: str, data_dir: Path, model: Path, shared_dir: Path, web: bool) -> Iterator[Served]:
    """Index and embed workers (and `lookalike web`) with the 1,002 shared images loaded as they are."""
    stack = Stack(redis_url, data_dir, model, shared_dir / "data")
    stack.redis.flushdb()
    try:
        start_workers(stack, stack.settings)  # as `lookalike up` does: the owner, a replica, a query process, embedders
        url = stack.start_web(free_port()) if web else ""
        client = Client(stack.settings)
        job = client.follow(client.start_load(shared_dir / "data" / "fashion"), timeout=600)
        yield Served(stack, url, client, job, read_api_key(data_dir))
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def served(redis_databases, tmp_path_factory, pretrained_model, shared_dir):
    """The whole service on loopback: index and embed workers and `lookalike web`, the 1,002 shared images loaded."""
    data_dir = tmp_path_factory.mktemp("served")
    with sample_service(redis_databases.take(), data_dir, pretrained_model, shared_dir, web=True) as service:
        assert service.load["progress"]["done"] == 1002, service.load
        stack = service.stack
        stack.wait_for(lambda: stack.heartbeat("index")[0]["items"] == 1002, "the index owner to report 1,002 items")
        yield service


@pytest.fixture(scope="module")
def live(served):
    """A Flask test client of the web app in front of the served stack (real Redis and workers)."""
    return create_app(served.stack.settings).test_client()
