"""The mount's view of the node tree: inodes, folders loaded on demand.

A folder's children are fetched from the server the first time it is
looked into, decrypted, and overlaid with the journal (changes this mount
made that the server does not have yet), so the tree is always "server plus
what is pending". A child whose record does not open under the folder's
key (injected, moved or tampered with by the server) is logged and never
shown.

Every change to a node goes through :meth:`Tree.commit` or
:meth:`Tree.delete`, which seal the record (and for files the manifest,
under a new content key per content revision) and journal it for the
uploader.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from megafs.cache import ChunkCache, FileContent, Uploader
from megafs.crypto import (
    CHUNK_SIZE,
    NO_PARENT,
    AccountKeys,
    Kind,
    Manifest,
    NodeRecord,
    new_key,
    new_node_id,
    open_manifest,
    open_record,
    seal_manifest,
    seal_record,
)
from megafs.errors import IntegrityError, NotFound
from megafs.remote import RemoteClient

__all__ = ["ROOT_INODE", "Inode", "Tree"]

log = logging.getLogger(__name__)

ROOT_INODE = 1
_EMPTY_MANIFEST = Manifest(size=0, chunk_size=CHUNK_SIZE, chunks=())


@dataclass(eq=False)
class Inode:
    """One node as the kernel knows it. ``record`` is the decrypted record;
    ``children`` is None until the folder has been loaded."""

    ino: int
    id: bytes
    parent: Inode | None
    record: NodeRecord
    children: dict[bytes, Inode] | None = None
    lookups: int = 0
    opens: int = 0
    content: FileContent | None = None
    #: The sealed manifest as last committed or loaded, and its chunk ids.
    sealed_content: bytes | None = None
    chunk_ids: tuple[bytes, ...] = ()
    #: Inline content from a listing, kept until the file is opened.
    listed_content: bytes | None = None
    #: Journal seq of this node's latest change (0: none this run).
    seq: int = 0
    unlinked: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def kind(self) -> Kind:
        return self.record.kind

    @property
    def size(self) -> int:
        return self.content.size if self.content is not None else self.record.size


class Tree:
    def __init__(
        self,
        remote: RemoteClient,
        uploader: Uploader,
        chunks: ChunkCache,
        keys: AccountKeys,
    ) -> None:
        self._remote = remote
        self._uploader = uploader
        self._chunks = chunks
        self._keys = keys
        self.inodes: dict[int, Inode] = {}
        self._next_ino = ROOT_INODE + 1
        self._loading: dict[int, trio.Event] = {}

    # -- loading ------------------------------------------------------------------

    async def load_root(self) -> Inode:
        root_id = self._keys.root_id
        pending = self._uploader.pending(root_id)
        if pending is not None and pending.op == "put" and pending.meta is not None:
            meta = pending.meta
        else:
            node = await self._remote.get_node(root_id)
            self._uploader.note_version(root_id, node.version)
            meta = node.meta
        record = open_record(self._keys.root_folder_key, root_id, NO_PARENT, meta)
        if record.kind != Kind.DIR:
            raise IntegrityError()
        root = Inode(ino=ROOT_INODE, id=root_id, parent=None, record=record)
        self.inodes[ROOT_INODE] = root
        return root

    def _new_inode(self, node_id: bytes, parent: Inode, record: NodeRecord) -> Inode:
        inode = Inode(ino=self._next_ino, id=node_id, parent=parent, record=record)
        self._next_ino += 1
        self.inodes[inode.ino] = inode
        return inode

    async def children(self, folder: Inode) -> dict[bytes, Inode]:
        """The folder's children by name, loading them on first use."""
        if folder.children is not None:
            return folder.children
        if folder.kind != Kind.DIR:
            raise NotFound("not a folder")
        while folder.ino in self._loading:
            await self._loading[folder.ino].wait()
            if folder.children is not None:
                return folder.children
        done = self._loading[folder.ino] = trio.Event()
        try:
            folder.children = await self._load_children(folder)
        finally:
            del self._loading[folder.ino]
            done.set()
        return folder.children

    async def _load_children(self, folder: Inode) -> dict[bytes, Inode]:
        try:
            listed = await self._remote.list_children(folder.id)
        except NotFound:
            listed = []  # journaled in an earlier run, not on the server yet
        key = folder.record.key
        found: dict[bytes, tuple[NodeRecord, bytes | None]] = {}
        for node in listed:
            if self._uploader.pending(node.id) is not None:
                continue  # the journal's state wins, added below
            try:
                record = open_record(key, node.id, folder.id, node.meta)
            except IntegrityError:
                log.error(
                    "folder %s: child %s fails authentication; hidden",
                    folder.id.hex(),
                    node.id.hex(),
                )
                continue
            self._uploader.note_version(node.id, node.version)
            found[node.id] = (record, node.content)
        for entry in self._uploader.pending_children(folder.id):
            assert entry.meta is not None
            try:
                record = open_record(key, entry.node_id, folder.id, entry.meta)
            except IntegrityError:
                log.error("journal entry %s does not open; hidden", entry.node_id.hex())
                continue
            found[entry.node_id] = (record, entry.content)
        children: dict[bytes, Inode] = {}
        for node_id in sorted(found):
            record, content = found[node_id]
            if record.name in children:
                log.error("folder %s: two children named alike; showing one", folder.id.hex())
                continue
            inode = self._new_inode(node_id, folder, record)
            inode.listed_content = content
            children[record.name] = inode
        return children

    async def content(self, inode: Inode) -> FileContent:
        """The file's content, loading its manifest on first use."""
        if inode.content is not None:
            return inode.content
        async with inode.lock:
            if inode.content is not None:
                return inode.content
            if inode.kind != Kind.FILE:
                raise IntegrityError("not a file")
            blob = inode.listed_content
            if blob is None:
                pending = self._uploader.pending(inode.id)
                if pending is not None and pending.op == "put":
                    blob = pending.content
                else:
                    blob = (await self._remote.get_node(inode.id)).content
            if blob is None:
                raise IntegrityError("file without content")
            manifest = open_manifest(inode.record.key, inode.id, blob)
            if manifest.size != inode.record.size:
                raise IntegrityError()
            inode.sealed_content = blob
            inode.chunk_ids = self._ids(manifest)
            inode.listed_content = None
            inode.content = FileContent(
                self._chunks, manifest, on_new_chunk=self._uploader.chunk_added
            )
            return inode.content

    def _ids(self, manifest: Manifest) -> tuple[bytes, ...]:
        return tuple(dict.fromkeys(self._keys.chunk_id(s) for s in manifest.chunks if s))

    # -- creating -----------------------------------------------------------------

    async def create(
        self,
        parent: Inode,
        name: bytes,
        kind: Kind,
        mode: int,
        uid: int,
        gid: int,
        *,
        target: bytes = b"",
        rdev: int = 0,
    ) -> Inode:
        children = await self.children(parent)
        now = time.time_ns()
        record = NodeRecord(
            kind=kind,
            name=name,
            key=new_key(),
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
            size=len(target) if kind == Kind.SYMLINK else 0,
            rev=0,
            target=target,
            rdev=rdev,
        )
        inode = self._new_inode(new_node_id(), parent, record)
        if kind == Kind.DIR:
            inode.children = {}
        elif kind == Kind.FILE:
            inode.content = FileContent(
                self._chunks, _EMPTY_MANIFEST, on_new_chunk=self._uploader.chunk_added
            )
            inode.content.changed = True
        children[name] = inode
        touch(parent, now)
        await self.commit(inode)
        return inode

    # -- committing ---------------------------------------------------------------

    async def commit(self, inode: Inode, *, durable: bool = False) -> int:
        """Seal the node's current state and journal it; returns its seq."""
        if inode.unlinked:
            return inode.seq
        if inode.parent is None:
            # The root's record is sealed under a key derived from the
            # master key; its attributes are not committed (docs/format.md).
            return inode.seq
        async with inode.lock:
            record = inode.record.evolve(rev=inode.record.rev + 1)
            content = inode.content
            if content is not None and content.changed:
                manifest = await content.seal()
                record = record.evolve(key=new_key(), size=manifest.size)
                inode.sealed_content = seal_manifest(record.key, inode.id, manifest)
                inode.chunk_ids = self._ids(manifest)
            elif inode.kind == Kind.FILE and inode.sealed_content is None:
                await self._load_sealed_content(inode)
            parent = inode.parent
            meta = seal_record(parent.record.key, inode.id, parent.id, record)
            inode.record = record
            inode.seq = await self._uploader.put(
                inode.id,
                parent=parent.id,
                meta=meta,
                content=inode.sealed_content,
                chunks=inode.chunk_ids,
                durable=durable,
            )
            return inode.seq

    async def _load_sealed_content(self, inode: Inode) -> None:
        if inode.listed_content is not None:
            blob: bytes | None = inode.listed_content
        else:
            pending = self._uploader.pending(inode.id)
            blob = (
                pending.content
                if pending is not None and pending.op == "put"
                else (await self._remote.get_node(inode.id)).content
            )
        if blob is None:
            raise IntegrityError("file without content")
        manifest = open_manifest(inode.record.key, inode.id, blob)
        inode.sealed_content = blob
        inode.chunk_ids = self._ids(manifest)

    async def delete(self, inode: Inode) -> None:
        """Remove a node (already unlinked from its parent's children)."""
        inode.unlinked = True
        inode.seq = await self._uploader.delete(inode.id)


def touch(inode: Inode, now_ns: int) -> None:
    """A folder's mtime/ctime after a change of its entries (kept in memory;
    see docs/format.md on folder times)."""
    inode.record = inode.record.evolve(mtime_ns=now_ns, ctime_ns=now_ns)
