"""Worker and web processes started and stopped together: for `lookalike up`, the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common.errors import LookalikeError
from common.settings import Settings
from protocol.connection import redis_client
from protocol.heartbeats import heartbeats

LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))
LOG_MAX_BYTES = 10 * 1024 * 1024  # a process's log past this is rotated (`lookalike up` looks every second)
LOG_BACKUPS = 5  # rotated logs kept of each process: <name>.log.1 (the newest) to .5


def rotate_log(path: Path) -> None:
    """<name>.log -> .1 -> .2 ..., the oldest dropped, as logging's RotatingFileHandler does; but copied and emptied
    in place (logrotate's copytruncate): the process writing it keeps its file open, appending at the new end."""
    if not path.is_file() or not path.stat().st_size:
        return
    for number in range(LOG_BACKUPS - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(f"{path.name}.{number}").replace(path.with_name(f"{path.name}.{number + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.truncate(path, 0)


def cap_log(path: Path) -> None:
    """Rotate the log once it is over LOG_MAX_BYTES."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_MAX_BYTES:
            rotate_log(path)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP status, even 503, means the server is up
    except OSError:
        return False


class Stack:
    """One lookalike deployment on this machine: a Redis URL, a data folder and its worker processes."""

    def __init__(self, redis_url: str, data_dir: Path, model: Path, catalog_root: Path, **extra_env: str) -> None:
        self.env = {
            **os.environ,
            "LOOKALIKE_REDIS_URL": redis_url,
            "LOOKALIKE_DATA_DIR": str(data_dir),
            "LOOKALIKE_MODEL": str(model),
            "LOOKALIKE_CATALOG_ROOT": str(catalog_root),
            **extra_env,
        }
        self.settings = Settings.from_env(self.env)
        self.redis = redis_client(self.settings)
        self.processes: dict[str, subprocess.Popen] = {}
        self.log_paths: dict[str, Path] = {}  # kind -> the log of its latest process, <kind>.log
        self.logs = data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, kind: str, name: str = "") -> subprocess.Popen:
        """Start `lookalike worker <kind>` and wait until it (or a pool process of its) reports in; `name` tells
        several workers of a kind apart (default: the kind)."""
        name = name or kind
        process = self._spawn(name, "worker", kind)

        def reported() -> bool:
            ours = {process.pid, *self.pool_children(name)}
            return any(beat["pid"] in ours for beat in self.heartbeat(kind))

        self.wait_for(reported, f"the {name} worker to report in", process=process)
        return process

    def start_web(self, port: int, host: str = "127.0.0.1") -> str:
        """Start `lookalike web` and wait until it answers; returns its base URL."""
        url = f"http://{host}:{port}"
        if _answers(f"{url}/healthz"):
            raise LookalikeError(f"something already listens on {host}:{port}; choose another port")
        process = self._spawn("web", "web", "--host", host, "--port", str(port))
        self.wait_for(lambda: _answers(f"{url}/healthz"), f"the web server on {url}", process=process)
        return url

    def _spawn(self, kind: str, *argv: str) -> subprocess.Popen:
        """`lookalike <argv>` in a session of its own (so its whole group can be stopped), logging to a file."""
        self.log_paths[kind] = self.logs / f"{kind}.log"
        rotate_log(self.log_paths[kind])  # the last start's log becomes <kind>.log.1
        log = open(self.log_paths[kind], "ab")  # noqa: SIM115 - the child keeps it; closed just below
        process = subprocess.Popen(
            [LOOKALIKE, *argv], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.processes[kind] = process
        return process

    def cap_logs(self) -> None:
        """Rotate each log that grew past LOG_MAX_BYTES: `lookalike up` calls this while it runs."""
        for path in self.log_paths.values():
            cap_log(path)

    def heartbeat(self, role: str, since: float = 0.0) -> list[dict[str, Any]]:
        return heartbeats(self.redis, role, since)

    def kill(self, kind: str, sig: int = signal.SIGKILL) -> None:
        """Kill a worker and every process of its group (its pool children too)."""
        process = self.processes.pop(kind)
        os.killpg(process.pid, sig)
        process.wait(30)

    def pool_children(self, kind: str) -> list[int]:
        """The pool processes of a prefork worker (its direct children)."""
        parent = self.processes[kind].pid
        result = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True, check=False)
        return [int(pid) for pid in result.stdout.split()]

    def stop(self) -> None:
        """Stop every process: politely first, then by force, its whole group; nothing is left behind."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # pool children that outlived their parent
        self.processes.clear()

    @staticmethod
    def wait_for(condition, what: str, timeout: float = 60, process: subprocess.Popen | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if process is not None and process.poll() is not None:
                raise AssertionError(f"the process exited ({process.returncode}) while waiting for {what}")
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
