"""Configuration lives in one place: each `LOOKALIKE_*` variable declared once, the docs' table made from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import LookalikeError
from common.settings import CORES, Settings, declared, defaults, markdown_table

REPO = Path(__file__).resolve().parent.parent
CONFIGURATION_DOC = REPO / "docs" / "configuration.md"
LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


def test_the_documented_table_is_the_one_the_declarations_make():
    assert markdown_table() in CONFIGURATION_DOC.read_text(), "run `lookalike settings --markdown` into the docs"


def test_every_setting_is_declared_with_a_meaning_and_read_from_its_own_variable():
    names = list(defaults())
    assert len(names) == len(set(names)) and all(name.startswith("LOOKALIKE_") for name in names)
    assert all(spec.meaning for _, _, spec in declared())
    settings = Settings.from_env(
        {"LOOKALIKE_BATCH": "7", "LOOKALIKE_PROVIDERS": "cuda, cpu", "LOOKALIKE_RESIZE": "pad"}
    )
    assert (settings.batch, settings.providers, settings.resize) == (7, ("cuda", "cpu"), "pad")


def test_defaults_derive_paths_and_threads():
    settings = Settings.from_env({"LOOKALIKE_DATA_DIR": "/srv/lookalike"})
    assert settings.index_dir == Path("/srv/lookalike/index")
    assert settings.archives_dir == Path("/srv/lookalike/archives")
    assert settings.embed_processes == CORES and settings.threads == 1
    assert settings.providers == ("auto",)
    assert Settings.from_env({"LOOKALIKE_EMBED_PROCESSES": "1"}).threads == CORES
    assert Settings.from_env({"LOOKALIKE_BATCH": ""}).batch == 32  # empty is unset, as compose files write it


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LOOKALIKE_BATCH", "many", "LOOKALIKE_BATCH must be a whole number, not 'many'"),
        ("LOOKALIKE_BATCH", "0", "LOOKALIKE_BATCH must be at least 1, not 0"),
        ("LOOKALIKE_TASK_TIME_LIMIT", "5", "LOOKALIKE_TASK_TIME_LIMIT must be at least 10, not 5"),
        ("LOOKALIKE_RESIZE", "crop", "LOOKALIKE_RESIZE is 'crop'; choose stretch or pad"),
    ],
)
def test_bad_values_are_refused_with_the_variables_name(variable, value, message):
    with pytest.raises(LookalikeError, match=message):
        Settings.from_env({variable: value})


def test_the_api_key_never_shows_in_a_repr():
    assert "s3cret" not in repr(Settings.from_env({"LOOKALIKE_API_KEY": "s3cret"}))


def test_lookalike_settings_prints_what_the_environment_gives_and_hides_the_key(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "LOOKALIKE_BATCH": "8", "LOOKALIKE_API_KEY": "s3cret"}
    shown = subprocess.run([LOOKALIKE, "settings"], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    lines = shown.stdout.splitlines()
    assert "LOOKALIKE_BATCH=8  # set" in lines and "LOOKALIKE_API_KEY=(hidden)  # set" in lines
    assert f"LOOKALIKE_DATA_DIR={tmp_path / 'lookalike-data'}" in lines and "s3cret" not in shown.stdout
    refused = subprocess.run(
        [LOOKALIKE, "settings"], capture_output=True, text=True, env={**env, "LOOKALIKE_BATCH": "x"}
    )
    assert refused.returncode == 1 and refused.stderr.strip().endswith(
        "LOOKALIKE_BATCH must be a whole number, not 'x'"
    )
    table = subprocess.run([LOOKALIKE, "settings", "--markdown"], capture_output=True, text=True, check=True)
    assert table.stdout == markdown_table()
