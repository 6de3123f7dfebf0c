"""/healthz as a container engine and a load balancer read it, and `lookalike healthcheck`, the compose file's check."""

from __future__ import annotations

import subprocess

from lookalike.redis_server import free_port
from lookalike.stack import LOOKALIKE


def healthcheck(url: str) -> subprocess.CompletedProcess:
    return subprocess.run([LOOKALIKE, "healthcheck", "--url", url], capture_output=True, text=True, timeout=60)


def test_a_service_without_embed_workers_is_degraded_and_healthy_while_it_answers_searches(make_stack):
    stack = make_stack()
    stack.start("index")
    stack.start("query")
    url = stack.start_web(free_port())
    check = healthcheck(url)
    assert (check.returncode, check.stdout.strip()) == (0, "degraded"), check
    stack.start("embed")
    check = healthcheck(url)
    assert (check.returncode, check.stdout.strip()) == (0, "ok"), check


def test_a_service_that_cannot_answer_searches_fails_its_health_check(make_stack):
    stack = make_stack()
    url = stack.start_web(free_port())  # no index owner, replica or query worker
    check = healthcheck(url)
    assert check.returncode == 1 and "503 unavailable" in check.stdout, check
    nobody = f"http://127.0.0.1:{free_port()}"
    check = healthcheck(nobody)
    assert check.returncode == 1 and "no answer" in check.stdout, check
