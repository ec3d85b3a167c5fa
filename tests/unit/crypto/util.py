"""Helpers shared by the crypto tests: bit flipping, a spec-derived TLV
writer (independent of megafs.crypto.records) and a tamper sweep that
accepts IntegrityError and nothing else."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from megafs.crypto import KdfParams, Kind, NodeRecord
from megafs.errors import IntegrityError

# Tags and AD prefixes exactly as docs/format.md states them (not imported
# from the library, so a change there has to be a deliberate change here).
TAGS = {
    "KIND": 1,
    "NAME": 2,
    "KEY": 3,
    "MODE": 4,
    "UID": 5,
    "GID": 6,
    "ATIME": 7,
    "MTIME": 8,
    "CTIME": 9,
    "SIZE": 10,
    "REV": 11,
    "TARGET": 12,
    "RDEV": 13,
    "XATTR": 14,
    "NLINK": 15,
}
REQUIRED = ["KIND", "NAME", "KEY", "MODE", "UID", "GID", "ATIME", "MTIME", "CTIME", "SIZE", "REV"]
HEADER = 46  # version, alg, nonce(12), commitment(32)


def record_ad(node_id: bytes, parent_id: bytes) -> bytes:
    return b"megafs/v1/node" + node_id + parent_id


def manifest_ad(node_id: bytes) -> bytes:
    return b"megafs/v1/manifest" + node_id


def flip(blob: bytes, bit: int) -> bytes:
    out = bytearray(blob)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def tlv(fields: Iterable[tuple[int, bytes]], version: int = 1) -> bytes:
    out = bytearray((version,))
    for tag, value in fields:
        out.append(tag)
        out += struct.pack(">I", len(value)) + value
    return bytes(out)


def record_fields(r: NodeRecord) -> list[tuple[int, bytes]]:
    """The canonical field list of docs/format.md, written from the spec."""
    t = TAGS
    fields = [
        (t["KIND"], bytes((int(r.kind),))),
        (t["NAME"], r.name),
        (t["KEY"], r.key),
        (t["MODE"], struct.pack(">I", r.mode)),
        (t["UID"], struct.pack(">I", r.uid)),
        (t["GID"], struct.pack(">I", r.gid)),
        (t["ATIME"], struct.pack(">q", r.atime_ns)),
        (t["MTIME"], struct.pack(">q", r.mtime_ns)),
        (t["CTIME"], struct.pack(">q", r.ctime_ns)),
        (t["SIZE"], struct.pack(">Q", r.size)),
        (t["REV"], struct.pack(">Q", r.rev)),
    ]
    if r.target:
        fields.append((t["TARGET"], r.target))
    if r.rdev:
        fields.append((t["RDEV"], struct.pack(">Q", r.rdev)))
    for name in sorted(r.xattrs):
        fields.append((t["XATTR"], bytes((len(name),)) + name + r.xattrs[name]))
    if r.nlink != 1:  # absent means 1; always last, after the XATTR fields
        fields.append((t["NLINK"], struct.pack(">I", r.nlink)))
    return fields


def manifest_plain(
    chunk_size: int,
    size: int,
    chunks: list[bytes | None],
    count: int | None = None,
    version: int = 1,
) -> bytes:
    n = len(chunks) if count is None else count
    body = b"".join(b"\0" * 32 if c is None else c for c in chunks)
    return struct.pack(">BIQI", version, chunk_size, size, n) + body


def expect_integrity_error(fn: Callable[[bytes], Any], blobs: Iterable[tuple[Any, bytes]]) -> None:
    """Every blob must fail with IntegrityError. Any other exception
    propagates (and fails the test); a blob that opens is collected and
    reported, with what it opened to."""
    accepted = []
    tried = 0
    for label, blob in blobs:
        tried += 1
        try:
            result = fn(blob)
        except IntegrityError:
            continue
        accepted.append((label, result))
    assert tried > 0
    assert not accepted, f"{len(accepted)} of {tried} tampered inputs accepted: {accepted[:3]!r}"


def every_bit(blob: bytes) -> Iterable[tuple[int, bytes]]:
    return ((i, flip(blob, i)) for i in range(len(blob) * 8))


def every_truncation(blob: bytes) -> Iterable[tuple[int, bytes]]:
    return ((n, blob[:n]) for n in range(len(blob)))


def appended(blob: bytes) -> Iterable[tuple[bytes, bytes]]:
    for extra in (b"\0", b"\x01", b"\0" * 16, b"\xff" * 32, blob[-16:]):
        yield extra, blob + extra


# MIN_KDF cost with a fixed salt: fast (~50 ms) and accepted by check().
FAST_KDF = KdfParams(memory_kib=19456, iterations=2, lanes=1, salt=bytes(range(16)))


def make_record(**changes: Any) -> NodeRecord:
    base = NodeRecord(
        kind=Kind.FILE,
        name=b"report.txt",
        key=bytes(range(32, 64)),
        mode=0o100644,
        uid=1000,
        gid=1000,
        atime_ns=1_700_000_000_123_456_789,
        mtime_ns=1_700_000_001_000_000_000,
        ctime_ns=1_700_000_002_000_000_001,
        size=12345,
        rev=7,
    )
    return base.evolve(**changes)
