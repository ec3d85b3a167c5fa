"""The mount daemon: owns every long-lived task of one mount.

``run_mount`` opens the local state, takes over any journal an earlier run
left, mounts, and runs in one nursery: the FUSE request loop, the uploader,
the read-ahead (cache/readahead.py), the sealing behind sequential writers
(cache/content.py), the change follower (fs/follow.py), the
periodic flusher, the return of freed memory to the system (fs/memory.py),
the one-off widening of the kernel's read-ahead (fs/kernel_readahead.py)
and the status socket (``megafs status``, see fs/status.py). Shutdown order
when the filesystem is unmounted (``fusermount3 -u``, ``megafs umount``,
SIGTERM or SIGINT):

1. the kernel stops sending requests and ``pyfuse3.main`` returns;
2. files with unsaved writes are committed to the journal;
3. the uploader drains the journal to the server (a second signal stops
   waiting: what is left stays in the journal for the next mount);
4. the remaining tasks are cancelled and the local state is closed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pyfuse3
import trio

from megafs.cache import ChunkCache, LocalState, ReadAhead, Sealer, Uploader
from megafs.crypto import AccountKeys
from megafs.errors import MegafsError
from megafs.fs.follow import ChangeFollower
from megafs.fs.kernel_readahead import widen_read_ahead
from megafs.fs.memory import trim_periodically
from megafs.fs.operations import Operations
from megafs.fs.status import StatusService
from megafs.fs.tree import Tree
from megafs.remote import RemoteClient

__all__ = ["MountError", "run_mount"]

log = logging.getLogger(__name__)

#: Files being written are committed at least this often, so a long
#: recording reaches the server while it runs.
FLUSH_INTERVAL = 5.0


class MountError(Exception):
    """The mount could not start; the message is for the user."""


async def run_mount(
    remote: RemoteClient,
    keys: AccountKeys,
    mountpoint: Path,
    cache_dir: Path,
    *,
    cache_size: int,
    relogin: Callable[[], Awaitable[None]] | None = None,
    fsync_timeout: float = 60.0,
    allow_other: bool = True,
    on_ready: Callable[[], None] | None = None,
    server_url: str = "",
    email: str = "",
) -> None:
    """Mount the drive at ``mountpoint`` and serve it until unmounted.

    With ``allow_other`` (when FUSE permits it: root, or ``user_allow_other``
    in /etc/fuse.conf) every local user may use the mount and the kernel
    checks permission bits as on ext4 (``default_permissions``); without it
    only the mounting user may enter it.
    """
    # A peer that hangs up (the server, a `megafs status` client) must be an
    # EPIPE for that connection, not a silent death of the daemon: the CLI
    # sets SIGPIPE to its default for `megafs ... | head`, and a forked
    # daemon inherits that.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    lock = _lock_cache_dir(cache_dir)
    try:
        async with AsyncExitStack() as stack:
            state = await LocalState.open(cache_dir / "state.sqlite3")
            stack.push_async_callback(state.aclose)

            def uploads_failing() -> bool:
                # (Called only once the mount serves writes: ``uploader`` is set.)
                return uploader.failing_for > 0

            chunks = ChunkCache(
                state,
                remote,
                keys,
                limit_bytes=cache_size,
                uploads_failing=uploads_failing,
            )
            await chunks.load()
            uploader = Uploader(remote, state, chunks, relogin=relogin)
            journal = await uploader.load()
            if journal:
                log.info("%d changes from an earlier run wait in the journal", len(journal))
            sealer = Sealer()
            tree = Tree(remote, uploader, chunks, keys, state, sealer=sealer)
            uploader.on_conflict = tree.resolve_conflict
            follower = ChangeFollower(remote, tree, state)
            # Before loading: a change made meanwhile is then in the feed.
            with trio.move_on_after(10), contextlib.suppress(MegafsError):
                await follower.catch_up()
            await tree.load_root()
            ops = Operations(
                tree, uploader, remote, read_ahead=ReadAhead(chunks), fsync_timeout=fsync_timeout
            )
            status = StatusService(
                mountpoint,
                uploader,
                chunks,
                cache_limit=cache_size,
                server_url=server_url,
                email=email,
            )
            await _serve(
                ops,
                state,
                chunks,
                sealer,
                uploader,
                follower,
                status,
                mountpoint,
                on_ready,
                allow_other=allow_other and other_users_permitted(),
            )
    finally:
        os.close(lock)


async def _serve(
    ops: Operations,
    state: LocalState,
    chunks: ChunkCache,
    sealer: Sealer,
    uploader: Uploader,
    follower: ChangeFollower,
    status: StatusService,
    mountpoint: Path,
    on_ready: Callable[[], None] | None,
    *,
    allow_other: bool,
) -> None:
    options = set(pyfuse3.default_options)
    options |= {"fsname=megafs", "subtype=megafs"}
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, str(mountpoint), options)
    except RuntimeError as exc:
        raise MountError(f"cannot mount on {mountpoint}: {exc}") from exc
    mounted = True
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            await nursery.start(chunks.run)  # room on the cache's disk
            await nursery.start(ops.read_ahead.run)
            await nursery.start(sealer.run)  # kept until flush_all below
            await nursery.start(status.run)  # `megafs status`
            await nursery.start(follower.run)  # other devices' changes
            nursery.start_soon(_flusher, ops)
            nursery.start_soon(trim_periodically)
            nursery.start_soon(state.warm_up)
            nursery.start_soon(widen_read_ahead, mountpoint)
            signals = _Signals()
            nursery.start_soon(signals.run)
            log.info("mounted on %s", mountpoint)
            if on_ready is not None:
                on_ready()
            await pyfuse3.main()
            pyfuse3.close(unmount=True)
            mounted = False
            status.unmounting = True
            log.info("unmounted; saving pending changes")
            await ops.flush_all()
            with trio.CancelScope() as drain:
                signals.on_signal = drain.cancel
                # A refused session cannot come back in this daemon: waiting
                # would only hold the cache directory from the next mount.
                await uploader.wait_idle(unless_session_ended=True)
            stats = uploader.statistics()
            if drain.cancelled_caught or stats.pending_nodes or stats.pending_chunks:
                log.warning(
                    "stopped with %d changes and %d chunks still in the journal; "
                    "they upload on the next mount%s",
                    stats.pending_nodes,
                    stats.pending_chunks,
                    " (log in again first)" if uploader.session_ended else "",
                )
            else:
                log.info("all changes are on the server")
            nursery.cancel_scope.cancel()
    finally:
        if mounted:
            pyfuse3.close(unmount=True)


class _Signals:
    """SIGTERM/SIGINT: the first one unmounts, a later one stops waiting for
    uploads."""

    def __init__(self) -> None:
        self.on_signal: Callable[[], None] = pyfuse3.terminate

    async def run(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received signal %d", signum)
                self.on_signal()


async def _flusher(ops: Operations) -> None:
    while True:
        await trio.sleep(FLUSH_INTERVAL)
        await ops.refresh_usage()
        try:
            await ops.flush_all()
        except MegafsError as exc:  # pragma: no cover - flush_all logs per file
            log.error("periodic flush: %s", exc.detail)


def other_users_permitted() -> bool:
    """Whether FUSE lets this process mount with ``allow_other``."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def _lock_cache_dir(cache_dir: Path) -> int:
    """One daemon per cache directory: a second mount would corrupt it."""
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise MountError(f"cache directory {cache_dir} is in use by another mount") from None
        raise
    return fd
