"""The FUSE request handlers: thin translations onto :class:`~megafs.fs.tree.Tree`
and :class:`~megafs.cache.FileContent`.

Every handler goes through :func:`_errors`: a ``MegafsError`` becomes its
errno (an integrity failure is EIO for that request only), any other
exception is logged with its traceback and answered with EIO. The daemon
never dies on one bad request.

Permission checks are the kernel's (``default_permissions``), as on ext4.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from megafs.cache import ReadAhead, Reader, Uploader
from megafs.crypto import CHUNK_SIZE, Kind
from megafs.errors import MegafsError
from megafs.fs.folder_ahead import FolderAhead
from megafs.fs.tree import Inode, Tree
from megafs.remote import RemoteClient

__all__ = ["Operations"]

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: Attribute and entry cache lifetime handed to the kernel. One device
#: changes the tree only through this mount, so the kernel's view stays true.
CACHE_TIMEOUT = 60.0
#: ``st_blksize``: the buffer size cp, Python's open() and others choose.
#: One chunk, so copying a file in takes one FUSE write per chunk, not eight
#: (cp into the drive returns ~35 % sooner than with 128 KiB).
BLOCK_SIZE = CHUNK_SIZE
_KIND_BITS = {
    Kind.DIR: stat.S_IFDIR,
    Kind.FILE: stat.S_IFREG,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCKET: stat.S_IFSOCK,
    Kind.CHARDEV: stat.S_IFCHR,
    Kind.BLOCKDEV: stat.S_IFBLK,
}
_STATFS_BLOCK = 4096
_LINK_MAX = 65000
_XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
#: The SELinux label, asked of every entry by GNU ``ls -l``. A file
#: without one answers "unsupported" rather than "no such attribute",
#: which ls remembers for the rest of its run on this filesystem instead
#: of asking every entry. A label set on a file (``rsync -X`` from a
#: labelled disk) is kept and read back like any other attribute; where
#: SELinux is enforced the kernel labels a FUSE mount itself and never asks.
_SELINUX_LABEL = b"security.selinux"
_XATTR_VALUE_MAX = 64 * 1024
_XATTR_TOTAL_MAX = 64 * 1024


def _errors(fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except MegafsError as exc:
            if exc.errno == errno.EIO:
                log.error("%s: %s", fn.__name__, exc.detail)
            raise pyfuse3.FUSEError(exc.errno) from exc
        except Exception as exc:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return wrapper


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def _refuse_into_own_subtree(inode: Inode, new_parent: Inode) -> None:
    ancestor: Inode | None = new_parent
    while ancestor is not None:
        if ancestor is inode:
            raise _fail(errno.EINVAL)
        ancestor = ancestor.parent


@dataclass
class _Handle:
    inode: Inode
    flags: int
    #: This handle's reads of the file's content, with their read-ahead.
    reader: Reader


class Operations(pyfuse3.Operations):
    def __init__(
        self,
        tree: Tree,
        uploader: Uploader,
        remote: RemoteClient,
        *,
        read_ahead: ReadAhead,
        fsync_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        self._tree = tree
        #: Started by the daemon (``read_ahead.run``); until then reads work
        #: without it.
        self.read_ahead = read_ahead
        self._folder_ahead = FolderAhead(tree, read_ahead)
        self._uploader = uploader
        self._remote = remote
        self._fsync_timeout = fsync_timeout
        self._handles: dict[int, _Handle] = {}
        self._dir_handles: dict[int, list[tuple[bytes, Inode]]] = {}
        self._next_fh = 1
        self._statfs: tuple[float, int, int] | None = None
        #: Bytes of file growth accepted that the account's ``used`` (as last
        #: asked) does not count yet.
        self._accepted = 0

    # -- helpers ------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        try:
            return self._tree.inodes[ino]
        except KeyError:
            raise _fail(errno.ENOENT) from None

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        rec = inode.record
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = _KIND_BITS[rec.kind] | rec.mode
        if rec.kind == Kind.DIR:
            a.st_nlink = 2 + (inode.children.subdirs if inode.children is not None else 0)
        else:
            a.st_nlink = 0 if inode.unlinked else inode.record.nlink
        a.st_uid = rec.uid
        a.st_gid = rec.gid
        a.st_rdev = rec.rdev
        a.st_size = inode.size
        a.st_blksize = BLOCK_SIZE
        if inode.content is not None:
            allocated = inode.content.allocated_bytes()
        else:
            allocated = inode.allocated if inode.allocated is not None else inode.size
        a.st_blocks = -(-allocated // 512)
        a.st_atime_ns = rec.atime_ns
        a.st_mtime_ns = rec.mtime_ns
        a.st_ctime_ns = rec.ctime_ns
        return a

    def _reply(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a new reference."""
        inode.lookups += 1
        return self._attrs(inode)

    async def _child(self, parent: Inode, name: bytes) -> Inode:
        inode = await self._child_or_none(parent, name)
        if inode is None:
            raise _fail(errno.ENOENT)
        return inode

    async def _child_or_none(self, parent: Inode, name: bytes) -> Inode | None:
        if parent.kind != Kind.DIR:
            raise _fail(errno.ENOTDIR)
        inode = (await self._tree.children(parent)).get(name)
        if inode is None and len(name) > 255:
            raise _fail(errno.ENAMETOOLONG)
        return inode

    async def _absent(self, parent: Inode, name: bytes) -> dict[bytes, Inode]:
        if parent.kind != Kind.DIR:
            raise _fail(errno.ENOTDIR)
        if len(name) > 255:
            raise _fail(errno.ENAMETOOLONG)
        children = await self._tree.children(parent)
        if name in children:
            raise _fail(errno.EEXIST)
        return children

    # -- lookups and attributes ---------------------------------------------------

    @_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        if name == b".":
            return self._reply(parent)
        if name == b"..":
            return self._reply(parent.parent or parent)
        inode = await self._child_or_none(parent, name)
        if inode is None:
            # A negative entry the kernel keeps like a positive one: probes
            # of a missing name (git's of an object before writing it, then
            # its link to that name) stop reaching the daemon. A name that
            # appears without the kernel's sight is invalidated as it does
            # (the change feed, a conflicted copy: Tree._forget).
            absent = pyfuse3.EntryAttributes()
            absent.st_ino = 0
            absent.entry_timeout = CACHE_TIMEOUT
            return absent
        return self._reply(inode)

    async def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:
            inode = self._tree.inodes.get(ino)
            if inode is not None:
                inode.lookups = max(0, inode.lookups - count)
                if inode.lookups == 0:
                    inode.released_key = None  # its page cache went too

    @_errors
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._inode(inode))

    @_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        now = time.time_ns()
        changes: dict[str, Any] = {}
        if fields.update_size:
            if node.kind == Kind.DIR:
                raise _fail(errno.EISDIR)
            if node.kind != Kind.FILE:
                raise _fail(errno.EINVAL)
            content = await self._tree.content(node)
            await content.truncate(attr.st_size)
            changes["mtime_ns"] = now
        if fields.update_mode:
            changes["mode"] = attr.st_mode & 0o7777
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        changes["ctime_ns"] = attr.st_ctime_ns if fields.update_ctime else now
        node.record = node.record.evolve(**changes)
        if node.kind == Kind.FILE and node.opens > 0:
            # Committed with the file's content, at close: tar sets the
            # times and mode of every file it extracts before closing it,
            # and each commit seals and journals the whole node again.
            node.attrs_changed = True
        else:
            await self._tree.commit(node)
        return self._attrs(node)

    @_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode)
        if node.kind != Kind.SYMLINK:
            raise _fail(errno.EINVAL)
        return node.record.target

    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        await self.refresh_usage()
        assert self._statfs is not None
        _, quota, used = self._statfs
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = _STATFS_BLOCK
        s.f_blocks = quota // _STATFS_BLOCK
        s.f_bfree = s.f_bavail = max(0, quota - used) // _STATFS_BLOCK
        s.f_files = len(self._tree.inodes) + 1_000_000
        s.f_ffree = s.f_favail = 1_000_000
        s.f_namemax = 255
        return s

    async def refresh_usage(self) -> None:
        """The account's quota and use, asked at most every 10 s: for
        statfs (``df``), and so writes can check the quota without asking
        (the daemon's flusher calls this too)."""
        now = trio.current_time()
        if self._statfs is None or now - self._statfs[0] > 10:
            try:
                with trio.fail_after(3):
                    account = await self._remote.account()
                self._statfs = (now, account.quota, account.used)
                # What the server has not counted yet: sealed chunks waiting
                # to upload (writes not yet sealed are a few MiB at most).
                self._accepted = self._uploader.pending_bytes
            except (MegafsError, trio.TooSlowError):
                if self._statfs is None:
                    self._statfs = (now, 0, 0)

    def _check_room(self, growth: int) -> None:
        """ENOSPC for a write that would take the account past its quota,
        before any of it is accepted: what the mount accepts must fit on
        the server. Counts the account's use as last asked plus what waits
        to upload and what was accepted since; the server's refusal
        (``quota_full``) is the last word."""
        if growth <= 0:
            return
        if self._uploader.quota_full:
            raise _fail(errno.ENOSPC)
        if self._statfs is None or self._statfs[1] == 0:
            return  # not known yet (or offline): the server will say
        _, quota, used = self._statfs
        if used + self._accepted + growth > quota:
            raise _fail(errno.ENOSPC)
        self._accepted += growth

    # -- folders ----------------------------------------------------------------

    @_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._inode(inode)
        if node.kind != Kind.DIR:
            raise _fail(errno.ENOTDIR)
        children = await self._tree.children(node)
        # A copy in the folder's own order, not a sorted one: at 100 000
        # entries sorting held up every other request for a tenth of a second
        # per opendir, and no order is promised to readdir's callers.
        entries = list(children.items())
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = entries
        return fh

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # The listing is a snapshot taken at opendir, so an offset (a position
        # in it) stays valid however the folder changes meanwhile.
        entries = self._dir_handles[fh]
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode), index + 1):
                break
            inode.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    @_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        await self._absent(parent, name)
        inode = await self._tree.create(
            parent, name, Kind.DIR, mode & ~ctx.umask, ctx.uid, self._gid(parent, ctx)
        )
        return self._reply(inode)

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._inode(parent_inode)
        inode = await self._child(parent, name)
        if inode.kind != Kind.DIR:
            raise _fail(errno.ENOTDIR)
        if await self._tree.children(inode):
            raise _fail(errno.ENOTEMPTY)
        await self._remove(parent, name, inode)

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._inode(parent_inode)
        inode = await self._child(parent, name)
        if inode.kind == Kind.DIR:
            raise _fail(errno.EISDIR)
        await self._remove(parent, name, inode)

    async def _remove(self, parent: Inode, name: bytes, inode: Inode) -> None:
        await self._tree.remove_name(parent, name)

    @_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE) or flags == (
            pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE
        ):
            raise _fail(errno.EINVAL)
        old_parent = self._inode(parent_inode_old)
        new_parent = self._inode(parent_inode_new)
        inode = await self._child(old_parent, name_old)
        if new_parent.kind != Kind.DIR:
            raise _fail(errno.ENOTDIR)
        if len(name_new) > 255:
            raise _fail(errno.ENAMETOOLONG)
        _refuse_into_own_subtree(inode, new_parent)
        new_children = await self._tree.children(new_parent)
        target = new_children.get(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if target is None:
                raise _fail(errno.ENOENT)
            _refuse_into_own_subtree(target, old_parent)
            await self._exchange(old_parent, name_old, inode, new_parent, name_new, target)
            return
        if target is inode:
            return  # two names of one node: nothing to do
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            if target.kind == Kind.DIR:
                if inode.kind != Kind.DIR:
                    raise _fail(errno.EISDIR)
                if await self._tree.children(target):
                    raise _fail(errno.ENOTEMPTY)
            elif inode.kind == Kind.DIR:
                raise _fail(errno.ENOTDIR)
            await self._tree.remove_name(new_parent, name_new)
        await self._tree.move(old_parent, name_old, new_parent, name_new)

    async def _exchange(
        self, parent_a: Inode, name_a: bytes, a: Inode, parent_b: Inode, name_b: bytes, b: Inode
    ) -> None:
        if a is b:
            return
        # Through a free temporary name, so each step is a plain move.
        spare = b".megafs-exchange-" + a.id.hex().encode()
        await self._tree.move(parent_a, name_a, parent_a, spare)
        await self._tree.move(parent_b, name_b, parent_a, name_a)
        await self._tree.move(parent_a, spare, parent_b, name_b)

    def _gid(self, parent: Inode, ctx: pyfuse3.RequestContext) -> int:
        # BSD/setgid-directory semantics, as ext4 does.
        return parent.record.gid if parent.record.mode & stat.S_ISGID else ctx.gid

    @_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        await self._absent(parent, name)
        if len(target) > 4095:
            raise _fail(errno.ENAMETOOLONG)
        inode = await self._tree.create(
            parent, name, Kind.SYMLINK, 0o777, ctx.uid, self._gid(parent, ctx), target=target
        )
        return self._reply(inode)

    @_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        kinds = {
            stat.S_IFREG: Kind.FILE,
            stat.S_IFIFO: Kind.FIFO,
            stat.S_IFSOCK: Kind.SOCKET,
            stat.S_IFCHR: Kind.CHARDEV,
            stat.S_IFBLK: Kind.BLOCKDEV,
        }
        kind = kinds.get(stat.S_IFMT(mode))
        if kind is None:
            raise _fail(errno.EINVAL)
        parent = self._inode(parent_inode)
        await self._absent(parent, name)
        inode = await self._tree.create(
            parent, name, kind, mode & ~ctx.umask, ctx.uid, self._gid(parent, ctx), rdev=rdev
        )
        return self._reply(inode)

    @_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        parent = self._inode(new_parent_inode)
        if node.kind in (Kind.DIR, Kind.LINKS):
            raise _fail(errno.EPERM)
        if node.unlinked:
            raise _fail(errno.ENOENT)
        await self._absent(parent, new_name)
        if node.record.nlink >= _LINK_MAX:
            raise _fail(errno.EMLINK)
        await self._tree.link(node, parent, new_name)
        return self._reply(node)

    # -- extended attributes ---------------------------------------------------

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if not name.startswith(_XATTR_NAMESPACES):
            # system.posix_acl_* included: refused cleanly, so cp -a and
            # rsync -X carry on without ACLs.
            raise _fail(errno.EOPNOTSUPP)
        if len(name) > 255:
            raise _fail(errno.ERANGE)

    @_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self._check_xattr_name(name)
        if len(value) > _XATTR_VALUE_MAX:
            raise _fail(errno.E2BIG)
        node = self._inode(inode)
        xattrs = dict(node.record.xattrs)
        xattrs[name] = value
        if sum(len(k) + len(v) for k, v in xattrs.items()) > _XATTR_TOTAL_MAX:
            raise _fail(errno.ENOSPC)
        node.record = node.record.evolve(xattrs=xattrs, ctime_ns=time.time_ns())
        await self._tree.commit(node)

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._check_xattr_name(name)
        try:
            return self._inode(inode).record.xattrs[name]
        except KeyError:
            raise _fail(errno.EOPNOTSUPP if name == _SELINUX_LABEL else pyfuse3.ENOATTR) from None

    @_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._inode(inode).record.xattrs)

    @_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_xattr_name(name)
        node = self._inode(inode)
        if name not in node.record.xattrs:
            raise _fail(pyfuse3.ENOATTR)
        xattrs = {k: v for k, v in node.record.xattrs.items() if k != name}
        node.record = node.record.evolve(xattrs=xattrs, ctime_ns=time.time_ns())
        await self._tree.commit(node)

    # -- files ------------------------------------------------------------------

    def _open_handle(self, inode: Inode, flags: int) -> pyfuse3.FileInfo:
        """Count the open and make its handle.

        ``keep_cache`` (the kernel keeps the file's page cache) when the
        file is open already (the cache is shared with that handle) or when
        its content key is the one it had at its last release: unchanged
        since then. Changes this mount made before that release went through
        the kernel, which updated its cache as they passed; a change from
        another device (a new content key) did not, so the cache is dropped.
        The first open after a mount, or after the kernel forgot the inode
        (and its cache with it), has nothing to keep.
        """
        fh = self._next_fh
        self._next_fh += 1
        reader = self.read_ahead.reader(
            functools.partial(self._folder_ahead.read_start, inode),
            functools.partial(self._folder_ahead.read_whole, inode),
        )
        self._handles[fh] = _Handle(inode, flags, reader)
        keep = inode.opens > 0 or inode.released_key == inode.record.key
        inode.released_key = None
        inode.opens += 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    def _close_handle(self, fh: int) -> _Handle | None:
        """Forget a handle: stop its read-ahead and uncount its open."""
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.reader.close()
            handle.inode.opens -= 1
        return handle

    @_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._inode(parent_inode)
        await self._absent(parent, name)
        # Journaled on close (flush), once with its content: one local
        # transaction per new file instead of two.
        inode = await self._tree.create(
            parent,
            name,
            Kind.FILE,
            mode & ~ctx.umask,
            ctx.uid,
            self._gid(parent, ctx),
            journal=False,
        )
        return self._open_handle(inode, flags), self._reply(inode)

    @_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        if node.kind != Kind.FILE:
            raise _fail(errno.EISDIR if node.kind == Kind.DIR else errno.EINVAL)
        content = await self._tree.content(node)
        info = self._open_handle(node, flags)
        if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            # Only once the open counts: truncating awaits the file's lock,
            # and a release of the last other handle meanwhile would drop an
            # uncounted content, and the truncation with it.
            truncated = False
            try:
                await content.truncate(0)
                truncated = True
            finally:
                if not truncated:
                    self._close_handle(info.fh)
            now = time.time_ns()
            node.record = node.record.evolve(mtime_ns=now, ctime_ns=now)
        return info

    def _handle(self, fh: int) -> _Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise _fail(errno.EBADF) from None

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        # A view of cached plaintext is answered without a copy: pyfuse3
        # replies from any contiguous buffer.
        handle = self._handle(fh)
        return await handle.reader.read(await self._tree.content(handle.inode), off, size)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        inode = handle.inode
        content = await self._tree.content(inode)
        if handle.flags & os.O_APPEND:
            off = content.size
        self._check_room(off + len(buf) - content.size)
        written = await content.write(off, buf)
        now = time.time_ns()
        inode.record = inode.record.evolve(mtime_ns=now, ctime_ns=now)
        return written

    @_errors
    async def flush(self, fh: int) -> None:
        # close(2): the file's state goes to the journal and starts uploading.
        inode = self._handle(fh).inode
        if inode.unsaved:
            await self._tree.commit(inode)

    @_errors
    async def release(self, fh: int) -> None:
        handle = self._close_handle(fh)
        if handle is None:
            return
        inode = handle.inode
        content = inode.content
        if inode.unsaved:
            await self._tree.commit(inode)
        if inode.opens == 0 and inode.content is content is not None and not content.changed:
            # Saved and closed: the manifest is enough to open it again, so a
            # tree of many small files does not keep their bytes in memory.
            inode.content = None
        if inode.opens == 0:
            inode.released_key = inode.record.key

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Returns once the file's data and metadata are on the server.

        If the server stays unreachable for ``fsync_timeout`` seconds the
        answer is EIO; the change stays in the journal and uploads later.
        """
        inode = self._handle(fh).inode
        seq = await self._tree.commit(inode, durable=True)
        await self.wait_committed(inode, seq)

    async def wait_committed(self, inode: Inode, seq: int) -> None:
        while True:
            with trio.move_on_after(1):
                await self._uploader.wait_committed(inode.id, seq)
                return
            if self._uploader.quota_full:
                raise _fail(errno.ENOSPC)  # kept in the journal until room is made
            if self._uploader.failing_for > self._fsync_timeout:
                log.error("fsync: server unreachable for %.0f s", self._uploader.failing_for)
                raise _fail(errno.EIO)

    async def flush_all(self) -> None:
        """Commit every file with unsaved changes (periodically, and before
        unmount finishes)."""
        for inode in list(self._tree.inodes.values()):
            if inode.unsaved:
                try:
                    await self._tree.commit(inode)
                except MegafsError as exc:
                    log.error("inode %d: could not save: %s", inode.ino, exc.detail)
                # A small file's commit may not yield (its locks are taken
                # at once when free): many open files must not hold the
                # event loop for all of their commits.
                await trio.lowlevel.checkpoint()
