"""bench/chaos.py, bounded: 1,002 items, 4 kills (workers' processes, and Redis once, or its primary twice with
Sentinel), every item accounted for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def chaos(shared_dir: Path, tmp_path: Path, *options: str) -> dict:
    """bench/chaos.py on the 1,002 sample photos, 4 kills 3 s apart, 4 clients: its report, once it passed."""
    report_path = tmp_path / "chaos.json"
    photos = shared_dir / "data" / "fashion" / "images"
    command = [sys.executable, str(REPO / "bench" / "chaos.py"), "--catalog", str(photos), "--no-metadata",
               "--kills", "4", "--every", "3", "--clients", "4", "--timeout", "600",
               "--json", str(report_path), *options]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert len(report["kills"]) == 4
    assert report["load"]["total"] == 1002 and all(report["load"]["checks"].values())
    assert report["searches"]["answered"] > 0
    return report


@pytest.mark.slow
def test_a_load_under_kill_9_of_workers_and_redis_accounts_for_every_item(shared_dir, tmp_path):
    report = chaos(shared_dir, tmp_path)
    assert "redis" in [kill["victim"] for kill in report["kills"]]


@pytest.mark.slow
def test_a_load_under_kill_9_of_workers_and_two_failovers_of_redis_accounts_for_every_item(shared_dir, tmp_path):
    report = chaos(shared_dir, tmp_path, "--sentinel", "--redis-every", "2")
    assert [kill["victim"] for kill in report["kills"]].count("redis primary") == 2
    assert [failover["answered_again_s"] is not None for failover in report["failovers"]] == [True, True]
