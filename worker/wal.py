"""The index's append-only change log: every accepted change is on disk, flushed, before it is acknowledged."""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from common.errors import LookalikeError
from common.files import fsync_path
from worker.index import Photo

# Each record: payload length, CRC-32 of the payload, sequence number; then the payload:
# JSON length, JSON (operation, id, metadata, photos, checksum), and the raw float32 vectors if there are any.
RECORD_HEADER = struct.Struct("<IIQ")
JSON_LENGTH = struct.Struct("<I")
PREFIX = "wal-"
SUFFIX = ".log"
SCAN_CHUNK = 1 << 20  # byte offsets looked at together for a valid record after a bad one

log = logging.getLogger(__name__)


@dataclass
class Change:
    """An upsert (of a product's photos and metadata, or its metadata alone) or a delete of one catalogue product."""

    op: str
    id: str
    metadata: dict[str, Any] | None = None
    photos: list[Photo] = field(default_factory=list)  # main photo first
    metadata_sha256: str | None = None
    vectors: np.ndarray | None = None  # the model's vector of each photo, a row each; None: only the metadata changes
    seq: int = 0

    def encode(self) -> bytes:
        header = json.dumps(
            {
                "op": self.op,
                "id": self.id,
                "metadata": self.metadata,
                "photos": [photo.as_list() for photo in self.photos],
                "metadata_sha256": self.metadata_sha256,
            },
            separators=(",", ":"),
        ).encode()
        vectors = b"" if self.vectors is None else np.asarray(self.vectors, dtype="<f4").tobytes()
        return JSON_LENGTH.pack(len(header)) + header + vectors

    @classmethod
    def decode(cls, payload: bytes, seq: int) -> Change:
        (length,) = JSON_LENGTH.unpack_from(payload)
        fields = json.loads(payload[JSON_LENGTH.size : JSON_LENGTH.size + length])
        if "photos" in fields:
            photos = [Photo(digest, image) for digest, image in fields.pop("photos")]
        else:  # written before products had several photos: one, whose place the metadata names
            photos = [Photo(fields.pop("image_sha256"), (fields.get("metadata") or {}).get("image"))]
        raw = payload[JSON_LENGTH.size + length :]
        vectors = np.frombuffer(raw, dtype="<f4").reshape(len(photos), -1).copy() if raw else None
        return cls(photos=photos, vectors=vectors, seq=seq, **fields)


class WriteAheadLog:
    """Numbered log files `wal-<first seq>.log` in one folder; the newest is appended to."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: BinaryIO | None = None

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"{PREFIX}*{SUFFIX}"))

    def replay(self, after_seq: int) -> Iterator[Change]:
        """Changes with a sequence number above `after_seq`, oldest first.

        A bad record (cut short, or failing its checksum) with no valid record after it, at the end of the newest
        file, can only be the tail of a write that was never acknowledged (the process died mid-append): it is
        cut away. Damage anywhere else is refused: acknowledged changes follow it.
        """
        for report, records in self._read():
            for seq, payload in records:
                if seq > after_seq:
                    yield Change.decode(payload, seq)
            if report.damaged:
                raise LogDamaged(report.damage())
            if report.torn:
                log.warning("index log %s: cutting a torn tail at byte %d (a write never acknowledged)", report.path,
                            report.end)  # fmt: skip
                os.truncate(report.path, report.end)
                fsync_path(report.path)

    def inspect(self) -> list[LogFile]:
        """Every log file as it is, read without changing anything: its records, a torn tail, damage."""
        reports = []
        for report, records in self._read():
            for _ in records:
                pass  # counted in the report
            reports.append(report)
        return reports

    def _read(self) -> Iterator[tuple[LogFile, Iterator[tuple[int, bytes]]]]:
        """Each log file, oldest first: its report, filled in as its records are read."""
        files = self.files()
        for path in files:
            with open(path, "rb") as file:
                report = LogFile(path, os.fstat(file.fileno()).st_size, newest=path == files[-1])
                yield report, _records(file, report)

    def append(self, changes: list[Change]) -> None:
        """Write `changes` (already numbered) and fsync once for the whole batch."""
        if self._file is None:
            raise RuntimeError("the log is not open for writing (call start_file first)")
        descriptor = self._file.fileno()
        start = os.lseek(descriptor, 0, os.SEEK_END)
        try:
            data = memoryview(encode_records(changes))
            while data:
                data = data[os.write(descriptor, data) :]
            os.fsync(descriptor)
        except OSError:
            # A partly written batch (disk full) must not stay in front of the next, acknowledged one: it would
            # be replayed although it was reported failed, or stop the replay of what follows.
            os.ftruncate(descriptor, start)
            raise

    def start_file(self, first_seq: int) -> None:
        """Continue in a new file whose records start at `first_seq` (after a snapshot, or at start-up).

        When the new file can't be made durable (disk full), the current one stays open for writing."""
        path = self.directory / f"{PREFIX}{first_seq:020d}{SUFFIX}"
        made = not path.exists()
        new_file = open(path, "ab", buffering=0)  # noqa: SIM115 - stays open for the owner's lifetime
        try:
            fsync_path(self.directory)
        except OSError:
            new_file.close()
            if made:  # an empty newer file would make a torn tail of the one still written to look like damage
                path.unlink(missing_ok=True)
            raise
        self.close()
        self._file = new_file

    def drop_through(self, seq: int) -> None:
        """Delete log files whose records are all covered by a snapshot at `seq`."""
        files = self.files()
        for path, following in pairwise(files):
            if _first_seq(following) <= seq + 1:
                path.unlink()
        fsync_path(self.directory)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def encode_records(changes: list[Change]) -> bytes:
    """Changes (already numbered) as log records: what the log file holds, and what the change feed carries."""
    records = []
    for change in changes:
        payload = change.encode()
        records.append(RECORD_HEADER.pack(len(payload), zlib.crc32(payload), change.seq) + payload)
    return b"".join(records)


