"""The protocol between the web, the commands and the workers: every name a client sends has a worker behind it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import QueueNotFound
from PIL import Image

from common.settings import Settings
from protocol.celery_app import create_celery
from protocol.client import Client
from protocol.queues import ROUTES, Queue, Task
from protocol.readers import READS
from tests.images import encode
from worker.processes import embed_worker_argv, index_worker_argv
from worker.queries import QUEUE, TASK

REPO = Path(__file__).resolve().parent.parent
CANNED_ANSWERS = {
    Task.GET_ITEM: {"item": {"id": "10186", "metadata": {}}},
    Task.SIMILAR_ITEMS: {"hits": []},
    Task.INDEX_STATS: {"stats": {}},
    Task.DELETE_ITEMS: {"deleted": 0, "seq": 0},
    Task.BUILD_INDEX: {"index_id": "new", "model": "new.onnx", "job": "job"},
    Task.ROLLBACK_INDEX: {"serving": "old", "model": "old.onnx", "seq": 9, "previous": "new"},
    Task.DELETE_INDEX: {"deleted": "new", "folder": "indexes/new"},
    Task.CALIBRATE_INDEX: {"index_id": "old", "calibration": {}},
}


class RecordingCelery:
    """Stands in for the broker (unit test): keeps the name and queue of every message the client sends."""

    def __init__(self, app) -> None:
        self.app = app
        self.sent: list[tuple[str, str]] = []

    def send_task(self, name: str, queue: str | None = None, **_: Any) -> RecordingCelery:
        self.sent.append((name, queue or self.app.amqp.router.route({}, name)["queue"].name))
        self.last = name
        return self

    def get(self, timeout: float, **_: Any) -> Any:
        return CANNED_ANSWERS.get(Task(self.last))

    def forget(self) -> None:
        pass


def consumed_queues() -> dict[str, set[str]]:
    """Which queues each kind of worker process listens on, from the very arguments it starts with."""
    kinds = {"embed": embed_worker_argv(Settings.from_env({}), "INFO"), "index": index_worker_argv("INFO")}
    return {**{kind: set(argv[argv.index("-Q") + 1].split(",")) for kind, argv in kinds.items()}, "query": {QUEUE}}


@pytest.fixture
def worker_app(module_redis):
    import worker.tasks  # noqa: F401 - what `lookalike worker` imports to register its tasks

    return create_celery(Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis}))


def test_every_task_name_has_a_consumer_and_is_routed_to_a_queue_it_reads(worker_app):
    registered = {name for name in worker_app.tasks if name.startswith("lookalike.")}
    assert registered | {TASK} == {str(task) for task in Task}  # searches by image: the query processes' own
    read = consumed_queues()
    for task in Task:
        queue = worker_app.amqp.router.route({}, task)["queue"].name
        assert queue == ROUTES[task] and any(queue in queues for queues in read.values())
    assert ROUTES[TASK] == QUEUE  # the query queue carries only what the query processes read
    # reads go to the replicas directly (no queue) and, when none keeps up, to the owner's queue
    assert {ROUTES[task] for task in READS} == {Queue.SEARCH} and Queue.SEARCH in read["index"]


def test_every_message_the_client_sends_reaches_a_registered_task_on_its_queue(worker_app, module_redis, tmp_path):
    recording = RecordingCelery(worker_app)
    settings = Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis, "LOOKALIKE_DATA_DIR": str(tmp_path)})
    client = Client(settings, celery=recording)
    calls = {
        "start_load": ("catalog.csv",),
        "put_item": ("shirt", [encode(Image.new("RGB", (8, 8)), "JPEG")]),
        "search": (b"\xff\xd8 image bytes",),
        "recommend": (["10186"], [b"\xff\xd8 image bytes"]),
        "find_duplicates": (0.95, 5),
        "get_item": ("10186",),
        "similar": ("10186",),
        "stats": (),
        "delete": (["10186"],),
        "build_index": ("new.onnx",),
        "rollback_index": (),
        "delete_index": ("new",),
        "calibrate_index": ({"format": "lookalike-calibration/1"},),
    }
    public = {name for name, _ in inspect.getmembers(Client, inspect.isfunction) if not name.startswith("_")}
    assert public - {"follow", "check_min_seq"} == set(calls), "a new client method: add it here"  # those send nothing
    for name, arguments in calls.items():
        getattr(client, name)(*arguments)
    # only the workers send the rest: a load's changes, query processes' reads, replicas' requests (and a load's
    # batches, but for the one batch of a product sent on its own)
    workers_own = {Task.APPLY_CHANGES, Task.NEAREST, Task.WRITE_SNAPSHOT, Task.ADVANCE_BUILD, Task.REPROJECT_BATCH}
    assert {name for name, _ in recording.sent} == set(Task) - workers_own
    for name, queue in recording.sent:
        assert name in worker_app.tasks or name == TASK
        assert queue == ROUTES[Task(name)]


def test_a_name_outside_the_protocol_can_be_neither_sent_nor_routed(worker_app, module_redis):
    client = Client(Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis}), celery=RecordingCelery(worker_app))
    with pytest.raises(ValueError, match=r"lookalike\.serch_image"):
        client._read("lookalike.serch_image")
    with pytest.raises(QueueNotFound):  # not silently onto the embed queue
        worker_app.amqp.router.route({}, "lookalike.serch_image")


def test_each_kind_of_worker_reads_its_own_queues():
    assert consumed_queues() == {
        "embed": {Queue.EMBED},
        "index": {Queue.SEARCH, Queue.INDEX},
        "query": {Queue.QUERY},
    }


CODE_ARGUMENT = {"item_error": 0, "ImageError": 0, "unavailable": 0, "ApiError": 1}  # where each call takes its code


def test_every_error_code_is_made_from_the_one_enum():
    """No code is spelt as a string where an error is made: each comes from `common.errors.ErrorCode`."""
    spelt = []
    for package in ("common", "protocol", "export", "worker", "web", "lookalike"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in CODE_ARGUMENT:
                    position = CODE_ARGUMENT[node.func.id]
                    if len(node.args) > position and isinstance(node.args[position], ast.Constant):
                        spelt.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert spelt == []
