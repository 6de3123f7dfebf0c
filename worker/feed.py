"""The owner's change feed: a Redis stream that every replica follows, from any machine.

The owner's log on its own disk stays the truth. After each batch is durable there, the owner appends the same
records (`worker.wal.encode_records`) to the stream under the ID `<last seq>-0`; after each snapshot, an entry
`<seq>-1` that names it, and the stream is trimmed to what follows that snapshot. So the stream holds at most
about LOOKALIKE_SNAPSHOT_EVERY changes, its IDs are the sequence numbers, and a replica that loaded the latest
snapshot finds every later change in it. An append that fails (Redis away) is made again from the log before
the next one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from protocol import keys
from worker.wal import Change, WriteAheadLog, decode_records, encode_records

log = logging.getLogger(__name__)

PUBLISH_CHUNK = 256  # changes per entry when the log is published again after a gap


@dataclass
class Entry:
    """One entry of the feed: a batch of changes, or the news of a snapshot."""

    seq: int  # the batch's last sequence number, or the snapshot's
    changes: list[Change] | None = None
    snapshot: str | None = None
    projection: int = 0  # dimensions of the snapshot's PCA (0: none)
    index_id: str = ""  # the snapshot's index: another one than a replica holds means a switch (`worker.aliases`)

    @property
    def first(self) -> int:
        return self.changes[0].seq if self.changes else self.seq


def entry_id(seq: int, snapshot: bool = False) -> str:
    return f"{seq}-{1 if snapshot else 0}"


class ChangeFeed:
    def __init__(self, client: redis.Redis, key: str = keys.CHANGES) -> None:
        self.redis = client
        self.key = key
        self.published = -1  # the last sequence number surely in the stream; -1: unknown (read it first)

    # the owner's side -----------------------------------------------------------------------------------------

    def catch_up(self, wal: WriteAheadLog, seq: int, snapshot_seq: int) -> bool:
        """Put in the stream every logged change it lacks, after the snapshot at `snapshot_seq`; a stream ahead
        of the index (an index folder replaced, or restored from a backup) is started again: True then."""
        head = self.head()
        restarted = head > seq
        if restarted:
            log.warning("the change feed is at %d, ahead of the index at %d: starting it again", head, seq)
            self.redis.delete(self.key)
            head = 0
        self.published = max(head, snapshot_seq)
        pending: list[Change] = []
        for change in wal.replay(after_seq=self.published):
            pending.append(change)
            if len(pending) == PUBLISH_CHUNK:
                self._append(pending)
                pending = []
        if pending:
            self._append(pending)
        self.published = seq
        return restarted

    def publish(self, changes: list[Change], wal: WriteAheadLog, snapshot_seq: int) -> None:
        """Append a durable batch; after a failed append, what the stream lacks is taken from the log first."""
        try:
            if self.published != changes[0].seq - 1:
                self.catch_up(wal, changes[-1].seq, snapshot_seq)  # the log already holds this batch
            else:
                self._append(changes)
                self.published = changes[-1].seq
        except redis.RedisError as error:
            self.published = -1
            log.warning("the change feed missed changes up to %d (replicas catch up later): %s", changes[-1].seq, error)

    def mark_snapshot(self, name: str, seq: int, projection: int, index_id: str = "") -> None:
        """After a snapshot: tell the replicas, and drop what the snapshot covers."""
        try:
            if self.published < seq:
                return  # the stream lacks changes before it: a replica closing that gap loads CURRENT anyway
            last = self.redis.xrevrange(self.key, count=1)
            if last and _position(last[0][0]) >= (seq, 1):
                return  # announced already (the owner started again without a new snapshot)
            fields = {"snapshot": name, "projection": projection, "index_id": index_id}
            self.redis.xadd(self.key, fields, id=entry_id(seq, snapshot=True))
            self.redis.xtrim(self.key, minid=entry_id(seq, snapshot=True), approximate=False)
        except redis.RedisError as error:
            log.warning("the change feed did not hear of snapshot %s: %s", name, error)

    def _append(self, changes: list[Change]) -> None:
        fields = {"records": encode_records(changes)}
        self.redis.xadd(self.key, fields, id=entry_id(changes[-1].seq))

    # the replicas' side ---------------------------------------------------------------------------------------

    def head(self) -> int:
        """The sequence number of the stream's last entry (0 when it is empty)."""
        last = self.redis.xrevrange(self.key, count=1)
        return _position(last[0][0])[0] if last else 0

    def read(self, after: str, count: int = 64, block_ms: int | None = None) -> list[tuple[str, Entry]]:
        """Entries after the ID `after`, oldest first; waits up to `block_ms` for one when there is none yet."""
        answer = self.redis.xread({self.key: after}, count=count, block=block_ms)
        return [(raw_id.decode(), _entry(raw_id, fields)) for _, entries in answer for raw_id, fields in entries]


def _position(raw_id: bytes) -> tuple[int, int]:
    """A stream ID as (sequence number, 0 for changes or 1 for a snapshot)."""
    seq, part = raw_id.decode().split("-")
    return int(seq), int(part)


def _entry(raw_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    seq = _position(raw_id)[0]
    if b"records" in fields:
        return Entry(seq, changes=decode_records(fields[b"records"]))
    index_id = fields.get(b"index_id", b"").decode()
    return Entry(seq, snapshot=fields[b"snapshot"].decode(), projection=int(fields[b"projection"]), index_id=index_id)
