"""The README and docs/ are true: every command in them runs somewhere (here, in the test named for it, or in
.ci/run), every relative link resolves inside the repository, and the README links every page of docs/."""

from __future__ import annotations

import re
import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from common.settings import defaults
from lookalike.cli import build_parser
from tests.test_project import REPO, readme_commands

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
API_DOC = REPO / "docs" / "api.md"

# Commands run elsewhere: their first words -> the file that runs them (and must contain what proves it).
RUN_ELSEWHERE = {
    "make demo": ("tests/test_up.py", 'readme_commands("run-command")'),
    "docker/local/base-images": ("tests/test_containers.py", '"base-images"'),
    "export CONTAINERS_CONF=": ("tests/test_containers.py", '"CONTAINERS_CONF"'),
    "make test": (".ci/run", "make test"),
    ".venv/bin/python bench/": ("bench", ""),  # benchmarks print tables; a run takes minutes (see below)
}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def commands() -> list[str]:
    """Each command of every ```sh block of every page (continuation lines joined, comments dropped)."""
    found = []
    for page in DOCS:
        for block in re.findall(r"```sh\n(.*?)```", page.read_text(), re.DOTALL):
            for command in block.replace("\\\n", " ").splitlines():
                command = command.split("  #", 1)[0].strip()
                if command and not command.startswith("#"):
                    found.append(command)
    return found


def api_examples() -> str:
    match = re.search(r"<!-- api-examples -->\s*```sh\n(.*?)```", API_DOC.read_text(), re.DOTALL)
    assert match, f"{API_DOC} has no API examples block"
    return match.group(1)


@pytest.mark.parametrize("command", commands())
def test_every_documented_command_is_run_by_a_test_or_ci(command):
    if command in api_examples().replace("\\\n", " "):
        return  # run below, for real
    compose_text = (REPO / "docker-compose.yml").read_text()
    assignments = re.match(r"((?:[A-Z_]+=\S+ )*)(.*)", command)
    if assignments.group(1) and assignments.group(2):  # variables for one command: settings or the compose file's
        names = re.findall(r"([A-Z_]+)=", assignments.group(1))
        assert all(name in set(defaults()) or f"${{{name}" in compose_text for name in names), names
        command = assignments.group(2).strip()
    if command.startswith("export LOOKALIKE_"):
        # settings: each variable is one the code reads, or one docker-compose.yml reads from the host
        names = re.findall(r"\b(LOOKALIKE_[A-Z_]+)=", command)
        assert all(name in set(defaults()) or f"${{{name}" in compose_text for name in names), names
        return
    if command.startswith(("docker compose ", "podman-compose ")):
        # tests/test_containers.py runs the deployment with podman-compose; this checks that the files and
        # services the command names are there
        files = re.findall(r"-f (\S+)", command) or ["docker-compose.yml"]
        services = {name for file in files for name in yaml.safe_load((REPO / file).read_text())["services"]}
        for service in re.findall(r"--scale (\S+)=\d+", command):
            assert service in services, service
        return
    if command.startswith(".venv/bin/lookalike "):
        # a valid command line of this version; each kind is run end to end by its part's tests
        build_parser().parse_args(shlex.split(command.rstrip("&").strip())[1:])
        return
    place = next((where for prefix, where in RUN_ELSEWHERE.items() if command.startswith(prefix)), None)
    assert place, f"documented command {command!r} is run by no test: run it in one, or add it to RUN_ELSEWHERE"
    path, proof = place
    if command.startswith(".venv/bin/python bench/"):
        script = REPO / shlex.split(command)[1]
        result = subprocess.run([REPO / ".venv/bin/python", script, "--help"], capture_output=True, check=False)
        assert result.returncode == 0, result.stderr
    else:
        assert proof in (REPO / path).read_text()


def test_the_readmes_commands_are_its_two_commands():
    assert readme_commands("run-command") == ["make demo"] and readme_commands("test-command") == ["make test"]


@pytest.mark.parametrize("page", DOCS, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or a heading of the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(REPO), f"{page.name} links {target}, outside the repository"
        assert path.exists(), f"{page.name} links {target}, which does not exist"


def test_the_readme_is_the_landing_page_that_links_every_doc():
    links = set(LINK.findall((REPO / "README.md").read_text()))
    assert {f"docs/{page.name}" for page in DOCS[1:]} <= links
    assert len((REPO / "README.md").read_text().splitlines()) < 150, "reference material belongs in docs/"


@pytest.mark.slow
def test_the_api_examples_work_against_the_running_service(served, shared_dir, tmp_path):
    images = shared_dir / "data" / "fashion" / "images"
    (tmp_path / "photo.jpg").write_bytes((images / "10186.jpg").read_bytes())
    (tmp_path / "back.jpg").write_bytes((images / "10227.jpg").read_bytes())  # a product's second photo (PUT)
    (tmp_path / "styles.csv").write_text("id,gender,productDisplayName\n11013,Women,Wrangler Women Frill Check Tops\n")
    with tarfile.open(tmp_path / "shop.tar.gz", "w:gz") as archive:
        archive.add(images / "11013.jpg", "11013.jpg")
    script = api_examples().replace("http://127.0.0.1:8000", served.url)
    environ = {"PATH": "/usr/bin:/bin", "LOOKALIKE_API_KEY": served.api_key}  # the key lookalike web made
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=environ)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"deleted":"11013"' in result.stdout and '"status":"ok"' in result.stdout
    assert result.stdout.count('"kind":"search"') == 5  # each search and recommendation answered whole (`wait`)
    # put the sample back as the other tests know it
    served.client.follow(served.client.start_load(shared_dir / "data" / "fashion"), timeout=300)
    assert served.client.get_item("11013") is not None


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [command for command in commands() if command.startswith(".venv/bin/lookalike export")]
)
def test_the_export_examples_run(command, shared_dir, tmp_path):
    """As written, with the docs' folders moved: models/ to a temporary folder, ../shared to the shared data."""
    moved = {"../shared/": f"{shared_dir}/", "models/": f"{tmp_path}/"}
    argv = [next((new + word[len(old):] for old, new in moved.items() if word.startswith(old)), word)
            for word in shlex.split(command)]  # fmt: skip
    result = subprocess.run([REPO / argv[0], *argv[1:]], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    out = Path(argv[argv.index("--out") + 1])
    assert out.is_file() and out.with_suffix(".json").is_file()
