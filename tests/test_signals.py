"""Every kind of process stops on SIGTERM within seconds, as the first process of a container: a container engine
stops a container with SIGTERM to its PID 1, which ignores every signal it has no handler for, and kills it only
when its time-out (10 s by default) runs out."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lookalike.redis_server import free_port
from lookalike.stack import LOOKALIKE, Stack, _answers

STOP_SECONDS = 8  # what "within seconds" means here, on two busy cores; an engine waits 10 and then kills


def start_as_init(stack: Stack, name: str, *argv: str) -> subprocess.Popen:
    """`lookalike <argv>` as PID 1 of a PID namespace of its own, as a container runs its entry point."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    log = open(stack.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it; closed just below
    process = subprocess.Popen(
        ["unshare", *user, "--pid", "--fork", "--kill-child", LOOKALIKE, *argv],
        env=stack.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the fixture's Stack.stop signals its group
    )
    log.close()
    stack.processes[name] = process  # stopped by the fixture whatever the test does: --kill-child takes ours along
    return process


def init_pid(unshare: subprocess.Popen) -> int:
    """The pid, as this namespace sees it, of the process that is PID 1 inside the new one."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
    pids = Stack.wait_for(lambda: children.read_text().split(), "unshare to start its child", process=unshare)
    return int(pids[0])


def assert_stops_on_sigterm(stack: Stack, process: subprocess.Popen, kind: str) -> None:
    os.kill(init_pid(process), signal.SIGTERM)
    started = time.monotonic()
    try:
        process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        log = (stack.logs / f"{kind}.log").read_text()[-3000:]
        raise AssertionError(f"{kind} as PID 1 still runs {STOP_SECONDS} s after SIGTERM:\n{log}") from None
    assert process.returncode == 0, f"{kind} ended {process.returncode} after {time.monotonic() - started:.1f} s"


@pytest.mark.parametrize("kind", ["embed", "index", "query"])
def test_a_worker_stops_on_sigterm_as_a_containers_first_process(make_stack, kind):
    stack = make_stack()
    process = start_as_init(stack, kind, "worker", kind)
    stack.wait_for(lambda: stack.heartbeat(kind), f"the {kind} worker to report in", process=process)
    assert_stops_on_sigterm(stack, process, kind)


def test_a_replica_stops_on_sigterm_as_a_containers_first_process(make_stack):
    stack = make_stack()
    stack.start("index")  # a replica opens the owner's snapshot
    process = start_as_init(stack, "replica", "worker", "replica")
    stack.wait_for(lambda: stack.heartbeat("replica"), "the replica to report in", process=process)
    assert_stops_on_sigterm(stack, process, "replica")


def test_the_web_stops_on_sigterm_as_a_containers_first_process(make_stack):
    stack = make_stack()
    port = free_port()
    process = start_as_init(stack, "web", "web", "--port", str(port))
    stack.wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), "the web to answer", process=process)
    assert_stops_on_sigterm(stack, process, "web")


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE).group(1), 16)
    return bool(caught & 1 << (signal.SIGTERM - 1))


def test_an_embed_worker_stops_on_sigterm_while_it_starts(make_stack):
    """The window before Celery puts its own handler in place (the model check, in a process of its own): the
    signal is sent as soon as the process catches it, long before the worker reports in."""
    stack = make_stack()
    process = start_as_init(stack, "embed", "worker", "embed")
    pid = init_pid(process)
    stack.wait_for(lambda: catches_sigterm(pid), "the embed worker to catch SIGTERM", process=process)
    assert not stack.heartbeat("embed")
    assert_stops_on_sigterm(stack, process, "embed")
