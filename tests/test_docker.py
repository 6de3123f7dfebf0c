"""docker-compose.yml and the Dockerfiles, checked without a Docker engine: the compose file against the
configuration the code reads, each Dockerfile by running its own instructions in a fresh virtual environment."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
import yaml

from common.settings import Settings, defaults
from lookalike.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
WORKERS = ("worker-index", "worker-replica", "worker-query", "worker-query-gpu", "worker-embed", "worker-embed-gpu")
SCALED = ("worker-replica", "worker-query", "worker-query-gpu", "worker-embed", "worker-embed-gpu")


def mount(volume: str) -> tuple[str, str]:
    """`source:target[:ro]` -> (target, source); the source may itself hold a `${VAR:-default}`."""
    parts = volume.rsplit(":", 2) if volume.endswith((":ro", ":rw")) else volume.rsplit(":", 1)
    return parts[1], parts[0]


def test_the_services_of_a_deployment_are_there():
    assert set(SERVICES) == {"redis", "export", "web", *WORKERS}
    assert SERVICES["redis"]["image"].startswith("redis:")
    assert "--appendonly" in SERVICES["redis"]["command"] and "redis:/data" in SERVICES["redis"]["volumes"]
    assert set(COMPOSE["volumes"]) == {"redis", "models", "data", "index"}
    assert SERVICES["web"]["ports"] == ["8000:8000"]
    assert "/healthz" in " ".join(SERVICES["web"]["healthcheck"]["test"])
    for name in SCALED:  # scaled with --scale: no fixed name, no published port
        assert "container_name" not in SERVICES[name] and "ports" not in SERVICES[name]


@pytest.mark.parametrize("name", ["web", *WORKERS])
def test_each_service_runs_a_real_command_with_settings_the_code_reads(name):
    service = SERVICES[name]
    build_parser().parse_args(service["command"])  # exits (fails the test) on an unknown command or option
    environment = service["environment"]
    known = set(defaults())
    assert set(environment) <= known, set(environment) - known
    settings = Settings.from_env({key: value for key, value in environment.items() if "${" not in str(value)})
    mounts = dict(mount(volume) for volume in service["volumes"])
    assert mounts[str(settings.data_dir)] == "data"
    if name == "worker-index":
        assert mounts[str(settings.index_dir)] == "index"  # the index in a volume of its own
    if name == "worker-replica":  # the owner's snapshots, which a replica reads and never writes
        assert f"index:{settings.index_dir}:ro" in service["volumes"]
        assert service["depends_on"]["worker-index"]["condition"] == "service_started"
    if name not in ("worker-index", "worker-replica"):
        assert "index" not in mounts.values()  # only the owner writes the index, only replicas read it
    assert str(settings.catalog_root) in mounts
    if name not in ("web", "worker-replica"):  # a replica answers by vector: it needs no model
        assert mounts[str(settings.model.parent)] == "models"
        assert service["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert settings.redis_url.startswith("redis://redis:")


def test_the_export_writes_the_model_the_workers_read_and_only_once():
    command = " ".join(SERVICES["export"]["entrypoint"])
    model = Settings.from_env(SERVICES["worker-index"]["environment"]).model
    assert f"test -f {model} ||" in command and f"lookalike export --out {model}" in command
    assert "models:/models" in SERVICES["export"]["volumes"]


@pytest.mark.parametrize("name", ["worker-embed-gpu", "worker-query-gpu"])
def test_the_gpu_profile_builds_onnxruntime_gpu_and_reserves_nvidia_gpus(name):
    gpu = SERVICES[name]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["EXTRA"] == "gpu"
    assert gpu["environment"]["LOOKALIKE_PROVIDERS"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for name, service in SERVICES.items():
        if "build" in service:
            assert (REPO / service["build"]["dockerfile"]).is_file(), name


# -- the Dockerfiles' own instructions, run here --------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def build_here(dockerfile: Path, where: Path, args: dict[str, str]) -> tuple[Path, list[str]]:
    """Follow the Dockerfile in a fresh virtual environment (its python standing in for the base image's) in
    `where`; apt-get is a no-op (the build tools are on this machine). Returns the environment and ENTRYPOINT+CMD."""
    environment = where / "venv"
    venv.create(environment, with_pip=True)
    shims = where / "shims"
    shims.mkdir()
    (shims / "apt-get").write_text("#!/bin/sh\necho apt-get skipped in the test: $*\n")
    # The base image has no compiler: an image whose Dockerfile installs none must not need one.
    compilers = () if "g++" in dockerfile.read_text() else ("gcc", "g++", "cc", "c++")
    for compiler in compilers:
        (shims / compiler).write_text(f"#!/bin/sh\necho {compiler}: there is no compiler in this image >&2\nexit 1\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{environment / 'bin'}:{shims}:{os.environ['PATH']}", "VIRTUAL_ENV": str(environment)}
    if compilers:
        env |= {"CC": str(shims / "gcc"), "CXX": str(shims / "g++")}
    env.pop("PYTHONPATH", None)
    workdir, entrypoint, command = where, [], []
    for instruction, arguments in instructions(dockerfile):
        if instruction == "ARG":
            name, _, default = arguments.partition("=")
            env[name] = args.get(name, default)
        elif instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(arguments))
        elif instruction == "WORKDIR":
            workdir = where / arguments.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, target = arguments.split()
            for source in sources:
                destination = workdir / target / source if target.endswith("/") else workdir / target
                if (REPO / source).is_dir():
                    shutil.copytree(
                        REPO / source, destination, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
                    )
                else:
                    shutil.copy(REPO / source, destination)
        elif instruction == "RUN":
            subprocess.run(["sh", "-c", arguments], cwd=workdir, env=env, check=True, capture_output=True)
        elif instruction == "ENTRYPOINT":
            entrypoint = json.loads(arguments)
        elif instruction == "CMD":
            command = json.loads(arguments)
    return environment, entrypoint + command


def installed(environment: Path, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([environment / "bin" / "python", "-c", probe], check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dockerfile", "args", "present", "absent"),
    [
        ("web.Dockerfile", {}, ["flask", "waitress", "celery"], ["onnxruntime", "tensorflow", "hnswlib", "pandas"]),
        ("worker.Dockerfile", {"EXTRA": "cpu"}, ["onnxruntime", "hnswlib", "pandas"], ["tensorflow", "tf2onnx"]),
        ("export.Dockerfile", {}, ["tensorflow", "tf2onnx", "onnxruntime"], ["hnswlib", "pandas"]),
    ],
)
def test_each_dockerfile_installs_what_its_image_needs_and_no_more(tmp_path, dockerfile, args, present, absent):
    environment, argv = build_here(REPO / "docker" / dockerfile, tmp_path, args)
    assert argv[0] == "lookalike"
    result = subprocess.run([environment / "bin" / argv[0], argv[1], "--help"], capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [module for module in present if not installed(environment, module)] == []
    assert [module for module in absent if installed(environment, module)] == []
