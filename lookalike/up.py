"""`lookalike up`: Redis, the index worker, embed workers and the web on this machine, started and stopped together."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from common.errors import LookalikeError
from common.settings import Settings, defaults
from lookalike.cli import STOP_SIGNALS
from lookalike.redis_server import EmbeddedRedis
from lookalike.stack import Stack
from lookalike.web_cli import announce_api_key
from protocol.connection import redis_client
from protocol.heartbeats import Role, alive

WATCH_SECONDS = 1.0
ROOT_FILE = "catalog-root"  # in DATA_DIR: the catalogue root `up` chose; item references are relative to it
OWN_CATALOG = "catalog"  # in DATA_DIR: the catalogue root until a --catalog names one


class ProcessExited(LookalikeError):
    """A process of ours ended on its own: everything stops."""


def configure(up: argparse.ArgumentParser) -> None:
    up.add_argument("--port", type=int, default=8000, help="port of the web pages and API (default 8000)")
    up.add_argument("--host", default="127.0.0.1", help="address the web listens on (default 127.0.0.1)")
    up.add_argument(
        "--redis-url",
        help="a Redis of your own, or its sentinels (sentinel://host:port;sentinel://host:port/db, with "
        "LOOKALIKE_REDIS_MASTER), instead of the embedded one (default LOOKALIKE_REDIS_URL when set)",
    )
    up.add_argument(
        "--model", type=Path, help=f"an ONNX model with the contract (default: {defaults()['LOOKALIKE_MODEL']})"
    )
    up.add_argument(
        "--catalog", type=Path, help="load this catalogue on start: a CSV, folder, tar archive or styles.csv+images/"
    )
    up.add_argument(
        "--replicas",
        type=int,
        help="index replicas, read-only copies that answer searches (default LOOKALIKE_REPLICAS, "
        f"{defaults()['LOOKALIKE_REPLICAS']}; 0: the owner answers)",
    )
    up.add_argument(
        "--query-processes",
        type=int,
        help="processes that embed searches, sharing the cores (default LOOKALIKE_QUERY_PROCESSES, "
        f"{defaults()['LOOKALIKE_QUERY_PROCESSES']})",
    )
    up.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from common.model import load_model

    environ = dict(os.environ)
    if args.redis_url:
        environ["LOOKALIKE_REDIS_URL"] = args.redis_url
    for variable, value in (("LOOKALIKE_REPLICAS", args.replicas), ("LOOKALIKE_QUERY_PROCESSES", args.query_processes)):
        if value is not None:
            environ[variable] = str(value)  # checked with the other settings, below
    if args.model:
        environ["LOOKALIKE_MODEL"] = str(args.model.expanduser().resolve())
    catalog = args.catalog.expanduser().resolve() if args.catalog else None
    if catalog is not None and not catalog.exists():
        raise LookalikeError(f"catalogue {args.catalog} does not exist")
    if not environ.get("LOOKALIKE_CATALOG_ROOT"):
        environ["LOOKALIKE_CATALOG_ROOT"] = str(catalog_root(Settings.from_env(environ).data_dir, catalog))
    settings = Settings.from_env(environ)
    if not settings.model.is_file():
        raise LookalikeError(
            f"no model at {settings.model}: export one with `lookalike export` (ResNet50, ImageNet weights) or pass "
            "--model PATH (any ONNX model with the contract)"
        )
    load_model(settings.model, ["cpu"])  # refuses a model that breaks the contract, here, in one line

    embedded = None
    if not environ.get("LOOKALIKE_REDIS_URL"):
        embedded = EmbeddedRedis(settings.data_dir / "redis", maxmemory=settings.redis_maxmemory)
    stack = None
    try:
        if embedded is not None:
            embedded.start()
            print(f"redis: {embedded.url} (embedded, data in {embedded.directory})", file=sys.stderr)
            environ["LOOKALIKE_REDIS_URL"] = embedded.url
            settings = Settings.from_env(environ)
        refuse_a_second_index_owner(settings)
        extra = {name: environ[name] for name in environ if name.startswith("LOOKALIKE_")}
        stack = Stack(settings.redis_url, settings.data_dir, settings.model, settings.catalog_root, **extra)
        if embedded is not None:
            stack.log_paths["redis"] = embedded.log  # capped with the others while up runs
        if not settings.api_key:
            announce_api_key(settings.data_dir)  # before the web starts: it then finds the key, and shows it no more
        print(f"workers: starting (logs in {stack.logs})", file=sys.stderr)
        start_workers(stack, settings)
        url = stack.start_web(args.port, args.host)
        print(f"lookalike is up: {url}/  (Ctrl-C stops it)", flush=True)
        if catalog is not None:
            load(stack, catalog)
        watch(stack)
    except KeyboardInterrupt:
        print("\nstopping ...", file=sys.stderr)
    except AssertionError as error:  # a process did not come up: say which, and where its log is
        raise LookalikeError(f"{error} (see the logs in {settings.data_dir / 'logs'})") from None
    finally:
        for signum in STOP_SIGNALS:  # a second Ctrl-C must not cut the stopping short
            signal.signal(signum, signal.SIG_IGN)
        if stack is not None:
            stack.stop()
        if embedded is not None:
            embedded.stop()
    return 0


def start_workers(stack: Stack, settings: Settings) -> None:
    """The index owner first (the replicas load its snapshot), then replicas, query processes and embedders."""
    stack.start("index")
    for number in range(1, settings.replicas + 1):
        stack.start("replica", f"replica-{number}")
    for number in range(1, settings.query_processes + 1):
        stack.start("query", f"query-{number}")
    stack.start("embed")


def catalog_root(data_dir: Path, catalog: Path | None) -> Path:
    """The root this data folder's index was loaded from, else the catalogue's own folder (then remembered):
    items refer to their images relative to it, so it must not move between runs. With neither, an empty folder
    of the data folder's own: never the current directory, whose images the thumbnails would then serve."""
    saved = data_dir / ROOT_FILE
    if saved.is_file():
        root = Path(saved.read_text().strip())
        if catalog is not None and not catalog.is_relative_to(root):
            raise LookalikeError(
                f"{catalog} is outside {root}, the catalogue root of the index in {data_dir}; set "
                "LOOKALIKE_CATALOG_ROOT to a folder that holds both, or use another LOOKALIKE_DATA_DIR"
            )
        return root
    data_dir.mkdir(parents=True, exist_ok=True)
    if catalog is None:
        own = data_dir / OWN_CATALOG
        own.mkdir(exist_ok=True)
        return own
    root = catalog if catalog.is_dir() else catalog.parent
    saved.write_text(f"{root}\n")
    return root


