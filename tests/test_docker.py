"""docker-compose.yml, its GPU and HA files read as files: the services against the configuration the code reads,
and what keeps the file the same under `docker compose` and podman-compose 1.0.3. tests/test_containers.py builds
and runs them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from common.settings import Settings, defaults
from lookalike.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
GPU_SERVICES = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]
HA = yaml.safe_load((REPO / "docker-compose.ha.yml").read_text())
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
WORKERS = ("worker-index", "worker-replica", "worker-query", "worker-embed")
SCALED = ("worker-replica", "worker-query", "worker-embed")


def mount(volume: str) -> tuple[str, str]:
    """`source:target[:ro]` -> (target, source); the source may itself hold a `${VAR:-default}`."""
    parts = volume.rsplit(":", 2) if volume.endswith((":ro", ":rw")) else volume.rsplit(":", 1)
    return parts[1], parts[0]


def test_the_services_of_a_deployment_are_there():
    assert set(SERVICES) == {"redis", "export", "web", *WORKERS}
    assert SERVICES["redis"]["image"].endswith(":-redis:7-alpine}")  # the official image unless told otherwise
    assert (
        SERVICES["redis"]["command"] == ["sh", "/redis/node.sh"] and SERVICES["redis"]["environment"]["NODE"] == "redis"
    )
    assert {"redis:/data", "./docker/redis:/redis:ro"} <= set(SERVICES["redis"]["volumes"])
    assert set(COMPOSE["volumes"]) == {"redis", "models", "data", "index"}
    assert SERVICES["web"]["ports"] == ["${LOOKALIKE_PORT:-8000}:8000"] and "8000" in SERVICES["web"]["command"]
    for name in SCALED:  # scaled with --scale: no fixed name, no published port
        assert "container_name" not in SERVICES[name] and "ports" not in SERVICES[name]


def test_the_file_means_the_same_to_docker_compose_and_podman_compose():
    """podman-compose 1.0.3 keeps `${VAR:-}` as text, ignores profiles and depends_on conditions, and turns a CMD
    health check into one `sh -c` line (an argument that needs quoting breaks)."""
    scaled = yaml.safe_load((REPO / "docker-compose.scale.yml").read_text())["services"]
    assert set(scaled) <= set(SERVICES) and all(service["deploy"]["replicas"] > 1 for service in scaled.values())
    for path in ("docker-compose.yml", "docker-compose.gpu.yml", "docker-compose.scale.yml", "docker-compose.ha.yml"):
        text = "\n".join(line.partition("#")[0] for line in (REPO / path).read_text().splitlines())
        assert not re.search(r"\$\{\w+:-\}", text) and "profiles" not in text and "condition:" not in text
    for service in SERVICES.values():
        for word in service.get("healthcheck", {}).get("test", [])[1:]:
            assert re.fullmatch(r"[\w./-]+", word), word
    assert SERVICES["web"]["healthcheck"]["test"] == ["CMD", "lookalike", "healthcheck"]


@pytest.mark.parametrize("name", ["web", *WORKERS])
def test_each_service_runs_a_real_command_with_settings_the_code_reads(name):
    service = SERVICES[name]
    build_parser().parse_args(service["command"])  # exits (fails the test) on an unknown command or option
    environment = service["environment"]
    known = set(defaults())
    assert set(environment) <= known, set(environment) - known
    given = {key: value for key, value in environment.items() if value is not None and "${" not in str(value)}
    settings = Settings.from_env(given)
    mounts = dict(mount(volume) for volume in service["volumes"])
    assert mounts[str(settings.data_dir)] == "data"
    if name == "worker-index":
        assert mounts[str(settings.index_dir)] == "index"  # the index in a volume of its own
    if name == "worker-replica":  # the owner's snapshots, which a replica reads and never writes
        assert f"index:{settings.index_dir}:ro" in service["volumes"]
        assert "worker-index" in service["depends_on"]
    if name not in ("worker-index", "worker-replica"):
        assert "index" not in mounts.values()  # only the owner writes the index, only replicas read it
    assert str(settings.catalog_root) in mounts
    if name not in ("web", "worker-replica"):  # a replica answers by vector: it needs no model
        assert mounts[str(settings.model.parent)] == "models"
        assert "export" in service["depends_on"] and settings.model_wait >= 600  # the model may come minutes later
    assert "redis" in service["depends_on"]
    assert settings.redis_url.startswith("redis://redis:")


def test_the_export_writes_the_model_the_workers_read_and_only_once():
    export = SERVICES["export"]
    args = build_parser().parse_args(export["command"])
    model = Settings.from_env({"LOOKALIKE_MODEL": SERVICES["worker-index"]["environment"]["LOOKALIKE_MODEL"]}).model
    assert args.out == model and args.if_missing and args.source == "${LOOKALIKE_MODEL_SOURCE:-imagenet}"
    assert set(export["volumes"]) == {"models:/models", "${LOOKALIKE_MODEL_IMPORT:-./models}:/import:ro"}


@pytest.mark.parametrize(("name", "base"), [("worker-embed-gpu", "worker-embed"), ("worker-query-gpu", "worker-query")])
def test_the_gpu_file_adds_workers_on_onnxruntime_gpu_that_reserve_nvidia_gpus(name, base):
    """Written out again (docker compose refuses `extends` of a service with depends_on): the same command,
    settings, volumes and order as the CPU worker, and only the GPU's own differences."""
    gpu, cpu = GPU_SERVICES[name], SERVICES[base]
    assert gpu["build"]["args"] == {**cpu["build"]["args"], "EXTRA": "gpu"} and gpu["image"] == "lookalike-worker:gpu"
    assert gpu["build"]["dockerfile"] == cpu["build"]["dockerfile"]
    for key in ("command", "volumes", "depends_on", "restart"):
        assert gpu[key] == cpu[key], key
    own = {"LOOKALIKE_PROVIDERS", "LOOKALIKE_QUERY_BATCH", "LOOKALIKE_EMBED_PROCESSES"}
    assert {k: v for k, v in gpu["environment"].items() if k not in own} == {
        k: v for k, v in cpu["environment"].items() if k not in own
    }
    assert gpu["environment"]["LOOKALIKE_PROVIDERS"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for service_name, service in SERVICES.items():
        if "build" in service:
            assert (REPO / service["build"]["dockerfile"]).is_file(), service_name


def test_the_ha_file_adds_a_replica_and_three_sentinels_and_points_every_service_at_them():
    services = HA["services"]
    assert set(services) == {"redis", "redis-replica", *SENTINELS, "web", *WORKERS}
    master = services["redis"]["environment"]["LOOKALIKE_REDIS_MASTER"]
    assert services["redis-replica"]["command"] == SERVICES["redis"]["command"]  # the same script: one set of flags
    assert services["redis-replica"]["environment"] == {"NODE": "redis-replica", "LOOKALIKE_REDIS_MASTER": master}
    for name in SENTINELS:
        sentinel = services[name]
        assert sentinel["command"] == ["sh", "/redis/sentinel.sh"] and f"{name}:/data" in sentinel["volumes"]
        assert sentinel["environment"]["NODE"] == name and sentinel["environment"]["LOOKALIKE_REDIS_MASTER"] == master
    assert set(HA["volumes"]) == {"redis-replica", *SENTINELS}
    for name in ("web", *WORKERS):
        assert services[name]["depends_on"] == list(SENTINELS)  # started after them, stopped before them
        settings = Settings.from_env(services[name]["environment"])
        assert settings.redis_master == master
        assert [part.split("://")[1].split(":")[0] for part in settings.redis_url.split(";")] == list(SENTINELS)


def node_command(tmp_path: Path, node: str, master: str, sentinels_say: str) -> list[str]:
    """The redis-server command line docker/redis/node.sh runs, with `redis-cli` answering `sentinels_say` (nothing:
    no sentinel answers) and no time spent waiting for them."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, body in (("redis-cli", f"printf '%s' '{sentinels_say}'"), ("sleep", "true"),
                       ("redis-server", 'printf "%s\\n" "$@"')):  # fmt: skip
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    environment = {"PATH": f"{stubs}:/usr/bin:/bin", "NODE": node, "LOOKALIKE_REDIS_MASTER": master}
    done = subprocess.run(["sh", REPO / "docker" / "redis" / "node.sh"], env=environment, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout.split()


@pytest.mark.parametrize(
    ("node", "master", "sentinels_say", "replica_of"),
    [
        ("redis", "", "", None),  # docker-compose.yml alone: the one Redis
        ("redis", "lookalike", "", None),  # the first start: no sentinel knows a primary yet
        ("redis-replica", "lookalike", "", "redis"),
        ("redis", "lookalike", "redis-replica\n6379", "redis-replica"),  # back after a failover: a replica
        ("redis-replica", "lookalike", "redis-replica\n6379", None),  # the primary the sentinels chose
    ],
)
def test_a_redis_node_starts_as_a_replica_of_the_primary_the_sentinels_name(tmp_path, node, master, sentinels_say,
                                                                             replica_of):  # fmt: skip
    command = node_command(tmp_path, node, master, sentinels_say)
    assert {"--appendonly", "--maxmemory-policy", "noeviction"} <= set(command)
    if replica_of is None:
        assert "--replicaof" not in command
    else:
        at = command.index("--replicaof")
        assert command[at + 1 : at + 3] == [replica_of, "6379"]


def test_the_sentinel_script_writes_its_config_once_and_keeps_what_it_learnt(tmp_path):
    script = (REPO / "docker" / "redis" / "sentinel.sh").read_text().replace("/data/", f"{tmp_path}/")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "redis-server").write_text('#!/bin/sh\necho "$@"\n')
    (stubs / "redis-server").chmod(0o755)
    environment = {"PATH": f"{stubs}:/usr/bin:/bin", "NODE": "sentinel-2", "LOOKALIKE_REDIS_MASTER": "shop",
                   "DOWN_AFTER_MS": "2000"}  # fmt: skip
    run = subprocess.run(["sh", "-c", script], env=environment, capture_output=True, text=True, check=True)
    assert run.stdout.split() == [f"{tmp_path}/sentinel.conf", "--sentinel"]
    config = (tmp_path / "sentinel.conf").read_text()
    assert "sentinel monitor shop redis 6379 2" in config and "down-after-milliseconds shop 2000" in config
    assert "announce-ip sentinel-2" in config and "resolve-hostnames yes" in config
    (tmp_path / "sentinel.conf").write_text("learnt\n")
    subprocess.run(["sh", "-c", script], env=environment, capture_output=True, check=True)
    assert (tmp_path / "sentinel.conf").read_text() == "learnt\n"
