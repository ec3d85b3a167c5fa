#!/usr/bin/env python3
"""A minimal plaintext pyfuse3 passthrough filesystem: the ceiling for megafs.

    .venv/bin/python scripts/bench_passthrough.py BACKING_DIR MOUNTPOINT

Every request is forwarded to BACKING_DIR with the matching syscall, run
directly on the trio thread (no worker threads, no encryption, no network):
this is as fast as a Python filesystem on pyfuse3 can be, and what
``scripts/bench`` compares megafs's per-request overhead against. It gives
the kernel the same caching megafs does (60 s attribute and entry timeouts,
``keep_cache`` on open, no writeback cache), so the difference between the
two is handler cost, not cache policy.

It implements just what the benchmark's workloads need: lookup, getattr,
setattr, readdir(plus), open, create, read, write, flush, release, fsync,
mkdir, unlink, rmdir, rename, symlink, readlink and statfs. Hard links,
extended attributes and mknod are refused. It assumes BACKING_DIR holds
one filesystem (inode numbers of the backing files are reused as FUSE
inode numbers) and that nothing else changes it while mounted.

Runs in the foreground until unmounted (``fusermount3 -u MOUNTPOINT``) or
sent SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio

#: Same kernel cache lifetimes as megafs (megafs.fs.operations.CACHE_TIMEOUT).
TIMEOUT = 60.0
#: O_DIRECT is the kernel's business (it then sends every read to us); on the
#: backing file it would demand aligned buffers, which os.pread cannot give.
_FLAGS_DROPPED = os.O_CREAT | os.O_DIRECT


def _oserrors(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn OSError into the matching FUSE error reply."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    return wrapper


class Passthrough(pyfuse3.Operations):
    def __init__(self, backing: str) -> None:
        super().__init__()
        root = os.path.realpath(backing)
        self._root_ino = os.lstat(root).st_ino
        #: FUSE inode -> path in the backing directory.
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: root}
        #: FUSE inode -> references the kernel holds (lookup count).
        self._refs: dict[int, int] = {}
        #: directory handle -> (path, snapshot of its entries taken at opendir).
        self._dirs: dict[int, tuple[str, list[tuple[bytes, os.stat_result]]]] = {}
        self._next_dir = 1

    # -- inode bookkeeping --------------------------------------------------

    def _ino(self, st: os.stat_result) -> int:
        return pyfuse3.ROOT_INODE if st.st_ino == self._root_ino else st.st_ino

    def _path(self, ino: int) -> str:
        try:
            return self._paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _attrs(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(st)
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _remember(self, path: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that gives the kernel a new reference."""
        ino = self._ino(st)
        self._paths[ino] = path
        self._refs[ino] = self._refs.get(ino, 0) + 1
        return self._attrs(st)

    # -- attributes -----------------------------------------------------------

    @_oserrors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            path = self._path(parent_inode)
        elif name == b"..":
            path = os.path.dirname(self._path(parent_inode))
        else:
            path = self._child(parent_inode, name)
        return self._remember(path, os.lstat(path))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            left = self._refs.get(ino, 0) - count
            if left > 0:
                self._refs[ino] = left
            else:
                self._refs.pop(ino, None)
                if ino != pyfuse3.ROOT_INODE:
                    self._paths.pop(ino, None)

    @_oserrors
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(os.lstat(self._path(inode)))

    @_oserrors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.lchown(
                path,
                attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1,
            )
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(
                path,
                ns=(
                    attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                    attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
                ),
                follow_symlinks=False,
            )
        return self._attrs(os.lstat(path))

    @_oserrors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self._paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for field in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, field, getattr(sv, field))
        return out

    # -- folders --------------------------------------------------------------

    @_oserrors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        entries = []
        with os.scandir(path) as it:
            for entry in it:
                entries.append((os.fsencode(entry.name), entry.stat(follow_symlinks=False)))
        entries.sort()
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = (path, entries)
        return fh

    @_oserrors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Served from the snapshot taken at opendir: position i+1 stays valid.
        path, entries = self._dirs[fh]
        for i in range(start_id, len(entries)):
            name, st = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(st), i + 1):
                break
            # readdirplus: every entry returned is a lookup reference.
            ino = self._ino(st)
            self._refs[ino] = self._refs.get(ino, 0) + 1
            self._paths[ino] = os.path.join(path, os.fsdecode(name))

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_oserrors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mkdir(path, mode & ~ctx.umask)
        self._chown(path, ctx)
        return self._remember(path, os.lstat(path))

    @_oserrors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.rmdir(self._child(parent_inode, name))

    @_oserrors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.unlink(self._child(parent_inode, name))

    @_oserrors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        if flags & pyfuse3.RENAME_NOREPLACE and os.path.lexists(new):
            raise pyfuse3.FUSEError(errno.EEXIST)
        st = os.lstat(old)
        os.rename(old, new)
        ino = self._ino(st)
        if ino in self._paths:
            self._paths[ino] = new
        if stat.S_ISDIR(st.st_mode):
            prefix = old + os.sep
            for other, path in list(self._paths.items()):
                if path.startswith(prefix):
                    self._paths[other] = new + path[len(old) :]

    @_oserrors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.symlink(target, path)
        self._chown(path, ctx)
        return self._remember(path, os.lstat(path))

    @_oserrors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)  # as megafs: callers fall back

    # -- files ----------------------------------------------------------------

    @staticmethod
    def _chown(path: str, ctx: pyfuse3.RequestContext) -> None:
        if os.geteuid() == 0 and (ctx.uid, ctx.gid) != (0, 0):
            os.lchown(path, ctx.uid, ctx.gid)

    @_oserrors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd = os.open(path, (flags & ~os.O_DIRECT) | os.O_CREAT, mode & ~ctx.umask)
        self._chown(path, ctx)
        return (
            pyfuse3.FileInfo(fh=fd, keep_cache=True),
            self._remember(path, os.fstat(fd)),
        )

    @_oserrors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = os.open(self._path(inode), flags & ~_FLAGS_DROPPED)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_oserrors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @_oserrors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        return None

    @_oserrors
    async def release(self, fh: int) -> None:
        os.close(fh)

    @_oserrors
    async def fsync(self, fh: int, datasync: bool) -> None:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing", help="directory whose content is served")
    parser.add_argument("mountpoint")
    args = parser.parse_args()

    ops = Passthrough(args.backing)
    options = set(pyfuse3.default_options)
    options |= {"fsname=bench-passthrough", "subtype=passthrough"}
    pyfuse3.init(ops, args.mountpoint, options)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()

            nursery.start_soon(on_signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
