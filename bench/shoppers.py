"""Clients that search through the web as the results page does: POST a photo, poll its job, again.

Used by bench/search_scaling.py and bench/load.py.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

FIRST_POLL, BACKOFF, LONGEST_POLL = 0.05, 1.5, 2.0  # as web/static/app.js polls
PATIENCE = 120  # seconds a client follows one job before it counts the search as failed
FAILED = -1  # the status under which a client counts an accepted search that did not end done
REFUSED = "refused"  # a search the service refused (busy): not a failed one
ANSWERED = "answered"
K = 10  # results a search asks for


class Budget:
    """Uploads left to make, shared by every client of a run."""

    def __init__(self, uploads: int | None) -> None:
        self.left = uploads
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left is None:
                return True
            if self.left <= 0:
                return False
            self.left -= 1
            return True


class Shopper(threading.Thread):
    """One client: search, follow the job to its result, repeat until `until` (monotonic) or the budget is spent.

    A refused upload waits as its Retry-After says; `refusals` counts each answer but 202 by status and error
    code ("no reason" when the body has none, "no Retry-After" when a 429/503 lacks it). An accepted search that
    ends failed, can't be followed (its job answers other than 200; a 503 is asked again after its Retry-After) or
    takes longer than PATIENCE counts as FAILED; a client that breaks off (a dropped connection) counts its upload
    as FAILED too. `timeline` keeps each search's start, end and outcome.
    """

    def __init__(
        self, port: int, photos: list[Path], until: float, offset: int, budget: Budget | None = None,
        host: str = "127.0.0.1",
    ) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.host, self.port, self.photos, self.until, self.offset = host, port, photos, until, offset
        self.budget = budget or Budget(None)
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.refusals: Counter[str] = Counter()
        self.timeline: list[tuple[float, float, str]] = []  # (started, ended: monotonic, outcome) of each search

    def run(self) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        made = 0
        while time.monotonic() < self.until and self.budget.take():
            photo = self.photos[(self.offset + made) % len(self.photos)]
            made += 1
            started, outcome = time.monotonic(), False
            try:
                outcome = self.search(connection, photo)
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                connection.close()  # the next request opens a new connection
            ended = time.monotonic()
            if outcome is True:
                self.latencies.append(ended - started)
            elif outcome is False:
                self.statuses[FAILED] += 1
            self.timeline.append((started, ended, {True: ANSWERED, False: "failed"}.get(outcome, REFUSED)))

    def search(self, connection: http.client.HTTPConnection, photo: Path) -> bool | str:
        """One search: True when it ended done, False when not, REFUSED when the service refused it."""
        status, body, headers = post_form(connection, "/api/search", photo, {"k": str(K)})
        self.statuses[status] += 1
        if status != 202:
            return self.refused(status, body, headers)
        return self.follow(connection, body["status_url"])

    def refused(self, status: int, body: dict, headers: dict[str, str]) -> str:
        """Count the refusal and wait as its Retry-After says (a refusal is not a failed search)."""
        self.refusals[f"{status} {body.get('error', {}).get('code', 'no reason')}"] += 1
        if status in (429, 503) and "Retry-After" not in headers:
            self.refusals[f"{status} no Retry-After"] += 1
        time.sleep(min(float(headers.get("Retry-After", 0.5)), 5.0))
        return REFUSED

    @staticmethod
    def follow(connection: http.client.HTTPConnection, status_url: str) -> bool:
        """Poll a search job like the results page does; True when it ends done within PATIENCE seconds."""
        delay, deadline = FIRST_POLL, time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * BACKOFF, LONGEST_POLL)
            connection.request("GET", status_url)
            response = connection.getresponse()
            job = json.loads(response.read())
            if response.status == 503:  # Redis away (a restart, a failover): asked again as Retry-After says
                time.sleep(min(float(response.getheader("Retry-After", "1")), 5.0))
                continue
            if response.status != 200:
                return False
            if job["state"] in ("done", "failed"):
                return job["state"] == "done"
        return False


def multipart(photo: Path, fields: dict[str, str]) -> tuple[bytes, str]:
    """A form of text `fields` and the photo as the file `image`: its body and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]  # fmt: skip
    body = b"".join([
        *parts, f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{photo.name}"\r\n'.encode(),
        b"Content-Type: image/jpeg\r\n\r\n", photo.read_bytes(), f"\r\n--{boundary}--\r\n".encode(),
    ])  # fmt: skip
    return body, f"multipart/form-data; boundary={boundary}"


def post_form(
    connection: http.client.HTTPConnection, path: str, photo: Path, fields: dict[str, str]
) -> tuple[int, dict, dict[str, str]]:
    """POST a photo as multipart `image` with text `fields`: the status, the JSON body ({} if none), the headers."""
    body, content_type = multipart(photo, fields)
    connection.request("POST", path, body, {"Content-Type": content_type})
    response = connection.getresponse()
    data = response.read()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {}
    return response.status, answer, dict(response.getheaders())


def run_clients(
    port: int,
    photos: list[Path],
    clients: int,
    seconds: float,
    uploads: int | None = None,
    host: str = "127.0.0.1",
    kind: type[Shopper] = Shopper,
) -> tuple[list[float], Counter[int], Counter[str]]:
    """`clients` shoppers (of `kind`) for `seconds` (or until `uploads` uploads): latencies, answers by status,
    refusals."""
    until, budget = time.monotonic() + seconds, Budget(uploads)
    shoppers = [kind(port, photos, until, offset=97 * n, budget=budget, host=host) for n in range(clients)]
    for shopper in shoppers:
        shopper.start()
    for shopper in shoppers:
        shopper.join()
    statuses: Counter[int] = Counter()
    refusals: Counter[str] = Counter()
    for shopper in shoppers:
        statuses.update(shopper.statuses)
        refusals.update(shopper.refusals)
    return [value for shopper in shoppers for value in shopper.latencies], statuses, refusals
