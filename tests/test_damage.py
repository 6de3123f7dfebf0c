"""Damage in the index folder is refused, not hidden; `lookalike index check` reports it; a snapshot is verified
before it is switched in, and a log that can't be cut after one keeps taking changes."""

from __future__ import annotations

import errno

import pytest

import worker.snapshots
import worker.wal
from lookalike.cli import main
from tests.test_index import IDENTITY, PARAMS, upsert
from worker.snapshots import IndexStoreError
from worker.store import DurableIndex
from worker.wal import LogDamaged


def crash(store: DurableIndex) -> None:
    """As after kill -9: no snapshot at close, only the log holds the changes since the last one."""
    store.wal.close()
    store._lock_file.close()


def logged_one_by_one(directory, *ids: str) -> list[int]:
    """An index whose log holds one record for each id (a batch each); returns where each record starts."""
    store = DurableIndex.open(directory, IDENTITY, PARAMS)
    starts = []
    for seed, item_id in enumerate(ids):
        starts.append(store.wal.files()[-1].stat().st_size)
        store.apply([upsert(item_id, seed)])
    crash(store)
    return starts


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def check(directory, capsys) -> tuple[int, str, str]:
    code = main(["index", "check", "--index-dir", str(directory)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("where", ["payload", "length"])
def test_a_torn_tail_is_cut_but_damage_in_the_middle_refuses_start(tmp_path, where):
    starts = logged_one_by_one(tmp_path, "a", "b", "c")
    (log,) = tmp_path.glob("wal-*.log")
    flip_byte(log, starts[1] + (20 if where == "payload" else 3))  # "b" fails its checksum, or claims 4 GB
    size = log.stat().st_size
    with pytest.raises(LogDamaged) as refused:
        DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    message = str(refused.value)
    assert f"index log {log} is damaged at byte {starts[1]} (valid records follow it" in message
    assert f"restore {tmp_path} from a backup" in message and "lookalike index check" in message
    assert log.stat().st_size == size, "nothing was cut: the acknowledged change after the damage is still there"

    log.write_bytes(log.read_bytes()[: starts[2]] + b"\0" * 7)  # "b" and what follows: a write never finished
    assert sorted(DurableIndex.open(tmp_path, IDENTITY, PARAMS).index.items) == ["a"]
    assert log.stat().st_size == starts[1]


def test_damage_in_an_older_log_file_refuses_start(tmp_path):
    logged_one_by_one(tmp_path, "a", "b")
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)  # a restart: the next changes go to a new log file
    store.apply([upsert("c", 3)])
    crash(store)
    older, _ = store.wal.files()
    older.write_bytes(older.read_bytes()[:-5])  # its last record cut short: not a torn tail, changes follow it
    with pytest.raises(LogDamaged, match=rf"{older} is damaged at byte \d+ \(newer log files follow it.*index check"):
        DurableIndex.open(tmp_path, IDENTITY, PARAMS)


def test_index_check_reports_the_snapshot_and_each_log_file_beside_a_running_owner(tmp_path, capsys):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS, snapshot_every=3)
    store.apply([upsert(item_id, seed) for seed, item_id in enumerate("abc")])  # a snapshot at change 3
    store.apply([upsert("d", 4)])
    store.apply([upsert("e", 5)])
    code, out, _ = check(tmp_path, capsys)
    assert code == 0
    name = store.snapshot_name()
    assert f"snapshot {name}: index {store.index_id}, change 3, 3 items, model aaaaaaaaaaaa" in out
    vectors = tmp_path / name / "vectors.hnsw"
    assert f"  vectors.hnsw: {vectors.stat().st_size:,} bytes, sha256 verified" in out
    assert "  items.json: " in out
    log = store.wal.files()[-1]
    assert f"log {log.name}: 2 records, changes 4 to 5, {log.stat().st_size:,} bytes" in out
    assert out.rstrip().endswith("sound: the owner starts from the snapshot and 2 logged changes after it")
    with pytest.raises(IndexStoreError, match="another index worker owns"):
        DurableIndex.open(tmp_path, IDENTITY, PARAMS)  # the check took no lock, nor the owner's away
    store.apply([upsert("f", 6)])
    store.close()


def test_index_check_tells_a_torn_tail_from_damage_and_exits_1_on_damage(tmp_path, capsys):
    starts = logged_one_by_one(tmp_path, "a", "b", "c")
    (log,) = tmp_path.glob("wal-*.log")
    log.write_bytes(log.read_bytes()[:-9])
    size = log.stat().st_size
    code, out, _ = check(tmp_path, capsys)
    assert code == 0 and f"  torn tail at byte {starts[2]} (a write never acknowledged: the owner cuts it)" in out
    assert "2 records, changes 1 to 2" in out and log.stat().st_size == size, "the check cut nothing"

    flip_byte(log, starts[0] + 30)
    code, out, err = check(tmp_path, capsys)
    assert code == 1
    assert f"  DAMAGED: {log.name} at byte {starts[0]} (valid records follow it)" in out
    assert err.count("\n") == 1 and "the index owner refuses to start; restore" in err and "from a backup" in err


def test_a_snapshot_that_does_not_read_back_as_written_is_never_switched_in(tmp_path, monkeypatch):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS, snapshot_every=2)
    store.apply([upsert("a", 1), upsert("b", 2)])
    good = store.snapshot_name()
    real_fsync = worker.snapshots.fsync_path

    def lose_the_end_of_items(path):  # the disk keeps half of what was written
        if path.name == "items.json":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        real_fsync(path)

    monkeypatch.setattr(worker.snapshots, "fsync_path", lose_the_end_of_items)
    store.apply([upsert("c", 3), upsert("d", 4)])  # taken: the changes are in the log
    monkeypatch.undo()
    assert store.snapshot_name() == good
    assert sorted(path.name for path in tmp_path.glob("snapshot-*")) == [good], "the bad one is removed"
    crash(store)
    assert sorted(DurableIndex.open(tmp_path, IDENTITY, PARAMS).index.items) == ["a", "b", "c", "d"]


def test_a_log_that_cannot_be_cut_after_a_snapshot_stays_open_and_takes_changes_again(tmp_path, monkeypatch):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS, snapshot_every=2)
    real_open = open
    full = {"left": 2}  # the next two log files can't be made: the disk is full

    def disk_full_for_new_logs(path, mode="r", *args, **kwargs):
        if mode == "ab" and full["left"]:
            full["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(worker.wal, "open", disk_full_for_new_logs, raising=False)
    store.apply([upsert("a", 1), upsert("b", 2)])  # a snapshot at change 2; cutting the log fails
    assert store.snapshot_seq == 2 and store.changes_since_snapshot == 0
    store.apply([upsert("c", 3)])
    store.apply([upsert("d", 4)])  # a snapshot at change 4; cutting fails again
    store.apply([upsert("e", 5)])
    assert full["left"] == 0 and store.snapshot_seq == 4
    store.apply([upsert("f", 6)])  # there is space again: the snapshot at change 6 cuts the log
    store.apply([upsert("g", 7)])
    assert [path.name for path in store.wal.files()] == ["wal-00000000000000000007.log"]
    crash(store)
    assert sorted(DurableIndex.open(tmp_path, IDENTITY, PARAMS).index.items) == list("abcdefg")
