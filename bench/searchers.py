"""Clients and meters of bench/search_cost.py: shoppers that search the anchor (one request) or lookalike with
`wait` (as the results page does now), the CPU each process of a run used, and the web's own request counters.

Polling clients are bench/shoppers.py's `Shopper`; these are shoppers too (the same photos in the same order, the
same patience, a refusal waits its Retry-After), so only the way a search is asked for differs.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path

from search_scaling import cpu_seconds
from shoppers import FIRST_POLL, LONGEST_POLL, PATIENCE, K, Shopper, post_form

from lookalike.redis_server import EmbeddedRedis
from lookalike.stack import Stack

WAIT_SECONDS = 10  # the server's cap on `wait` (web.params.MAX_WAIT_SECONDS), as the results page asks
FINISHED = ("done", "failed", "partial")
METRIC = re.compile(r"^lookalike_http_(requests_total|request_duration_seconds_sum)\{(.*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


class AnchorSearcher(Shopper):
    """The anchor: POST /search answers the hits in the same request."""

    def search(self, connection: http.client.HTTPConnection, photo: Path) -> bool | str:
        status, body, headers = post_form(connection, "/search", photo, {"k": str(K)})
        self.statuses[status] += 1
        if status in (429, 503):
            return self.refused(status, body, headers)
        return status == 200 and isinstance(body.get("hits"), list)


class WaitingSearcher(Shopper):
    """lookalike with `wait`: POST /api/search?wait=10 answers 200 and the finished job when it finishes in time;
    a 202 (no thread of the web was free to wait) is followed as the results page follows it now: GET the job with
    `wait`, at once, then after 50 ms and 1.5 times longer each time the server could not wait."""

    def search(self, connection: http.client.HTTPConnection, photo: Path) -> bool | str:
        status, body, headers = post_form(connection, "/api/search", photo, {"k": str(K), "wait": str(WAIT_SECONDS)})
        self.statuses[status] += 1
        if status == 200:
            return body["state"] == "done"
        if status != 202:
            return self.refused(status, body, headers)
        return self.follow_waiting(connection, f"{body['status_url']}?wait={WAIT_SECONDS}")

    @staticmethod
    def follow_waiting(connection: http.client.HTTPConnection, url: str) -> bool:
        delay, deadline = 0.0, time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(max(delay * 1.5, FIRST_POLL), LONGEST_POLL)
            connection.request("GET", url)
            response = connection.getresponse()
            job = json.loads(response.read())
            if response.status != 200:
                return False
            if job["state"] in FINISHED:
                return job["state"] == "done"
        return False


def stack_processes(stack: Stack, redis_server: EmbeddedRedis) -> dict[str, list[int]]:
    """The pids of a lookalike run by part: the web, query processes, replicas, the owner and embed workers (with
    their pool children), Redis."""
    parts: dict[str, list[int]] = {"web": [], "query": [], "replica": [], "owner, embed": [], "Redis": []}
    for name, process in stack.processes.items():
        part = next((part for part in ("web", "query", "replica") if name.startswith(part)), "owner, embed")
        parts[part] += [process.pid, *stack.pool_children(name)]
    parts["Redis"].append(redis_server.process.pid)
    return parts


def cpu_by_part(parts: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds each part's processes have used so far."""
    return {part: cpu_seconds(pids) for part, pids in parts.items()}


def web_requests(base_url: str) -> tuple[Counter[str], Counter[str]]:
    """The web's own counters (GET /metrics): requests answered by `METHOD route`, and seconds spent on them."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    for line in text.splitlines():
        match = METRIC.match(line)
        if not match:
            continue
        labels = dict(LABEL.findall(match.group(2)))
        if match.group(1) == "requests_total":
            counts[f"{labels['method']} {labels['route']}"] += float(match.group(3))
        else:
            seconds[labels["route"]] += float(match.group(3))
    return counts, seconds
