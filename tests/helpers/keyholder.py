"""A second device of an account that writes nodes itself, byte for byte as
docs/format.md (sections 5-9) says megafs writes them, straight to the
server.

Tests of a malicious server need to know every id, key and sealed object
they hand the "server" to misuse: an older revision's manifest, another
file's chunk, a record of another folder. A mount keeps those to itself;
this key holder keeps them in :class:`FileNode` and :class:`Folder`. It logs
in with the password through the real client code (``megafs.cli.account``)
and seals with the real ``megafs.crypto``: nothing here imitates megafs,
it only chooses what to write. Records carry the caller's uid and gid, so a
mount of the same account shows them as the user's own.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from megafs.cli.account import login
from megafs.crypto import (
    CHUNK_SIZE,
    NO_PARENT,
    AccountKeys,
    Kind,
    Manifest,
    NodeRecord,
    new_key,
    new_node_id,
    open_record,
    seal_chunk,
    seal_manifest,
    seal_record,
)
from megafs.remote import RemoteClient

__all__ = ["FileNode", "Folder", "KeyHolder", "flip_bit"]


def flip_bit(blob: bytes, index: int = -1, bit: int = 0) -> bytes:
    """``blob`` with one bit inverted (by default in its last byte, the GCM
    tag of a sealed object)."""
    out = bytearray(blob)
    out[index] ^= 1 << bit
    return bytes(out)


@dataclass
class Folder:
    id: bytes
    key: bytes
    parent: bytes | None = None
    meta: bytes = b""


@dataclass
class FileNode:
    """A file as last written; ``previous`` is the revision before, whose
    sealed record, manifest and chunks a rollback test replays."""

    id: bytes
    parent: bytes
    name: bytes
    data: bytes
    record: NodeRecord
    meta: bytes
    content: bytes
    #: Chunk id and sealed blob of each stored chunk, in file order.
    chunks: list[tuple[bytes, bytes]]
    version: int = 0
    previous: FileNode | None = None


class KeyHolder:
    """Logged in to one account; writes with its keys through ``remote``."""

    def __init__(self, remote: RemoteClient, keys: AccountKeys, root: Folder) -> None:
        self.remote = remote
        self.keys = keys
        self.root = root

    @classmethod
    async def login(
        cls, remote: RemoteClient, email: str, password: bytes, *, code: str | None = None
    ) -> KeyHolder:
        """Log in as a device would (with a two-factor ``code`` if the
        account needs one), and open the root folder's record."""
        source = None if code is None else lambda: code
        unlocked = await login(remote, email, password, "key-holder", code=source)
        keys = unlocked.keys
        node = await remote.get_node(keys.root_id)
        record = open_record(keys.root_folder_key, keys.root_id, NO_PARENT, node.meta)
        return cls(remote, keys, Folder(keys.root_id, record.key, None, node.meta))

    def _record(
        self,
        kind: Kind,
        name: bytes,
        key: bytes,
        *,
        size: int = 0,
        rev: int = 1,
        target: bytes = b"",
        xattrs: dict[bytes, bytes] | None = None,
    ) -> NodeRecord:
        now = time.time_ns()
        return NodeRecord(
            kind=kind,
            name=name,
            key=key,
            mode=0o755 if kind == Kind.DIR else 0o644,
            uid=os.getuid(),
            gid=os.getgid(),
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
            size=size,
            rev=rev,
            target=target,
            xattrs=xattrs or {},
        )

    async def mkdir(self, parent: Folder, name: bytes) -> Folder:
        folder = Folder(new_node_id(), new_key(), parent.id)
        record = self._record(Kind.DIR, name, folder.key)
        folder.meta = seal_record(parent.key, folder.id, parent.id, record)
        await self.remote.put_node(
            folder.id,
            parent=parent.id,
            expect_version=0,
            meta=folder.meta,
            content=None,
            chunks=(),
            commit_id=os.urandom(16),
        )
        return folder

    async def write(
        self,
        parent: Folder,
        name: bytes,
        data: bytes,
        *,
        node: FileNode | None = None,
        xattrs: dict[bytes, bytes] | None = None,
    ) -> FileNode:
        """A new file, or (``node``) a new revision of one: a new content
        key and manifest, REV + 1, as format.md requires of writers."""
        node_id = node.id if node is not None else new_node_id()
        chunks: list[tuple[bytes, bytes]] = []
        secrets: list[bytes | None] = []
        for start in range(0, len(data), CHUNK_SIZE):
            piece = data[start : start + CHUNK_SIZE]
            if not piece.strip(b"\0"):
                secrets.append(None)
                continue
            sealed = seal_chunk(self.keys, piece)
            secrets.append(sealed.secret)
            chunks.append((sealed.chunk_id, sealed.blob))
        for chunk_id, blob in chunks:
            await self.remote.put_chunk(chunk_id, blob)
        key = new_key()
        manifest = Manifest(size=len(data), chunk_size=CHUNK_SIZE, chunks=tuple(secrets))
        content = seal_manifest(key, node_id, manifest)
        rev = node.record.rev + 1 if node is not None else 1
        record = self._record(Kind.FILE, name, key, size=len(data), rev=rev, xattrs=xattrs)
        meta = seal_record(parent.key, node_id, parent.id, record)
        version = await self.remote.put_node(
            node_id,
            parent=parent.id,
            expect_version=node.version if node else 0,
            meta=meta,
            content=content,
            chunks=tuple(dict.fromkeys(c for c, _ in chunks)),
            commit_id=os.urandom(16),
        )
        return FileNode(
            node_id, parent.id, name, data, record, meta, content, chunks, version, node
        )
