"""The protocol between the web, the commands and the workers: every name a client sends has a worker behind it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import QueueNotFound

from common.settings import Settings
from protocol.celery_app import create_celery
from protocol.client import Client
from protocol.queues import ROUTES, Queue, Task
from worker.processes import embed_worker_argv, index_worker_argv

REPO = Path(__file__).resolve().parent.parent
CANNED_ANSWERS = {Task.SIMILAR_ITEMS: {"hits": []}, Task.DELETE_ITEMS: {"deleted": 0}, Task.INDEX_STATS: {}}


class RecordingCelery:
    """Stands in for the broker (unit test): keeps the name and queue of every message the client sends."""

    def __init__(self, app) -> None:
        self.app = app
        self.sent: list[tuple[str, str]] = []

    def send_task(self, name: str, **_: Any) -> RecordingCelery:
        self.sent.append((name, self.app.amqp.router.route({}, name)["queue"].name))
        self.last = name
        return self

    def get(self, timeout: float) -> Any:
        return CANNED_ANSWERS.get(Task(self.last))

    def forget(self) -> None:
        pass


def consumed_queues() -> dict[str, set[str]]:
    """Which queues each kind of worker process listens on, from the very arguments it starts with."""
    kinds = {"embed": embed_worker_argv(Settings.from_env({}), "INFO"), "index": index_worker_argv("INFO")}
    return {kind: set(argv[argv.index("-Q") + 1].split(",")) for kind, argv in kinds.items()}


@pytest.fixture
def worker_app(module_redis):
    import worker.tasks  # noqa: F401 - what `lookalike worker` imports to register its tasks

    return create_celery(Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis}))


def test_every_task_name_is_registered_by_the_workers_and_routed_to_a_queue_a_worker_reads(worker_app):
    registered = {name for name in worker_app.tasks if name.startswith("lookalike.")}
    assert registered == {str(task) for task in Task}
    read = set().union(*consumed_queues().values())
    for task in Task:
        assert worker_app.amqp.router.route({}, task)["queue"].name == ROUTES[task] and ROUTES[task] in read


def test_every_message_the_client_sends_reaches_a_registered_task_on_its_queue(worker_app, module_redis):
    recording = RecordingCelery(worker_app)
    client = Client(Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis}), celery=recording)
    calls = {
        "start_load": ("catalog.csv",),
        "search": (b"\xff\xd8 image bytes",),
        "find_duplicates": (0.95, 5),
        "get_item": ("10186",),
        "similar": ("10186",),
        "stats": (),
        "delete": (["10186"],),
    }
    public = {name for name, _ in inspect.getmembers(Client, inspect.isfunction) if not name.startswith("_")}
    assert public - {"follow"} == set(calls), "a new client method: add it here"
    for name, arguments in calls.items():
        getattr(client, name)(*arguments)
    # the workers' own messages (a load's batches and changes) are the only ones no client sends
    assert {name for name, _ in recording.sent} == set(Task) - {Task.EMBED_BATCH, Task.APPLY_CHANGES}
    for name, queue in recording.sent:
        assert name in worker_app.tasks and queue == ROUTES[Task(name)]


def test_a_name_outside_the_protocol_can_be_neither_sent_nor_routed(worker_app, module_redis):
    client = Client(Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis}), celery=RecordingCelery(worker_app))
    with pytest.raises(ValueError, match=r"lookalike\.serch_image"):
        client._ask("lookalike.serch_image")
    with pytest.raises(QueueNotFound):  # not silently onto the embed queue
        worker_app.amqp.router.route({}, "lookalike.serch_image")


def test_the_index_owner_reads_searches_and_changes_and_embedders_only_bulk_work():
    assert consumed_queues() == {"embed": {Queue.EMBED}, "index": {Queue.SEARCH, Queue.INDEX}}


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
