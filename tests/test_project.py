"""Rules of the repository itself: CI runs the README's commands, the import boundaries hold, ruff is clean."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# package -> modules it must never import (see DESIGN.md): the web only enqueues and polls, the worker never
# needs TensorFlow, the exporter never serves.
FORBIDDEN_IMPORTS = {
    "common": {"flask", "celery", "redis", "hnswlib", "tensorflow", "tf2onnx", "keras"},
    "web": {"onnxruntime", "hnswlib", "tensorflow", "tf2onnx", "keras"},
    "worker": {"tensorflow", "tf2onnx", "keras", "flask"},
    "export": {"flask", "celery"},
}


def readme_commands(marker: str) -> list[str]:
    """The lines of the shell block that follows `<!-- marker -->` in the README."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```sh\n(.*?)```", text, re.DOTALL)
    assert match, f"README.md has no ```sh block after <!-- {marker} -->"
    return [line for line in match.group(1).splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readmes_test_command():
    (test_command,) = readme_commands("test-command")
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()
    # the run command is run by tests/test_up.py; every other README command by a test of its own part


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_import_boundaries_of_design_md_hold(package):
    offending = []
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            forbidden = [name for name in names if name.split(".")[0] in FORBIDDEN_IMPORTS[package]]
            offending += [f"{path.relative_to(REPO)}: {name}" for name in forbidden]
    assert not offending


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the dev extra"
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


WEB_REQUESTS = """
import io, sys
from PIL import Image
from common.settings import Settings
from web.app import create_app
root = sys.argv[1]
Image.new("RGB", (40, 40), "red").save(f"{root}/red.jpg")
settings = Settings.from_env({"LOOKALIKE_REDIS_URL": "redis://127.0.0.1:9/0", "LOOKALIKE_CATALOG_ROOT": root,
                              "LOOKALIKE_DATA_DIR": root})
web = create_app(settings).test_client()
statuses = [web.get("/").status_code, web.get("/thumbnails/catalog/red.jpg").status_code,
            web.post("/api/search", data={"image": (open(f"{root}/red.jpg", "rb"), "red.jpg")}).status_code]
loaded = sorted(name for name in ("onnxruntime", "hnswlib", "tensorflow", "pandas") if name in sys.modules)
print(statuses, loaded)
"""


def test_the_web_loads_no_model_or_index_library_even_while_it_serves(tmp_path):
    result = subprocess.run([sys.executable, "-c", WEB_REQUESTS, str(tmp_path)], capture_output=True, text=True,
                            check=True, cwd=REPO)  # fmt: skip
    assert result.stdout.strip() == "[200, 200, 503] []"
