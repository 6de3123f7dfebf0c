"""The architecture in the import graph: import-linter's contracts (pyproject.toml) hold, and they catch a break."""

from __future__ import annotations

import http.client
import io
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lookalike.redis_server import free_port
from lookalike.stack import Stack

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "protocol", "export", "worker", "web", "lookalike")
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
# Never loaded by the web, not even lazily while it serves (docs/architecture.md).
NOT_IN_THE_WEB = {"worker", "onnxruntime", "hnswlib", "tensorflow", "keras", "tf2onnx", "pandas"}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    environment = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}  # the tree at `root`, not the installed one
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, env=environment, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def test_every_contract_holds():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout
    assert re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout), result.stdout


@pytest.mark.parametrize(
    ("module", "upward_import", "broken"),
    [
        ("common/errors.py", "from protocol import keys", "common.errors -> protocol.keys"),
        ("common/images.py", "from lookalike import up", "common.images -> lookalike.up"),
        ("protocol/jobs.py", "from worker import index", "protocol.jobs -> worker.index"),
        ("worker/index.py", "from lookalike import stack", "worker.index -> lookalike.stack"),
        ("web/api.py", "from worker import tasks", "web.api -> worker.tasks"),  # engines are independent
        ("export/card.py", "from worker import index", "export.card -> worker.index"),
    ],
)
def test_an_import_against_the_layers_breaks_the_check(tmp_path, module, upward_import, broken):
    """The same tree with one import added where the layers forbid it: the check fails and names the import."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as file:
        file.write(f"\n{upward_import}  # noqa: E402, F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout
    assert broken in result.stdout


@pytest.mark.slow
def test_a_running_web_process_loads_no_worker_module_while_it_serves(served, tmp_path, shared_dir):
    """`lookalike web` as it runs in production, every import it makes listed by `python -X importtime`, while it
    answers pages, a search, an item, "more like this", health and metrics from the real workers."""
    port = free_port()
    imports = tmp_path / "imports.txt"
    with open(imports, "w") as err:
        command = [sys.executable, "-X", "importtime", "-X", "faulthandler", "-m", "lookalike.cli", "web",
                   "--port", str(port)]  # fmt: skip
        web = subprocess.Popen(command, env=served.stack.env, stderr=err, stdout=subprocess.DEVNULL)
    try:
        Stack.wait_for(lambda: _status(port, "GET", "/healthz") == 200, "the web to answer", process=web)
        photo = (shared_dir / "data" / "fashion" / "images" / "10186.jpg").read_bytes()
        job = json.loads(_search(port, photo))
        for path in ("/", "/catalog", job["status_url"], job["page_url"], "/api/items/10186",
                     "/api/items/10186/similar?k=3", "/items/10186", "/metrics", "/api/catalog/loads"):  # fmt: skip
            assert _status(port, "GET", path) == 200, path
    finally:
        # SIGTERM, as a supervisor stops it: a SIGINT is ignored by a process started from a background job
        web.send_signal(signal.SIGTERM)
        try:
            web.wait(60)
        except subprocess.TimeoutExpired:  # say where it hangs: faulthandler writes every thread's stack on SIGABRT
            web.send_signal(signal.SIGABRT)
            web.wait(10)
            stacks = [line for line in imports.read_text().splitlines() if "import time:" not in line]
            raise AssertionError("`lookalike web` did not stop on SIGTERM:\n" + "\n".join(stacks[-80:])) from None
    loaded = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in imports.read_text().splitlines() if "|" in line}
    assert "flask" in loaded and "protocol" in loaded  # the listing is real
    assert loaded & NOT_IN_THE_WEB == set()


def _status(port: int, method: str, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        return connection.getresponse().status
    except OSError:
        return 0
    finally:
        connection.close()


def _search(port: int, photo: bytes) -> bytes:
    boundary = "lookalike-test"
    body = io.BytesIO()
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'.encode())
    body.write(b"Content-Type: image/jpeg\r\n\r\n" + photo + f"\r\n--{boundary}--\r\n".encode())
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(
        "POST", "/api/search", body.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    response = connection.getresponse()
    assert response.status == 202
    return response.read()