def decode_records(data: bytes) -> list[Change]:
    """The changes of `encode_records`; damage of any kind (a short record, a wrong checksum) is refused."""
    changes, offset = [], 0
    while offset < len(data):
        if len(data) - offset < RECORD_HEADER.size:
            raise LookalikeError(f"change records are cut short at byte {offset}")
        length, crc, seq = RECORD_HEADER.unpack_from(data, offset)
        payload = data[offset + RECORD_HEADER.size : offset + RECORD_HEADER.size + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise LookalikeError(f"change record at byte {offset} is damaged")
        changes.append(Change.decode(payload, seq))
        offset += RECORD_HEADER.size + length
    return changes


def _first_seq(path: Path) -> int:
    return int(path.name[len(PREFIX) : -len(SUFFIX)])


class LogDamaged(LookalikeError):
    """A log record is damaged with acknowledged changes after it: the index can't start without losing them."""


@dataclass
class LogFile:
    """One log file as read: its valid records, and where the first bad one starts, if there is one."""

    path: Path
    size: int
    newest: bool
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    end: int = 0  # the byte after the last valid record
    valid_after_end: bool = False  # a valid record follows the bad one at `end`

    @property
    def torn(self) -> bool:
        """The file ends in a write that never finished (and was never acknowledged): start-up cuts it."""
        return self.end < self.size and self.newest and not self.valid_after_end

    @property
    def damaged(self) -> bool:
        """A bad record with acknowledged changes after it (in this file, or in the newer files): start-up refuses."""
        return self.end < self.size and not self.torn

    def damage(self) -> str:
        after = "valid records follow it" if self.valid_after_end else "newer log files follow it"
        return (
            f"index log {self.path} is damaged at byte {self.end} ({after}, acknowledged changes that would be lost); "
            f"restore {self.path.parent} from a backup (`lookalike index check --index-dir {self.path.parent}` "
            "reports the snapshot and every log file)"
        )


def _records(file: BinaryIO, report: LogFile) -> Iterator[tuple[int, bytes]]:
    """The valid records of a log file from its start, as (seq, payload), counted in `report`; stops at the end or
    at the first bad record, and then tells whether a valid record follows it."""
    while report.end < report.size:
        header = file.read(RECORD_HEADER.size)
        if len(header) == RECORD_HEADER.size:
            length, crc, seq = RECORD_HEADER.unpack(header)
            fits = length <= report.size - report.end - RECORD_HEADER.size  # a damaged length reads no gigabytes
            payload = file.read(length) if fits else b""
            if fits and zlib.crc32(payload) == crc:
                report.records += 1
                report.first_seq = seq if report.first_seq is None else report.first_seq
                report.last_seq = seq
                report.end += RECORD_HEADER.size + length
                yield seq, payload
                continue
        file.seek(report.end)
        after_seq = report.last_seq if report.last_seq is not None else _first_seq(report.path) - 1
        report.valid_after_end = _holds_a_record(file.read(), after_seq)
        return


def _holds_a_record(data: bytes, after_seq: int) -> bool:
    """Whether a valid record (a sequence number above `after_seq`, its checksum right) starts anywhere in `data`
    after its first byte: then the bad record at its start is damage, not the torn tail of an unfinished write."""
    last_start = len(data) - RECORD_HEADER.size - JSON_LENGTH.size
    for first in range(1, last_start + 1, SCAN_CHUNK):
        count = min(SCAN_CHUNK, last_start + 1 - first)
        # The header fields as if a record started at each byte: few pass these tests, and only those are summed.
        lengths = np.ndarray((count,), "<u4", data, first, (1,))
        seqs = np.ndarray((count,), "<u8", data, first + 8, (1,))
        starts = np.arange(first, first + count)
        plausible = (
            (lengths >= JSON_LENGTH.size)
            & (lengths <= len(data) - starts - RECORD_HEADER.size)
            & (seqs > after_seq)
            & (seqs <= after_seq + len(data))
        )
        for start in starts[plausible].tolist():
            length, crc, _ = RECORD_HEADER.unpack_from(data, start)
            if zlib.crc32(data[start + RECORD_HEADER.size : start + RECORD_HEADER.size + length]) == crc:
                return True
    return False