def refuse_a_second_index_owner(settings: Settings) -> None:
    """One index owner per Redis: another one (a shared external Redis) would take our searches and changes."""
    beats = alive(redis_client(settings, timeout=5), Role.INDEX)
    owners = [beat for beat in beats if owner_lives(beat, settings.index_dir)]
    if owners:
        owner = owners[0]
        raise LookalikeError(
            f"an index worker already runs against {settings.redis_url} (pid {owner['pid']} on {owner['host']}); "
            "stop it, or point LOOKALIKE_REDIS_URL at a Redis of this deployment's own"
        )


def owner_lives(beat: dict[str, Any], index_dir: Path) -> bool:
    """Whether the owner a recent heartbeat tells of still runs. A heartbeat outlives its process: after a power
    cut, Redis's append-only file brings it back as fresh as it was. The owner of our own index folder proves its
    life by the folder's lock; another index's owner on this host by its pid; one elsewhere can't be checked."""
    from worker.aliases import serving_folder
    from worker.snapshots import current_index_id
    from worker.store import owner_holds_lock

    if beat.get("index_id") and beat["index_id"] == current_index_id(serving_folder(index_dir)):
        return owner_holds_lock(index_dir)
    if beat["host"] == socket.gethostname():
        return pid_runs(beat["pid"])
    return True


def pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def load(stack: Stack, catalog: Path) -> None:
    from lookalike.client_cli import follow_load
    from protocol.client import Client

    client = Client(stack.settings)
    print(f"loading {catalog} (items the index already holds unchanged are not embedded again)", file=sys.stderr)
    try:
        follow_load(client, client.start_load(catalog), check=lambda: tend(stack))
    except ProcessExited:
        raise
    except LookalikeError as error:  # the service still runs: a better catalogue can be loaded from the web
        print(f"the catalogue was not loaded: {error}", file=sys.stderr)


def watch(stack: Stack) -> None:
    """Wait for Ctrl-C or SIGTERM, tending the processes."""
    while True:
        tend(stack)
        time.sleep(WATCH_SECONDS)


def tend(stack: Stack) -> None:
    """A process that dies on its own takes the rest down, with a reason; a log that grew too long is rotated."""
    check_processes(stack)
    stack.cap_logs()


def check_processes(stack: Stack) -> None:
    for kind, process in stack.processes.items():
        if process.poll() is not None:
            raise ProcessExited(f"the {kind} process exited ({process.returncode}); see {stack.log_paths[kind]}")
