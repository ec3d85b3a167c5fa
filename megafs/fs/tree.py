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

import bisect
import contextlib
import itertools
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import trio

from megafs.cache import (
    ChunkCache,
    FileContent,
    Held,
    JournalEntry,
    LocalState,
    Sealer,
    Uploader,
)
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
from megafs.errors import IntegrityError, NotFound, RemoteError
from megafs.remote import Change, RemoteClient, RemoteNode

__all__ = ["ROOT_INODE", "Forget", "Inode", "Tree"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

ROOT_INODE = 1
#: Inode numbers are 63 bits: positive in a signed 64-bit ino_t too.
_INO_MASK = (1 << 63) - 1
#: Name of the hidden folder of hard-linked nodes (never shown).
LINKS_NAME = b".megafs-links"
_EMPTY_MANIFEST = Manifest(size=0, chunk_size=CHUNK_SIZE, chunks=())
#: Seconds reads keep to the local cache after the server failed to answer.
OFFLINE_RETRY = 5.0
#: Sealed manifests that carry content are kept in memory up to this size
#: (a chunk list always is), so a big tree of small files does not live in
#: memory; a larger one is fetched again when needed.
_KEEP_INLINE_MAX = 1024
#: Files of one folder whose kept manifests one read of the local copy
#: brings (``Tree._kept_content``), and twice that held at most; only in
#: folders of at most ``KEPT_AHEAD_FOLDER`` entries (each read sorts them).
KEPT_AHEAD = 256
KEPT_AHEAD_FOLDER = 4096


@dataclass(eq=False)
class LinkName:
    """A LINK node: one name of a hard-linked node, in some folder."""

    id: bytes
    record: NodeRecord


class Children(dict[bytes, "Inode"]):
    """A folder's children by name, counting its subfolders as they change, so
    a folder's link count (2 + subfolders) costs nothing in big folders.
    ``links``: the names that are LINK nodes (further names of a hard-linked
    node), by name; kept here, not on every inode, since only folders have
    them. ``generation`` counts the changes of names, so that an order of
    them worked out once (``fs/folder_ahead.py``) is known to still hold."""

    __slots__ = ("generation", "links", "subdirs")

    def __init__(self) -> None:
        super().__init__()
        self.subdirs = 0
        self.generation = 0
        self.links: dict[bytes, LinkName] = {}

    def __setitem__(self, name: bytes, inode: Inode) -> None:
        old = self.get(name)
        if old is not None and old.kind == Kind.DIR:
            self.subdirs -= 1
        if inode.kind == Kind.DIR:
            self.subdirs += 1
        self.generation += 1
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
        self.generation += 1
        return inode


@dataclass(frozen=True)
class Forget:
    """What the kernel must drop after a change from another device: a
    name in a folder (``name``), or an inode's attributes and cached data."""

    ino: int
    name: bytes | None = None
    #: For an open file, only attributes: dropping its cached pages could
    #: block while the kernel writes them back.
    attr_only: bool = False


@dataclass(eq=False, slots=True)
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
    #: Bytes of the committed content that are not holes (for st_blocks
    #: while ``content`` is not loaded); None if not known.
    allocated: int | None = None
    #: Inline content from a listing, kept until the file is opened.
    listed_content: bytes | None = None
    #: Journal seq of this node's latest change (0: none this run).
    seq: int = 0
    unlinked: bool = False
    #: The record changed since its last commit while the file was open
    #: (``setattr`` of an open file): committed with its content, at close,
    #: ``fsync`` or the periodic flush.
    attrs_changed: bool = False
    #: Only while held or awaited (see ``locked``): a trio.Lock costs ~300
    #: bytes, as much as the rest of an inode, and every node committed
    #: once would keep one.
    _lock: trio.Lock | None = field(default=None, repr=False)
    #: A closed file's content key when its last handle was released: what
    #: the kernel's page cache holds of it (None: nothing it may keep).
    released_key: bytes | None = None

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Serialises this node's commits and the loading of its content."""
        if self._lock is None:
            self._lock = trio.Lock()
        lock = self._lock
        try:
            async with Held(lock):
                yield
        finally:
            # Free, and nobody waits for it (a waiter would hold it by
            # now): the next user makes a new one.
            if not lock.locked() and self._lock is lock:
                self._lock = None

    @property
    def kind(self) -> Kind:
        return self.record.kind

    @property
    def unsaved(self) -> bool:
        """Changed in memory only: not journaled yet, so neither a crash
        nor another device's version may take the change away."""
        return self.attrs_changed or (self.content is not None and self.content.changed)

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
        *,
        sealer: Sealer | None = None,
    ) -> None:
        """``sealer``: where open files seal behind sequential writers
        (without it, they seal in the writer's request)."""
        self._remote = remote
        self._state = state
        #: Newest record revision seen of every node (rule 8), persisted.
        self._seen: dict[bytes, int] = {}
        self._uploader = uploader
        self._chunks = chunks
        self._sealer = sealer
        self._keys = keys
        self.inodes: dict[int, Inode] = {}
        self._loading: dict[int, trio.Event] = {}
        #: The hidden folder of hard-linked nodes, once seen or created.
        self._links_dir: Inode | None = None
        #: Until then, reads do not try the server (it just failed).
        self._offline_until = -math.inf
        #: Changes from other devices put off while ours to the same node
        #: were pending (or its folder was loading), by node id.
        self._deferred: dict[bytes, Change] = {}
        #: Set by the change follower once the local copy of the server's
        #: listings has caught up with the feed in this run: folders it
        #: holds as current are then listed from it, without the server.
        self.caught_up = False
        #: Every node in memory by id (the change feed names nodes by id).
        self._by_id: dict[bytes, Inode] = {}
        #: What the kernel must forget after changes from other devices; a
        #: dedicated task (fs/follow.py) tells it, never a FUSE handler.
        #: Every name added to a loaded folder other than by a request of
        #: the kernel's (which sees it) must be sent here: the kernel keeps
        #: missing names too (``Operations.lookup``), and would hide it.
        self._forget_send, self.forgotten = trio.open_memory_channel[Forget](math.inf)
        #: Kept manifests read with another file's of the same folder, by
        #: node id, until that file is opened (oldest first out).
        self._kept_ahead: dict[bytes, RemoteNode] = {}

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
            # Saved first: were it remembered first, a save that failed (a
            # full disk) would not be tried again by the next call.
            await self._state.save_seen(fresh)
            self._seen.update(fresh)
        return refused

    async def load_root(self) -> Inode:
        self._seen = await self._state.load_seen()
        root_id = self._keys.root_id
        pending = self._uploader.pending(root_id)
        if pending is not None and pending.op == "put" and pending.meta is not None:
            meta = pending.meta
        else:
            node = await self._fetch_node(root_id)
            self._uploader.note_version(root_id, node.version)
            meta = node.meta
        record = open_record(self._keys.root_folder_key, root_id, NO_PARENT, meta)
        if record.kind != Kind.DIR or await self._check_revisions({root_id: record}):
            raise IntegrityError()
        root = Inode(ino=ROOT_INODE, id=root_id, parent=None, record=record)
        self.inodes[ROOT_INODE] = root
        self._by_id[root_id] = root
        return root

    def _new_inode(self, node_id: bytes, parent: Inode, record: NodeRecord) -> Inode:
        inode = Inode(ino=self._ino_for(node_id), id=node_id, parent=parent, record=record)
        self.inodes[inode.ino] = inode
        self._by_id[node_id] = inode
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

    def _ino_for(self, node_id: bytes) -> int:
        """A node's inode number: from its id, so it stays the same across
        mounts and devices. Tools compare it with what they saw before (git's
        index keeps every file's inode, and a changed one makes git read the
        file again); node ids are random, so a clash with a live inode is a
        one-in-2**63 event, resolved by taking the next free number."""
        ino = int.from_bytes(node_id[:8], "big") & _INO_MASK
        while ino <= ROOT_INODE or ino in self.inodes:
            ino = (ino + 1) & _INO_MASK
        return ino

    async def _load_children(self, folder: Inode) -> Children:
        # What the journal placed here before the listing counts too: a
        # change landing while the listing is on its way is in neither the
        # listing (made before it landed) nor the journal (after).
        before = {e.node_id: e for e in self._uploader.pending_children(folder.id)}
        listed = await self._fetch_children(folder.id)
        key = folder.record.key
        found: dict[bytes, tuple[NodeRecord, bytes | None, bool]] = {}
        for node in listed:
            if self._uploader.pending(node.id) is not None:
                continue  # the journal's state wins, added below
            if node.id in before and node.version < self._uploader.known_version(node.id):
                continue  # listed before the journal's state landed: that state
            try:
                record = open_record(key, node.id, folder.id, node.meta)
            except IntegrityError:
                log.error(
                    "folder %s: child %s fails authentication; hidden",
                    folder.id.hex(),
                    node.id.hex(),
                )
                continue
            # Older than what this mount knows (the change feed already
            # moved or changed it): this listing was made before that.
            stale = node.version < self._uploader.known_version(node.id)
            if not stale:
                self._uploader.note_version(node.id, node.version)
            found[node.id] = (record, node.content, stale)
        for node_id in await self._check_revisions({i: r for i, (r, _, _) in found.items()}):
            del found[node_id]
        entries = {
            node_id: entry
            for node_id, entry in before.items()
            if node_id not in found and self._uploader.pending(node_id) is None
        }
        entries.update((e.node_id, e) for e in self._uploader.pending_children(folder.id))
        for entry in entries.values():
            assert entry.meta is not None
            try:
                record = open_record(key, entry.node_id, folder.id, entry.meta)
            except IntegrityError:
                log.error("journal entry %s does not open; hidden", entry.node_id.hex())
                continue
            found[entry.node_id] = (record, entry.content, False)
        children = Children()
        link_names: list[tuple[bytes, NodeRecord]] = []
        for node_id in sorted(found):
            record, content, stale = found[node_id]
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
            inode = self._by_id.get(node_id)
            if inode is None:
                inode = self._new_inode(node_id, folder, record)
            elif stale:
                continue
            else:
                # Shown in another folder: it moved here, and this listing
                # came before the change feed said so. One node, one inode:
                # it leaves its old place (else both names would show it,
                # and the feed's move, finding it here, would leave the old
                # name behind).
                self._detach(inode)
                inode.parent = folder
                inode.unlinked = False
                self._set_record(inode, record)
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
                children.links[record.name] = LinkName(link_id, record)
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
        else:
            # Listed (in the root) but maybe not loaded yet: a mount's first
            # hard link in a folder without any.
            await self.children(self._links_dir)
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
        (await self.children(folder)).links[name] = link
        await self._put_link(folder, link)

    async def _put_link(self, folder: Inode, link: LinkName) -> None:
        meta = seal_record(folder.record.key, link.id, folder.id, link.record)
        await self._uploader.put(
            link.id, parent=folder.id, meta=meta, content=None, chunks=(), rev=link.record.rev
        )

    async def remove_name(self, folder: Inode, name: bytes) -> Inode:
        """Remove one name from a folder; the node goes when its last name
        does. Returns the node."""
        children = await self.children(folder)
        inode = children.pop(name)
        touch(folder, time.time_ns())
        link = children.links.pop(name, None)
        if link is None:
            await self.delete(inode)
            return inode
        await self._uploader.delete(link.id)
        nlink = inode.record.nlink - 1
        inode.record = inode.record.evolve(nlink=max(nlink, 1), ctime_ns=time.time_ns())
        if nlink <= 0:
            await self.delete(inode)
        elif nlink == 1 and (last := self._unsent_name(children, inode)) is not None:
            await self._unlink_last_name(folder, *last, inode)
        else:
            await self.commit(inode)
        return inode

    def _unsent_name(self, children: Children, inode: Inode) -> tuple[bytes, LinkName] | None:
        """The node's further name among ``children`` if that name has never
        reached the server (looked for in this folder only, where git makes
        an object's temporary and final names)."""
        for name, link in children.links.items():
            if link.record.target == inode.id and self._uploader.unsent(link.id):
                return name, link
        return None

    async def _unlink_last_name(
        self, folder: Inode, name: bytes, link: LinkName, inode: Inode
    ) -> None:
        """A node down to one name, a LINK no other device has seen, becomes
        an ordinary node under that name again: out of the links folder,
        the LINK forgotten. git links each object it writes from a temporary
        name and unlinks that; without this every object would stay a
        hard-linked node and a LINK, two nodes on the server, and listing
        its folder would load the whole links folder."""
        assert folder.children is not None  # (the name was just removed from them)
        del folder.children.links[name]
        links = self._links_dir
        if links is not None and links.children is not None:
            links.children.pop(inode.record.name, None)
        inode.parent = folder
        inode.record = inode.record.evolve(name=name, nlink=1)
        # The node first: a crash between the two leaves it under its name
        # and a LINK naming no linked node (hidden), never a node no name
        # shows. Sent meanwhile, the LINK is deleted like any other.
        await self.commit(inode)
        await self._uploader.delete(link.id)

    async def move(self, folder: Inode, name: bytes, new_folder: Inode, new_name: bytes) -> None:
        """Move one name (the target name must be free)."""
        children = await self.children(folder)
        new_children = await self.children(new_folder)
        inode = children.pop(name)
        new_children[new_name] = inode
        now = time.time_ns()
        touch(folder, now)
        touch(new_folder, now)
        link = children.links.pop(name, None)
        if link is None:
            inode.parent = new_folder
            inode.record = inode.record.evolve(name=new_name, ctime_ns=now)
            await self.commit(inode)
            return
        link.record = link.record.evolve(name=new_name, rev=link.record.rev + 1)
        new_children.links[new_name] = link
        await self._put_link(new_folder, link)
        inode.record = inode.record.evolve(ctime_ns=now)
        await self.commit(inode)

    async def content(self, inode: Inode) -> FileContent:
        """The file's content, loading its manifest on first use."""
        if inode.content is not None:
            return inode.content
        async with inode.locked():
            if inode.content is not None:
                return inode.content
            inode.content = self._new_content(await self._file_manifest(inode))
            return inode.content

    async def stored_secrets(self, inode: Inode, count: int) -> list[bytes | None]:
        """The secrets of a file's first ``count`` chunks as stored (None: a
        hole, or a chunk written and not sealed yet), for read-ahead: from
        its content if loaded, else from its manifest, loaded as
        :meth:`content` does but without making a content, so a file read
        ahead and never opened keeps no more in memory than a listed one."""
        content = inode.content
        if content is None:
            async with inode.locked():
                content = inode.content
                if content is None:
                    return list((await self._file_manifest(inode)).chunks[:count])
        return [content.stored_secret(i) for i in range(min(count, content.chunk_count))]

    async def _file_manifest(self, inode: Inode) -> Manifest:
        """A file's committed manifest, checked against its record (under
        the node's lock)."""
        if inode.kind != Kind.FILE:
            raise IntegrityError("not a file")
        _, manifest = await self._load_manifest(inode)
        if manifest.size != inode.record.size:
            raise IntegrityError()
        return manifest

    def _new_content(self, manifest: Manifest) -> FileContent:
        return FileContent(
            self._chunks, manifest, on_new_chunk=self._uploader.chunk_added, sealer=self._sealer
        )

    async def _load_manifest(self, inode: Inode) -> tuple[bytes, Manifest]:
        """The file's committed manifest, sealed and opened (so verified):
        from memory, the journal, the local copy of the server's nodes (one
        that does not open is fetched again) or the server."""
        blob = inode.sealed_content or inode.listed_content
        inode.listed_content = None  # used once: a bad one is fetched anew next time
        if blob is None:
            pending = self._uploader.pending(inode.id)
            if pending is not None and pending.op == "put":
                blob = pending.content
            elif (kept := await self._kept_content(inode)) is not None:
                try:
                    return kept, self._open_manifest(inode, kept)
                except IntegrityError:
                    log.error(
                        "node %s: the kept manifest does not open; fetching it", inode.id.hex()
                    )
        if blob is None:
            node = await self._fetch_node(inode.id)
            blob = node.content
            self._adopt_record(inode, node)
        if blob is None:
            raise IntegrityError("file without content")
        return blob, self._open_manifest(inode, blob)

    def _open_manifest(self, inode: Inode, blob: bytes) -> Manifest:
        manifest = open_manifest(inode.record.key, inode.id, blob)
        self._remember_manifest(inode, blob, manifest)
        return manifest

    async def _kept_content(self, inode: Inode) -> bytes | None:
        """The sealed manifest the local copy keeps for the version of the
        node this mount shows (a version names one state of a node, so it
        is the one that belongs to the record in memory), or None.

        A folder's files are opened one after another (``git add``,
        ``grep -r``, a file manager's previews), and each manifest not in
        memory (a small file's, which holds its bytes) cost a thread hop
        and a read transaction of its own: 0.55 ms at the median while git
        wrote objects. So a read brings those of up to ``KEPT_AHEAD`` files
        of the folder whose manifests are in no memory either, kept until
        they are opened; what a change made stale since fails the version
        check and is read again."""
        version = self._uploader.known_version(inode.id)
        if not version:
            return None
        kept = self._kept_ahead.pop(inode.id, None)
        if kept is None or kept.version != version:
            found = await self._state.cached_nodes([inode.id, *self._unread_siblings(inode)])
            kept = found.pop(inode.id, None)
            self._kept_ahead.update((i, n) for i, n in found.items() if n.content is not None)
            while len(self._kept_ahead) > 2 * KEPT_AHEAD:
                del self._kept_ahead[next(iter(self._kept_ahead))]
        if kept is None or kept.version != version:
            return None
        return kept.content  # (None: a listing leaves out big manifests)

    def _unread_siblings(self, inode: Inode) -> list[bytes]:
        """Ids of up to ``KEPT_AHEAD`` - 1 other files of the node's folder,
        those named after it first (the order of ``ls``, of git's index, of
        a file manager), then from the start, whose manifests would come
        from the local copy and are not read ahead yet."""
        folder = inode.parent
        children = folder.children if folder is not None else None
        if children is None or len(children) > KEPT_AHEAD_FOLDER:
            return []
        ids: list[bytes] = []
        names = sorted(children)
        start = bisect.bisect_right(names, inode.record.name)
        for name in itertools.chain(names[start:], names[:start]):
            if len(ids) == KEPT_AHEAD - 1:
                break
            child = children[name]
            if (
                child.kind == Kind.FILE
                and child is not inode
                and child.content is None
                and child.sealed_content is None
                and child.listed_content is None
                and child.id not in self._kept_ahead
                and self._uploader.known_version(child.id)
                and self._uploader.pending(child.id) is None
            ):
                ids.append(child.id)
        return ids

    def _adopt_record(self, inode: Inode, node: RemoteNode) -> None:
        """A file's content fetched from the server belongs to the record
        fetched with it: if another device changed the file since this
        mount read its record (and the change feed has not said so yet),
        take the newer record, so the content opens under its own key. An
        older or unverifiable record changes nothing (the content then fails
        its check, as it should)."""
        parent = inode.parent
        if parent is None or node.parent != parent.id or self._uploader.busy(inode.id):
            return
        try:
            record = open_record(parent.record.key, inode.id, parent.id, node.meta)
        except IntegrityError:
            return
        newer = record.key != inode.record.key and record.rev >= self._seen.get(inode.id, 0)
        if newer and record.kind == inode.kind and record.name == inode.record.name:
            inode.record = record
            self._seen[inode.id] = record.rev
            self._uploader.note_version(inode.id, node.version)

    def _remember_manifest(self, inode: Inode, blob: bytes, manifest: Manifest) -> None:
        """Keep what a later metadata-only commit needs (``_KEEP_INLINE_MAX``)."""
        inode.chunk_ids = self._ids(manifest)
        keep = manifest.inline is None or len(blob) <= _KEEP_INLINE_MAX
        inode.sealed_content = blob if keep else None
        stored = 1 if manifest.inline is not None else sum(1 for c in manifest.chunks if c)
        inode.allocated = min(manifest.size, stored * manifest.chunk_size)

    def _ids(self, manifest: Manifest) -> tuple[bytes, ...]:
        return tuple(dict.fromkeys(self._keys.chunk_id(s) for s in manifest.chunks if s))

    # -- the server, or the local copy of what it showed ------------------------

    async def _fetch_node(self, node_id: bytes) -> RemoteNode:
        """A node from the server (kept for offline use), or as last seen
        while the server is unreachable."""
        node = await self._server_or_cache(
            partial(self._remote.get_node, node_id),
            self._state.save_node,
            partial(self._state.cached_node, node_id),
        )
        if node is None:
            raise RemoteError("the server is unreachable and this is not in the local cache")
        return node

    async def _fetch_children(self, folder_id: bytes) -> list[RemoteNode]:
        """A folder's children: from the local copy if it is current (the
        server's as of the change feed, which the follower keeps up), else
        as ``_fetch_node`` fetches a node. A folder the server does not have
        yet (journaled in an earlier run) has none there."""
        if self.caught_up:
            kept = await self._state.cached_children(folder_id, current=True)
            if kept is not None:
                return kept

        async def listing() -> list[RemoteNode]:
            try:
                return await self._remote.list_children(folder_id)
            except NotFound:
                return []

        children = await self._server_or_cache(
            listing,
            partial(self._state.save_listing, folder_id),
            partial(self._state.cached_children, folder_id),
        )
        if children is None:
            pending = self._uploader.pending(folder_id)
            if pending is not None and pending.op == "put" and pending.base_version == 0:
                # Made here and not on the server yet (a mount restarted
                # offline): whatever it holds is in the journal.
                return []
            raise RemoteError("the server is unreachable and this folder is not in the local cache")
        return children

    async def _server_or_cache(
        self,
        fetch: Callable[[], Awaitable[_T]],
        save: Callable[..., Awaitable[None]],
        cached: Callable[[], Awaitable[_T | None]],
    ) -> _T | None:
        """``fetch()`` from the server and ``save(value, at=cursor)`` it
        locally; while the server is unreachable, ``cached()`` instead
        (None: not cached)."""
        if trio.current_time() >= self._offline_until:
            at = self._state.cursor
            try:
                value = await fetch()
            except RemoteError:
                self._went_offline()
            else:
                await save(value, at=at)
                return value
        return await cached()

    def _went_offline(self) -> None:
        if trio.current_time() >= self._offline_until:
            log.warning("server unreachable: working from the local cache")
        self._offline_until = trio.current_time() + OFFLINE_RETRY

    # -- changes from other devices ------------------------------------------------

    async def apply_remote(self, change: Change) -> None:
        """Bring a node another device changed up to date in memory. A node
        with a change of ours not yet on the server is left alone: our
        commit meets theirs on the server, which refuses the older base (a
        conflict, see ``resolve_conflict``)."""
        node_id = change.id
        parent = None if change.parent is None else self._by_id.get(change.parent)
        if self._busy(node_id) or (parent is not None and parent.ino in self._loading):
            # Our change meets theirs on the server; if ours lands first as
            # an earlier version, theirs is still to show: see apply_deferred.
            # (A folder being listed may show the node as it was before.)
            self._deferred[node_id] = change
            return
        inode = self._by_id.get(node_id)
        if change.deleted and (inode is None or inode.unlinked):
            return  # (a delete names the version it removed, so no version test)
        if not change.deleted:
            if change.version <= self._uploader.known_version(node_id):
                return
            if inode is None and (parent is None or parent.children is None):
                return  # in no folder loaded here: listed when its folder is
            at = self._state.cursor
            try:
                node = await self._remote.get_node(node_id)
            except NotFound:
                pass
            else:
                await self._apply_node(node, at=at)
                return
        await self._state.drop_node(node_id)
        if inode is not None:
            self._detach(inode, deleted=True)

    def _busy(self, node_id: bytes) -> bool:
        """A change of ours to the node is not on the server yet: journaled,
        on its way, or still in memory (an open file's unsaved writes, which
        the other device's version must not replace: the daemon's periodic
        flush commits them, and they meet theirs on the server as a conflict)."""
        if self._uploader.busy(node_id):
            return True
        inode = self._by_id.get(node_id)
        return inode is not None and inode.unsaved

    async def apply_deferred(self) -> None:
        """Apply the changes ``apply_remote`` put off, once it need not."""
        for node_id in [i for i in self._deferred if not self._busy(i)]:
            change = self._deferred.pop(node_id)
            try:
                await self.apply_remote(change)
            except RemoteError:
                self._deferred.setdefault(node_id, change)

    async def reload_folders(self) -> None:
        """List every loaded folder again and apply what changed (after the
        change feed lost track)."""
        for folder in [i for i in self._by_id.values() if i.children is not None]:
            assert folder.children is not None
            # Only a child on the server, at the version the listing may
            # show, before the listing was asked for: one of ours landing
            # meanwhile is missing from it, not gone.
            settled = {
                inode.id: version
                for inode in folder.children.values()
                if (version := self._uploader.known_version(inode.id)) and not self._busy(inode.id)
            }
            at = self._state.cursor
            try:
                listed = await self._remote.list_children(folder.id)
            except NotFound:
                continue
            await self._state.save_listing(folder.id, listed, at=at)
            present = {node.id for node in listed}
            for node in listed:
                if node.version > self._uploader.known_version(node.id):
                    await self._apply_node(node, at=at)
            for inode in list(folder.children.values()):
                gone = inode.id not in present and inode.id in settled
                unchanged = self._uploader.known_version(inode.id) == settled.get(inode.id)
                if gone and unchanged and inode.parent is folder and not self._busy(inode.id):
                    self._detach(inode, deleted=True)

    async def _apply_node(self, node: RemoteNode, *, at: int | None) -> None:
        """The node as the server has it now, fetched when the feed's cursor
        was ``at``."""
        if self._busy(node.id):
            # A change of ours began while this one was fetched: like in
            # apply_remote, it waits for ours to land.
            self._deferred[node.id] = Change(node.id, node.parent, node.version, 0, False)
            return
        parent = self._by_id.get(node.parent) if node.parent is not None else None
        inode = self._by_id.get(node.id)
        if parent is None or parent.children is None:
            # Not in a folder loaded here: it is listed when its folder is.
            if inode is not None:
                self._detach(inode)
            return
        try:
            record = open_record(parent.record.key, node.id, parent.id, node.meta)
        except IntegrityError:
            log.error("changed node %s fails authentication; ignored", node.id.hex())
            return
        if record.kind in (Kind.LINK, Kind.LINKS) or await self._check_revisions({node.id: record}):
            # (Hard links made elsewhere show after the folder is listed again.)
            return
        self._uploader.note_version(node.id, node.version)
        await self._state.save_node(node, at=at)
        taken = parent.children.get(record.name)
        if inode is None or inode.parent is not parent or taken is not inode:
            if taken is not None:
                log.error("node %s: its name is taken here; shown after a remount", node.id.hex())
                return
            if inode is None:
                inode = self._new_inode(node.id, parent, record)
            else:
                self._detach(inode)
                inode.parent = parent
            inode.unlinked = False
            parent.children[record.name] = inode
            touch(parent, time.time_ns())
            self._forget(Forget(parent.ino, record.name), Forget(parent.ino))
        self._set_record(inode, record)
        small = node.content is not None and len(node.content) <= _KEEP_INLINE_MAX
        inode.listed_content = node.content if small else None

    def _set_record(self, inode: Inode, record: NodeRecord) -> None:
        """A newer record of the node from the server; the kernel drops
        what it cached of the old one."""
        if record.key != inode.record.key:
            # New content: open handles read it from their next read on.
            inode.content = None
            inode.sealed_content = None
            inode.chunk_ids = ()
            inode.allocated = None
        inode.record = record
        self._forget(Forget(inode.ino, attr_only=inode.opens > 0))

    def _detach(self, inode: Inode, *, deleted: bool = False) -> None:
        """Take a node out of its folder (it moved away, or was deleted)."""
        parent = inode.parent
        if parent is None:
            return
        name = inode.record.name
        if parent.children is not None and parent.children.get(name) is inode:
            del parent.children[name]
            touch(parent, time.time_ns())
        if deleted:
            inode.unlinked = True
        self._forget(Forget(parent.ino, name), Forget(parent.ino))

    def _forget(self, *items: Forget) -> None:
        for item in items:
            self._forget_send.send_nowait(item)

    async def resolve_conflict(self, entry: JournalEntry) -> None:
        """Our change of a node lost the race against another device's: keep
        ours as "NAME (conflicted copy, HOST, DATE).EXT" next to it, then
        show theirs under the original name. Called by the uploader (not
        from a FUSE handler) for the entry it holds.

        What can fail other than a write to a full disk (asking the server
        which version won, opening our own change) comes before anything
        changes: the uploader then meets the conflict again later. Once the
        copy is made, every local write waits for room on a full disk
        instead of failing halfway. The copy is journaled before our entry
        is dropped, so a crash in between (or an unmount while the disk is
        full) makes the next mount keep a second copy, never lose it."""
        inode = self._by_id.get(entry.node_id)
        parent = inode.parent if inode is not None else None
        if inode is None or parent is None or parent.children is None:
            log.error("node %s: conflict with another device; retrying", entry.node_id.hex())
            return
        if inode.unsaved:
            return  # written since: that change is journaled first, then settled
        at = self._state.cursor
        try:
            server = await self._remote.get_node(entry.node_id)
        except NotFound:
            return  # deleted meanwhile: the next round saves ours again
        if entry.meta is None:
            try:
                theirs = open_record(parent.record.key, entry.node_id, parent.id, server.meta)
            except IntegrityError:
                theirs = None
            if theirs == inode.record:
                # The server's version is our own last write, whose answer
                # was lost: no conflict, delete that version.
                entry.base_version = server.version
                entry.sent_commit_id = None
                return
            # We deleted what another device changed: the change wins.
            log.warning("%s was changed on another device; not deleted", inode.record.name)
            await self._take_theirs(entry, server, at)
            return
        record = open_record(parent.record.key, entry.node_id, parent.id, entry.meta)
        if record.kind == Kind.DIR:
            # A folder's own record (name, mode, times): theirs wins; what
            # is inside it is committed node by node and settles itself.
            log.warning("folder %s was changed on two devices; keeping the other's", record.name)
            await self._take_theirs(entry, server, at)
            return
        name = _unique(parent.children, conflict_name(record.name, socket.gethostname()))
        mine = record.evolve(name=name, key=new_key(), rev=0)
        copy_id = new_node_id()
        content: tuple[bytes, Manifest] | None = None
        if record.kind == Kind.FILE and entry.content is not None:
            manifest = open_manifest(record.key, entry.node_id, entry.content)
            content = seal_manifest(mine.key, copy_id, manifest), manifest
        copy = self._new_inode(copy_id, parent, mine)
        if content is not None:
            self._remember_manifest(copy, *content)
            # Whatever its size: the copy's first commit below has nowhere
            # else to find it (it is on no server and in no journal yet).
            copy.sealed_content = content[0]
        parent.children[name] = copy
        # Journaled (again, with a newer state, if a full disk failed it)
        # before our entry is dropped: the copy is what keeps this change.
        await self._uploader.until_saved(lambda: self.commit(copy))
        if content is not None:
            self._remember_manifest(copy, *content)  # the journal has it now
        self._uploader.note_conflict(self._path(copy))
        log.warning("conflict with another device: kept this device's version as %s", name)
        self._forget(Forget(parent.ino, name), Forget(parent.ino))
        await self._take_theirs(entry, server, at)

    async def _take_theirs(self, entry: JournalEntry, server: RemoteNode, at: int | None) -> None:
        """Drop our entry and show the server's version of the node."""
        await self._uploader.drop(entry, server.version)
        await self._uploader.until_saved(lambda: self._forget_own_revisions(entry.node_id))
        await self._uploader.until_saved(lambda: self._apply_node(server, at=at))

    async def _forget_own_revisions(self, node_id: bytes) -> None:
        """The revisions we made of a node never reached the server: the
        other device's, numbered from the same base, must not look older."""
        self._seen.pop(node_id, None)
        await self._state.forget_seen(node_id)

    def _path(self, inode: Inode) -> str:
        parts = []
        node: Inode | None = inode
        while node is not None and node.parent is not None:
            parts.append(node.record.name.decode(errors="replace"))
            node = node.parent
        return "/" + "/".join(reversed(parts))

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
        journal: bool = True,
    ) -> Inode:
        """A new node in ``parent``, journaled for upload unless ``journal``
        is false: a file created open, which its close journals anyway
        (until then it lives in this mount only, like any unsaved write)."""
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
            inode.content = self._new_content(_EMPTY_MANIFEST)
            inode.content.changed = True
        children[name] = inode
        touch(parent, now)
        if journal:
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
        async with inode.locked():
            inode.attrs_changed = False
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
            # Our own new revision: remembered as seen with the journal entry.
            self._seen[inode.id] = max(record.rev, self._seen.get(inode.id, 0))
            inode.seq = await self._uploader.put(
                inode.id,
                parent=parent.id,
                meta=meta,
                content=sealed,
                chunks=inode.chunk_ids,
                rev=record.rev,
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


def conflict_name(name: bytes, host: str, when: float | None = None) -> bytes:
    """``NAME (conflicted copy, HOST, DATE).EXT``, at most 255 bytes (the
    name part is shortened, never the extension or the marker)."""
    stamp = time.strftime("%Y-%m-%d %H-%M-%S", time.localtime(when))
    stem, ext = _split_extension(name)
    marker = f" (conflicted copy, {host[:64]}, {stamp})".encode()
    return stem[: max(255 - len(marker) - len(ext), 1)] + marker + ext


def _unique(children: Children, name: bytes) -> bytes:
    """``name``, or ``name`` with " 2", " 3"... before the extension if taken."""
    stem, ext = _split_extension(name)
    candidate, n = name, 1
    while candidate in children:
        n += 1
        candidate = stem[: 250 - len(ext)] + b" %d" % n + ext
    return candidate


def _split_extension(name: bytes) -> tuple[bytes, bytes]:
    """``(stem, ".ext")``; no extension for a name without a dot or a
    dot-file such as ".bashrc"."""
    stem, dot, ext = name.rpartition(b".")
    return (stem, dot + ext) if stem else (name, b"")
