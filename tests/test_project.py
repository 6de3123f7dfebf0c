"""Rules of the repository itself: CI runs the README's commands and ruff is clean (the layers: test_layers.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands(marker: str) -> list[str]:
    """The lines of the shell block that follows `<!-- marker -->` in the README."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```sh\n(.*?)```", text, re.DOTALL)
    assert match, f"README.md has no ```sh block after <!-- {marker} -->"
    return [line for line in match.group(1).splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readmes_test_command():
    (test_command,) = readme_commands("test-command")
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()
    # the run command is run by tests/test_up.py; every other documented command: tests/test_docs.py


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the dev extra"
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
