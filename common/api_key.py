"""The API key file: made once in LOOKALIKE_DATA_DIR when no LOOKALIKE_API_KEY is set, so that writes always need a key.

`lookalike up` and `lookalike web` create it at their first start; the web reads it whenever the variable is
empty. It is made readable by its owner only, and atomically: web processes starting together agree on one key.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from common.errors import LookalikeError
from common.files import fsync_path

KEY_FILE = "api-key"


def key_path(data_dir: Path) -> Path:
    return data_dir / KEY_FILE


def read_api_key(data_dir: Path) -> str:
    """The key in DATA_DIR/api-key; "" when there is no such file."""
    try:
        return key_path(data_dir).read_text().strip()
    except FileNotFoundError:
        return ""
    except OSError as error:
        raise LookalikeError(f"can't read the API key in {key_path(data_dir)}: {error.strerror}") from error


def ensure_api_key(data_dir: Path) -> tuple[str, bool]:
    """The key in DATA_DIR/api-key, made now (mode 0600) when there is none; and whether it was made by this call."""
    existing = read_api_key(data_dir)
    if existing:
        return existing, False
    key = secrets.token_urlsafe(32)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        # mkstemp makes the file 0600; a hard link puts it in place only if no other process got there first
        descriptor, temporary = tempfile.mkstemp(prefix=f".{KEY_FILE}.", suffix=".tmp", dir=data_dir)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(f"{key}\n")
            fsync_path(temporary)
            os.link(temporary, key_path(data_dir))
        finally:
            os.unlink(temporary)
    except FileExistsError:
        return read_api_key(data_dir), False
    except OSError as error:
        raise LookalikeError(
            f"can't write the API key to {key_path(data_dir)} ({error.strerror}): set LOOKALIKE_API_KEY instead"
        ) from error
    fsync_path(data_dir)
    return key, True
