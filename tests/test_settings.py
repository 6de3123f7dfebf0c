"""Configuration lives in one place, `LOOKALIKE_*` variables, every one documented in the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import LookalikeError
from common.settings import CORES, SETTINGS, Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: setting.variable)
def test_every_variable_is_in_the_readme_with_its_default(setting):
    default = f"`{setting.default}`" if setting.default else "(empty)"
    assert f"| `{setting.variable}` | {default} | {setting.meaning} |" in README


def test_defaults_derive_paths_and_threads():
    settings = Settings.from_env({"LOOKALIKE_DATA_DIR": "/srv/lookalike"})
    assert settings.index_dir == Path("/srv/lookalike/index")
    assert settings.archives_dir == Path("/srv/lookalike/archives")
    assert settings.embed_processes == CORES and settings.threads == 1
    assert settings.providers == ("auto",)
    assert Settings.from_env({"LOOKALIKE_EMBED_PROCESSES": "1"}).threads == CORES


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LOOKALIKE_BATCH", "many", "LOOKALIKE_BATCH must be a whole number, not 'many'"),
        ("LOOKALIKE_BATCH", "0", "LOOKALIKE_BATCH must be at least 1, not 0"),
        ("LOOKALIKE_RESIZE", "crop", "LOOKALIKE_RESIZE is 'crop'; choose stretch or pad"),
    ],
)
def test_bad_values_are_refused_with_the_variables_name(variable, value, message):
    with pytest.raises(LookalikeError, match=message):
        Settings.from_env({variable: value})
