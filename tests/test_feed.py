"""The owner's change feed on a real Redis: entries by sequence number, the log's own records, a lost append made
good from the log, and trimming to what follows a snapshot."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from worker.feed import ChangeFeed, Entry, entry_id
from worker.index import Photo
from worker.wal import Change, WriteAheadLog


@pytest.fixture
def feed(module_redis) -> ChangeFeed:
    client = redis.Redis.from_url(module_redis)
    client.flushdb()
    return ChangeFeed(client, key="test:changes")


@pytest.fixture
def wal(tmp_path) -> WriteAheadLog:
    log = WriteAheadLog(tmp_path)
    log.start_file(1)
    yield log
    log.close()


def changes_after(entries: list[tuple[str, Entry]], seq: int) -> list[Change]:
    return [change for _, entry in entries for change in entry.changes or () if change.seq > seq]


def logged(wal: WriteAheadLog, first: int, count: int) -> list[Change]:
    """`count` upserts numbered from `first`, durable in the log as the owner writes them."""
    changes = [
        Change("upsert", f"item-{seq}", {"n": seq}, [Photo("i")], "m", np.full((1, 3), seq, dtype=np.float32), seq=seq)
        for seq in range(first, first + count)
    ]
    wal.append(changes)
    return changes


def test_each_batch_is_one_entry_under_its_last_sequence_number_with_the_logs_records(feed, wal):
    feed.catch_up(wal, 0, 0)
    for first in (1, 4):
        feed.publish(logged(wal, first, 3), wal, snapshot_seq=0)
    entries = feed.read(entry_id(0))
    assert [raw_id for raw_id, _ in entries] == ["3-0", "6-0"] and feed.head() == 6
    changes = changes_after(entries, seq=2)
    assert [change.seq for change in changes] == [3, 4, 5, 6] and changes[0].metadata == {"n": 3}
    np.testing.assert_array_equal(changes[-1].vectors, [[6, 6, 6]])


def test_a_lost_append_is_made_good_from_the_log_before_the_next(feed, wal):
    feed.catch_up(wal, 0, 0)
    feed.publish(logged(wal, 1, 2), wal, snapshot_seq=0)
    feed.published = -1  # as after an append Redis did not take
    logged(wal, 3, 2)  # durable, never published
    feed.publish(logged(wal, 5, 1), wal, snapshot_seq=0)
    seqs = [change.seq for change in changes_after(feed.read(entry_id(0)), seq=0)]
    assert seqs == [1, 2, 3, 4, 5]


def test_a_snapshot_is_announced_and_what_it_covers_is_trimmed(feed, wal):
    feed.catch_up(wal, 0, 0)
    feed.publish(logged(wal, 1, 2), wal, snapshot_seq=0)
    feed.mark_snapshot("snapshot-2", 2, projection=0)
    feed.publish(logged(wal, 3, 1), wal, snapshot_seq=2)
    entries = feed.read(entry_id(0))
    assert [raw_id for raw_id, _ in entries] == ["2-1", "3-0"]
    assert entries[0][1].snapshot == "snapshot-2"


def test_a_feed_ahead_of_the_index_is_started_again(feed, wal):
    feed.catch_up(wal, 0, 0)
    feed.publish(logged(wal, 1, 5), wal, snapshot_seq=0)
    feed.catch_up(WriteAheadLog(wal.directory / "elsewhere"), seq=0, snapshot_seq=0)  # a new, empty index
    assert feed.head() == 0 and feed.read(entry_id(0)) == []
