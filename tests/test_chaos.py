"""bench/chaos.py, bounded: 1,002 items, 4 kills (a worker's process, Redis once), every item accounted for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_load_under_kill_9_of_workers_and_redis_accounts_for_every_item(shared_dir, tmp_path):
    report_path = tmp_path / "chaos.json"
    photos = shared_dir / "data" / "fashion" / "images"
    command = [sys.executable, str(REPO / "bench" / "chaos.py"), "--catalog", str(photos), "--no-metadata",
               "--kills", "4", "--every", "3", "--clients", "4", "--timeout", "600",
               "--json", str(report_path)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert len(report["kills"]) == 4 and "redis" in [kill["victim"] for kill in report["kills"]]
    assert report["load"]["total"] == 1002 and all(report["load"]["checks"].values())
    assert report["searches"]["answered"] > 0
