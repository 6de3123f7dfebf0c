"""docker-compose.yml and docker-compose.gpu.yml read as files: the services against the configuration the code reads,
and what keeps the file the same under `docker compose` and podman-compose 1.0.3. tests/test_containers.py builds
and runs them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from common.settings import Settings, defaults
from lookalike.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
GPU_SERVICES = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]
WORKERS = ("worker-index", "worker-replica", "worker-query", "worker-embed")
SCALED = ("worker-replica", "worker-query", "worker-embed")


def mount(volume: str) -> tuple[str, str]:
    """`source:target[:ro]` -> (target, source); the source may itself hold a `${VAR:-default}`."""
    parts = volume.rsplit(":", 2) if volume.endswith((":ro", ":rw")) else volume.rsplit(":", 1)
    return parts[1], parts[0]


def test_the_services_of_a_deployment_are_there():
    assert set(SERVICES) == {"redis", "export", "web", *WORKERS}
    assert SERVICES["redis"]["image"].endswith(":-redis:7-alpine}")  # the official image unless told otherwise
    assert "--appendonly" in SERVICES["redis"]["command"] and "redis:/data" in SERVICES["redis"]["volumes"]
    assert set(COMPOSE["volumes"]) == {"redis", "models", "data", "index"}
    assert SERVICES["web"]["ports"] == ["${LOOKALIKE_PORT:-8000}:8000"] and "8000" in SERVICES["web"]["command"]
    for name in SCALED:  # scaled with --scale: no fixed name, no published port
        assert "container_name" not in SERVICES[name] and "ports" not in SERVICES[name]


def test_the_file_means_the_same_to_docker_compose_and_podman_compose():
    """podman-compose 1.0.3 keeps `${VAR:-}` as text, ignores profiles and depends_on conditions, and turns a CMD
    health check into one `sh -c` line (an argument that needs quoting breaks)."""
    scaled = yaml.safe_load((REPO / "docker-compose.scale.yml").read_text())["services"]
    assert set(scaled) <= set(SERVICES) and all(service["deploy"]["replicas"] > 1 for service in scaled.values())
    for path in ("docker-compose.yml", "docker-compose.gpu.yml", "docker-compose.scale.yml"):
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
