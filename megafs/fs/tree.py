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

from megafs.cache import ChunkCache, FileContent, LocalState, Uploader
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
#: Name of the hidden folder of hard-linked nodes (never shown).
LINKS_NAME = b".megafs-links"
_EMPTY_MANIFEST = Manifest(size=0, chunk_size=CHUNK_SIZE, chunks=())
#: Sealed manifests that carry content are kept in memory up to this size
#: (a chunk list always is), so a big tree of small files does not live in
#: memory; a larger one is fetched again when needed.
_KEEP_INLINE_MAX = 1024


@dataclass(eq=False)
class LinkName:
    """A LINK node: one name of a hard-linked node, in some folder."""

    id: bytes
    record: NodeRecord


class Children(dict[bytes, "Inode"]):
    """A folder's children by name, counting its subfolders as they change, so
    a folder's link count (2 + subfolders) costs nothing in big folders."""

    __slots__ = ("subdirs",)

    def __init__(self) -> None:
        super().__init__()
        self.subdirs = 0

    def __setitem__(self, name: bytes, inode: Inode) -> None:
        old = self.get(name)
        if old is not None and old.kind == Kind.DIR:
            self.subdirs -= 1
        if inode.kind == Kind.DIR:
            self.subdirs += 1
        super().__setitem__(name, inode)

    def __delitem__(self, name: bytes) -> None:
        self.pop(name)

    def pop(self, name: bytes, *default: Inode | None) -> Inode | None:  # type: ignore[override]
        """Remove and return the child called ``name``, as ``dict.pop`` does."""
        if name not in self:
            return super().pop(name, *default)
        inode = super().pop(name)
        if inode.kind == Kind.DIR:
            self.subdirs -= 1
        return inode


