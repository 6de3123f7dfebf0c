"""The index's append-only change log: every accepted change is on disk, flushed, before it is acknowledged."""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from common.errors import LookalikeError
from common.files import fsync_path

# Each record: payload length, CRC-32 of the payload, sequence number; then the payload:
# JSON length, JSON (operation, id, metadata, checksums), and the raw float32 vector if there is one.
RECORD_HEADER = struct.Struct("<IIQ")
JSON_LENGTH = struct.Struct("<I")
PREFIX = "wal-"
SUFFIX = ".log"


@dataclass
class Change:
    """An upsert (with or without a new vector) or a delete of one catalogue item."""

    op: str
    id: str
    metadata: dict[str, Any] | None = None
    image_sha256: str | None = None
    metadata_sha256: str | None = None
    vector: np.ndarray | None = None
    seq: int = 0

    def encode(self) -> bytes:
        header = json.dumps(
            {
                "op": self.op,
                "id": self.id,
                "metadata": self.metadata,
                "image_sha256": self.image_sha256,
                "metadata_sha256": self.metadata_sha256,
            },
            separators=(",", ":"),
        ).encode()
        vector = b"" if self.vector is None else np.asarray(self.vector, dtype="<f4").tobytes()
        return JSON_LENGTH.pack(len(header)) + header + vector

    @classmethod
    def decode(cls, payload: bytes, seq: int) -> Change:
        (length,) = JSON_LENGTH.unpack_from(payload)
        fields = json.loads(payload[JSON_LENGTH.size : JSON_LENGTH.size + length])
        raw = payload[JSON_LENGTH.size + length :]
        vector = np.frombuffer(raw, dtype="<f4").copy() if raw else None
        return cls(vector=vector, seq=seq, **fields)


class WriteAheadLog:
    """Numbered log files `wal-<first seq>.log` in one folder; the newest is appended to."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: BinaryIO | None = None

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"{PREFIX}*{SUFFIX}"))

    def replay(self, after_seq: int) -> Iterator[Change]:
        """Changes with a sequence number above `after_seq`, oldest first.

        A record cut short or failing its checksum at the end of the newest file can only be the tail of a
        write that was never acknowledged (the process died mid-append): it is truncated away. Damage anywhere
        else is refused: acknowledged changes follow it.
        """
        files = self.files()
        for path in files:
            with open(path, "r+b") as file:
                while True:
                    start = file.tell()
                    header = file.read(RECORD_HEADER.size)
                    if not header:
                        break
                    complete = len(header) == RECORD_HEADER.size
                    if complete:
                        length, crc, seq = RECORD_HEADER.unpack(header)
                        payload = file.read(length)
                        complete = len(payload) == length and zlib.crc32(payload) == crc
                    if not complete:
                        if path != files[-1]:
                            raise LookalikeError(f"index log {path} is damaged at byte {start}; restore a backup")
                        file.truncate(start)
                        os.fsync(file.fileno())
                        return
                    if seq > after_seq:
                        yield Change.decode(payload, seq)

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
        """Continue in a new file whose records start at `first_seq` (after a snapshot, or at start-up)."""
        self.close()
        path = self.directory / f"{PREFIX}{first_seq:020d}{SUFFIX}"
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - stays open for the owner's lifetime
        fsync_path(self.directory)

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
