"""Writes to the local state that must not wait for SQLite.

Closing a file journals its new state, and a dirty chunk is indexed before
a journal entry names it (a small one with its sealed bytes, whose file the
fold writes: cache/state.py). Each must survive a crash of the daemon once
the request that made it is answered, but a SQLite transaction costs a
worker thread hop and a commit (200-500 µs, more behind other database
work) while the FUSE request waits, and so does creating a file. So
these writes are appended to a log file instead, with one ``write(2)`` on
the event loop (a few µs: the kernel keeps the bytes if the daemon dies,
as SQLite's WAL with ``synchronous=NORMAL`` does), and folded into the
database in one transaction before the database's next call
(cache/state.py).

Logs are numbered: each fold takes the records written so far, moves
appends to a new file, and writes the highest number it folded to the
database (``meta.log_folded``) in the transaction that applies them, so a
file that outlives its fold (a crash before it was removed) is never
applied twice. Byte format: docs/format.md §14.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Batch", "Record", "StateLog", "Value", "leftover_logs"]

#: A value of a record: what SQLite stores.
Value = bytes | int | str | None
#: (kind, values): one write, applied by cache/state.py.
Record = tuple[bytes, tuple[Value, ...]]

_FRAME = struct.Struct("<II")  # body length, CRC-32 of the body
_LEN = struct.Struct("<I")
_INT = struct.Struct("<q")
_NONE, _INTEGER, _BYTES, _TEXT = b"\x00", b"\x01", b"\x02", b"\x03"  # value tags


def encode(kind: bytes, values: tuple[Value, ...]) -> bytes:
    """One record, framed: a torn one (a power cut mid-write) fails its CRC."""
    parts = [kind]
    for value in values:
        if value is None:
            parts.append(_NONE)
        elif isinstance(value, int):
            parts += (_INTEGER, _INT.pack(value))
        elif isinstance(value, str):
            raw = value.encode()
            parts += (_TEXT, _LEN.pack(len(raw)), raw)
        else:
            parts += (_BYTES, _LEN.pack(len(value)), value)
    body = b"".join(parts)
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def decode(data: bytes) -> Iterator[Record]:
    """The records of one log file, up to the first torn or damaged one
    (nothing after it was acknowledged: appends stop at a failed write)."""
    pos = 0
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        body = data[pos + _FRAME.size : pos + _FRAME.size + length]
        if len(body) < length or zlib.crc32(body) != crc or not body:
            return
        yield body[:1], _values(body)
        pos += _FRAME.size + length


def _values(body: bytes) -> tuple[Value, ...]:
    values: list[Value] = []
    pos = 1
    while pos < len(body):
        tag = body[pos : pos + 1]
        pos += 1
        if tag == _NONE:
            values.append(None)
        elif tag == _INTEGER:
            values.append(_INT.unpack_from(body, pos)[0])
            pos += _INT.size
        elif tag in (_BYTES, _TEXT):
            (n,) = _LEN.unpack_from(body, pos)
            raw = body[pos + _LEN.size : pos + _LEN.size + n]
            values.append(raw.decode() if tag == _TEXT else raw)
            pos += _LEN.size + n
        else:
            raise ValueError(f"unknown value tag {tag!r}")
    return tuple(values)


def _number(path: Path, db_path: Path) -> int | None:
    suffix = path.name[len(db_path.name) + len(".log.") :]
    return int(suffix) if suffix.isdigit() else None


def _logs(db_path: Path) -> list[tuple[int, Path]]:
    found = []
    for path in db_path.parent.glob(f"{db_path.name}.log.*"):
        number = _number(path, db_path)
        if number is not None:
            found.append((number, path))
    return sorted(found)


def leftover_logs(db_path: Path, folded: int) -> list[tuple[int, list[Record]]]:
    """The records of every log not folded yet (numbered above ``folded``),
    oldest first: what a daemon that stopped without folding left."""
    return [(n, list(decode(p.read_bytes()))) for n, p in _logs(db_path) if n > folded]


@dataclass
class Batch:
    """Records taken for one fold, and the files that held them."""

    records: list[Record]
    number: int  # the highest log number among them
    paths: list[Path]


class StateLog:
    """The open log of one database. ``append`` runs on the event loop;
    ``take``, ``restore`` and ``remove`` in the database's worker thread
    (one at a time); a lock keeps the two sides apart."""

    def __init__(self, db_path: Path) -> None:
        self._db_path = db_path
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._paths: list[Path] = []
        self._fd: int | None = None
        self._number = 0
        self._size = 0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def size(self) -> int:
        """Bytes appended since the last ``take``."""
        return self._size

    def start(self, after: int) -> None:
        """Remove every old log (already folded) and open a new one
        numbered above both ``after`` and any file found."""
        numbers = [after]
        for number, path in _logs(self._db_path):
            numbers.append(number)
            with contextlib.suppress(OSError):
                path.unlink()
        self._number = max(numbers)
        self._fd, path = self._create(self._number + 1)
        self._number += 1
        self._paths = [path]

    def _create(self, number: int) -> tuple[int, Path]:
        path = self._db_path.with_name(f"{self._db_path.name}.log.{number}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        return os.open(path, flags, 0o600), path

    def append(self, kind: bytes, values: tuple[Value, ...]) -> None:
        """Write one record; once this returns, a crash of the daemon keeps it.
        A failed write (ENOSPC) leaves no partial record behind."""
        record = encode(kind, values)
        with self._lock:
            if self._fd is None:
                raise RuntimeError("local state is closed")
            view = memoryview(record)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:
                os.ftruncate(self._fd, self._size)
                os.lseek(self._fd, self._size, os.SEEK_SET)
                raise
            self._size += len(record)
            self._records.append((kind, values))

    def take(self) -> Batch | None:
        """Everything written so far, for a fold; later appends go to a new
        file. None if nothing was written."""
        with self._lock:
            if not self._records:
                return None
            fd, path = self._create(self._number + 1)  # first: a failure takes nothing
            batch = Batch(self._records, self._number, self._paths)
            old, self._fd = self._fd, fd
            self._number += 1
            self._records, self._paths, self._size = [], [path], 0
        if old is not None:
            os.close(old)
        return batch

    def restore(self, batch: Batch) -> None:
        """A fold failed: its records come first in the next one."""
        with self._lock:
            self._records[:0] = batch.records
            self._paths[:0] = batch.paths

    @staticmethod
    def remove(batch: Batch) -> None:
        """The batch is in the database: its files are done with (one left
        behind is skipped by its number)."""
        for path in batch.paths:
            with contextlib.suppress(OSError):
                path.unlink()

    def close(self) -> None:
        """After a last fold: the open log is empty, remove it."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if not self._records:
                for path in self._paths:
                    with contextlib.suppress(OSError):
                        path.unlink()