@dataclass(eq=False)
class Inode:
    """One node as the kernel knows it. ``record`` is the decrypted record;
    ``children`` is None until the folder has been loaded."""

    ino: int
    id: bytes
    parent: Inode | None
    record: NodeRecord
    children: Children | None = None
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
    #: Folders: names that are LINK nodes (further names of a hard-linked
    #: node), by name.
    links: dict[bytes, LinkName] = field(default_factory=dict)

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
        state: LocalState,
    ) -> None:
        self._remote = remote
        self._state = state
        #: Newest record revision seen of every node (rule 8), persisted.
        self._seen: dict[bytes, int] = {}
        self._uploader = uploader
        self._chunks = chunks
        self._keys = keys
        self.inodes: dict[int, Inode] = {}
        self._next_ino = ROOT_INODE + 1
        self._loading: dict[int, trio.Event] = {}
        #: The hidden folder of hard-linked nodes, once seen or created.
        self._links_dir: Inode | None = None

    # -- loading ------------------------------------------------------------------

    async def _check_revisions(self, records: dict[bytes, NodeRecord]) -> set[bytes]:
        """Refuse records older than ones seen before (the server rolled the
        node back); remember the newest of the rest. Returns refused ids."""
        refused = {i for i, r in records.items() if r.rev < self._seen.get(i, 0)}
        for node_id in refused:
            log.error(
                "node %s: the server sent revision %d after %d; refused (rollback)",
                node_id.hex(),
                records[node_id].rev,
                self._seen[node_id],
            )
        fresh = [
            (i, r.rev)
            for i, r in records.items()
            if i not in refused and r.rev > self._seen.get(i, -1)
        ]
        if fresh:
            self._seen.update(fresh)
            await self._state.save_seen(fresh)
        return refused

    async def load_root(self) -> Inode:
        self._seen = await self._state.load_seen()
        root_id = self._keys.root_id
        pending = self._uploader.pending(root_id)
        if pending is not None and pending.op == "put" and pending.meta is not None:
            meta = pending.meta
        else:
            node = await self._remote.get_node(root_id)
            self._uploader.note_version(root_id, node.version)
            meta = node.meta
        record = open_record(self._keys.root_folder_key, root_id, NO_PARENT, meta)
        if record.kind != Kind.DIR or await self._check_revisions({root_id: record}):
            raise IntegrityError()
        root = Inode(ino=ROOT_INODE, id=root_id, parent=None, record=record)
        self.inodes[ROOT_INODE] = root
        return root

    def _new_inode(self, node_id: bytes, parent: Inode, record: NodeRecord) -> Inode:
        inode = Inode(ino=self._next_ino, id=node_id, parent=parent, record=record)
        self._next_ino += 1
        self.inodes[inode.ino] = inode
        return inode

    async def children(self, folder: Inode) -> Children:
        """The folder's children by name, loading them on first use."""
        if folder.children is not None:
            return folder.children
        if folder.kind not in (Kind.DIR, Kind.LINKS):
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

    async def _load_children(self, folder: Inode) -> Children:
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
        for node_id in await self._check_revisions({i: r for i, (r, _) in found.items()}):
            del found[node_id]
        for entry in self._uploader.pending_children(folder.id):
            assert entry.meta is not None
            try:
                record = open_record(key, entry.node_id, folder.id, entry.meta)
            except IntegrityError:
                log.error("journal entry %s does not open; hidden", entry.node_id.hex())
                continue
            found[entry.node_id] = (record, entry.content)
        children = Children()
        link_names: list[tuple[bytes, NodeRecord]] = []
        for node_id in sorted(found):
            record, content = found[node_id]
            if record.kind == Kind.LINK:
                link_names.append((node_id, record))
                continue
            if record.kind == Kind.LINKS:
                if folder.parent is None and self._links_dir is None:
                    self._links_dir = self._new_inode(node_id, folder, record)
                else:
                    log.error("folder %s: unexpected links folder; hidden", folder.id.hex())
                continue
            if record.name in children:
                log.error("folder %s: two children named alike; showing one", folder.id.hex())
                continue
            inode = self._new_inode(node_id, folder, record)
            if content is not None and len(content) <= _KEEP_INLINE_MAX:
                inode.listed_content = content
            children[record.name] = inode
        if link_names:
            linked = await self._linked_nodes()
            for link_id, record in link_names:
                target = linked.get(record.target)
                if target is None or record.name in children:
                    log.error(
                        "folder %s: link %s names no node; hidden", folder.id.hex(), link_id.hex()
                    )
                    continue
                children[record.name] = target
                folder.links[record.name] = LinkName(link_id, record)
        return children

    async def _linked_nodes(self) -> dict[bytes, Inode]:
        """Hard-linked nodes by id (they live in the hidden links folder)."""
        root = self.inodes[ROOT_INODE]
        if root.ino not in self._loading:
            # (While the root itself loads, its listing has already shown
            # the links folder, if there is one.)
            await self.children(root)
        if self._links_dir is None:
            return {}
        return {inode.id: inode for inode in (await self.children(self._links_dir)).values()}

    async def _links_folder(self) -> Inode:
        """The hidden links folder, created on the account's first hard link."""
        root = self.inodes[ROOT_INODE]
        await self.children(root)
        if self._links_dir is None:
            now = time.time_ns()
            record = NodeRecord(
                kind=Kind.LINKS,
                name=LINKS_NAME,
                key=new_key(),
                mode=0o700,
                uid=root.record.uid,
                gid=root.record.gid,
                atime_ns=now,
                mtime_ns=now,
                ctime_ns=now,
                size=0,
                rev=0,
            )
            links = self._new_inode(new_node_id(), root, record)
            links.children = Children()
            self._links_dir = links
            await self.commit(links)
        return self._links_dir

    # -- hard links -----------------------------------------------------------------

    async def link(self, inode: Inode, folder: Inode, name: bytes) -> None:
        """Give ``inode`` a further name. On its first link the node moves
        into the links folder and its current name becomes a LINK node too."""
        links = await self._links_folder()
        now = time.time_ns()
        if inode.parent is not links:
            old_folder = inode.parent
            assert old_folder is not None
            old_name = inode.record.name
            await self._add_link_name(old_folder, old_name, inode)
            inode.parent = links
            inode.record = inode.record.evolve(name=inode.id.hex().encode())
            assert links.children is not None
            links.children[inode.record.name] = inode
        inode.record = inode.record.evolve(nlink=inode.record.nlink + 1, ctime_ns=now)
        await self.commit(inode)
        await self._add_link_name(folder, name, inode)
        (await self.children(folder))[name] = inode
        touch(folder, now)

    async def _add_link_name(self, folder: Inode, name: bytes, inode: Inode) -> None:
        r = inode.record
        record = NodeRecord(
            kind=Kind.LINK,
            name=name,
            key=new_key(),
            mode=r.mode,
            uid=r.uid,
            gid=r.gid,
            atime_ns=r.atime_ns,
            mtime_ns=r.mtime_ns,
            ctime_ns=r.ctime_ns,
            size=0,
            rev=1,
            target=inode.id,
        )
        link = LinkName(new_node_id(), record)
        folder.links[name] = link
        await self._put_link(folder, link)

    async def _put_link(self, folder: Inode, link: LinkName) -> None:
        meta = seal_record(folder.record.key, link.id, folder.id, link.record)
        await self._uploader.put(link.id, parent=folder.id, meta=meta, content=None, chunks=())

    async def remove_name(self, folder: Inode, name: bytes) -> Inode:
        """Remove one name from a folder; the node goes when its last name
        does. Returns the node."""
        children = await self.children(folder)
        inode = children.pop(name)
        touch(folder, time.time_ns())
        link = folder.links.pop(name, None)
        if link is None:
            await self.delete(inode)
            return inode
        await self._uploader.delete(link.id)
        nlink = inode.record.nlink - 1
        inode.record = inode.record.evolve(nlink=max(nlink, 1), ctime_ns=time.time_ns())
        if nlink <= 0:
            await self.delete(inode)
        else:
            await self.commit(inode)
        return inode

    async def move(self, folder: Inode, name: bytes, new_folder: Inode, new_name: bytes) -> None:
        """Move one name (the target name must be free)."""
        children = await self.children(folder)
        new_children = await self.children(new_folder)
        inode = children.pop(name)
        new_children[new_name] = inode
        now = time.time_ns()
        touch(folder, now)
        touch(new_folder, now)
        link = folder.links.pop(name, None)
        if link is None:
            inode.parent = new_folder
            inode.record = inode.record.evolve(name=new_name, ctime_ns=now)
            await self.commit(inode)
            return
        link.record = link.record.evolve(name=new_name, rev=link.record.rev + 1)
        new_folder.links[new_name] = link
        await self._put_link(new_folder, link)
        inode.record = inode.record.evolve(ctime_ns=now)
        await self.commit(inode)

    async def content(self, inode: Inode) -> FileContent:
        """The file's content, loading its manifest on first use."""
        if inode.content is not None:
            return inode.content
        async with inode.lock:
            if inode.content is not None:
                return inode.content
            if inode.kind != Kind.FILE:
                raise IntegrityError("not a file")
            _, manifest = await self._load_manifest(inode)
            if manifest.size != inode.record.size:
                raise IntegrityError()
            inode.content = FileContent(
                self._chunks, manifest, on_new_chunk=self._uploader.chunk_added
            )
            return inode.content

    async def _load_manifest(self, inode: Inode) -> tuple[bytes, Manifest]:
        """The file's committed manifest, sealed and opened (so verified):
        from memory, the journal or the server."""
        blob = inode.sealed_content or inode.listed_content
        if blob is None:
            pending = self._uploader.pending(inode.id)
            if pending is not None and pending.op == "put":
                blob = pending.content
            else:
                blob = (await self._remote.get_node(inode.id)).content
        if blob is None:
            raise IntegrityError("file without content")
        manifest = open_manifest(inode.record.key, inode.id, blob)
        self._remember_manifest(inode, blob, manifest)
        return blob, manifest

    def _remember_manifest(self, inode: Inode, blob: bytes, manifest: Manifest) -> None:
        """Keep what a later metadata-only commit needs (``_KEEP_INLINE_MAX``)."""
        inode.listed_content = None
        inode.chunk_ids = self._ids(manifest)
        keep = manifest.inline is None or len(blob) <= _KEEP_INLINE_MAX
        inode.sealed_content = blob if keep else None

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
            inode.children = Children()
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
            sealed: bytes | None = None
            if content is not None and content.changed:
                manifest = await content.seal()
                record = record.evolve(key=new_key(), size=manifest.size)
                sealed = seal_manifest(record.key, inode.id, manifest)
                self._remember_manifest(inode, sealed, manifest)
            elif inode.kind == Kind.FILE:
                sealed = inode.sealed_content or (await self._load_manifest(inode))[0]
            parent = inode.parent
            meta = seal_record(parent.record.key, inode.id, parent.id, record)
            inode.record = record
            await self._check_revisions({inode.id: record})
            inode.seq = await self._uploader.put(
                inode.id,
                parent=parent.id,
                meta=meta,
                content=sealed,
                chunks=inode.chunk_ids,
                durable=durable,
            )
            return inode.seq

    async def delete(self, inode: Inode) -> None:
        """Remove a node (already removed from its folder's children)."""
        links = self._links_dir
        if links is not None and inode.parent is links and links.children is not None:
            links.children.pop(inode.record.name, None)
        inode.unlinked = True
        inode.seq = await self._uploader.delete(inode.id)


def touch(inode: Inode, now_ns: int) -> None:
    """A folder's mtime/ctime after a change of its entries (kept in memory;
    see docs/format.md on folder times)."""
    inode.record = inode.record.evolve(mtime_ns=now_ns, ctime_ns=now_ns)
