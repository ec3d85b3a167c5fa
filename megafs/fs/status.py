"""The daemon's status socket: what ``megafs status`` shows.

Each mount daemon serves a Unix socket, registered per mountpoint as
``<status dir>/<digest of the mountpoint>.sock``, where the status dir is
``$XDG_RUNTIME_DIR/megafs`` (else ``/tmp/megafs-<uid>``), mode 0700. A
client connects and reads one JSON document (:meth:`StatusService.snapshot`,
keys documented in docs/cli.md), then the daemon closes the connection; the
client sends nothing.

Why a socket served by a task of the daemon's nursery, and not a status
file or a FUSE request: the answer is computed when asked, so it is never
stale; a daemon that is stopped, hung or killed does not answer, which is
exactly what a status command must be able to tell; and it works while the
daemon drains uploads after the kernel unmounted the filesystem (``megafs
umount`` waiting), when no FUSE request can reach it any more.

Only the mounting user (or root) gets an answer: the directory is private
and every peer's uid is checked (``SO_PEERCRED``). The answer holds no key,
name or content, only counters, the server URL and the account email.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import trio

from megafs.cache import ChunkCache, Uploader

__all__ = [
    "STATUS_FORMAT",
    "StatusService",
    "canonical_mountpoint",
    "status_dir",
    "status_socket_path",
]

log = logging.getLogger(__name__)

#: Version of the status document; grows only if a key changes meaning or
#: disappears (new keys may be added without it).
STATUS_FORMAT = 1
#: A client that does not read its answer within this time is dropped.
_SEND_TIMEOUT = 5.0
#: sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107


def status_dir() -> Path:
    """Where this user's mount daemons register their status sockets."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if base and os.path.isabs(base) and os.path.isdir(base):
        return Path(base) / "megafs"
    # No runtime dir (containers, cron, su): a private folder in /tmp, the
    # same for every process of the user whatever its TMPDIR.
    return Path(f"/tmp/megafs-{os.getuid()}")


def canonical_mountpoint(mountpoint: Path) -> Path:
    """The mountpoint as /proc/self/mountinfo shows it: absolute, with its
    parent's symlinks resolved. The mountpoint itself is not looked at (a
    dead FUSE mount answers ENOTCONN), so this works for a hung mount too."""
    path = Path(os.path.abspath(mountpoint))
    if path.parent == path:
        return path
    return Path(os.path.realpath(path.parent)) / path.name


def status_socket_path(mountpoint: Path) -> Path:
    """The status socket of the daemon serving ``mountpoint``."""
    digest = hashlib.sha256(os.fsencode(canonical_mountpoint(mountpoint))).hexdigest()[:32]
    return status_dir() / f"{digest}.sock"


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) or check that it is ours and private:
    another user must not be able to plant or replace a socket in it.

    Raises OSError with a message naming the problem.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"{path} is not a folder")
    if st.st_uid != os.getuid():
        raise OSError(errno.EPERM, f"{path} belongs to another user")
    if st.st_mode & 0o077:
        raise OSError(errno.EPERM, f"{path} is open to other users (mode {st.st_mode & 0o777:o})")


class StatusService:
    """Answers status requests for one mount.

    ``unmounting`` is set by the daemon once the kernel has unmounted the
    filesystem and the daemon only drains uploads.
    """

    def __init__(
        self,
        mountpoint: Path,
        uploader: Uploader,
        chunks: ChunkCache,
        *,
        cache_limit: int,
        server_url: str,
        email: str,
    ) -> None:
        self.mountpoint = canonical_mountpoint(mountpoint)
        self.unmounting = False
        self._uploader = uploader
        self._chunks = chunks
        self._cache_limit = cache_limit
        self._server_url = server_url
        self._email = email

    def snapshot(self) -> dict[str, Any]:
        """The status document (keys documented in docs/cli.md, § status)."""
        up = self._uploader.statistics()
        cache = self._chunks.statistics()
        return {
            "format": STATUS_FORMAT,
            "mountpoint": os.fsdecode(self.mountpoint),
            "pid": os.getpid(),
            "state": "unmounting" if self.unmounting else "mounted",
            "server": self._server_url,
            "email": self._email,
            "online": up.online,
            "offline_seconds": round(self._uploader.failing_for, 1),
            "pending_files": up.pending_nodes,
            "pending_chunks": up.pending_chunks,
            "pending_bytes": up.pending_bytes,
            "cache_used_bytes": cache["disk_bytes"],
            "cache_limit_bytes": self._cache_limit,
            "last_error": up.last_error or None,
            "conflicts": list(up.conflicts),
            "committed": up.committed,
            "uploaded_chunks": up.uploaded_chunks,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the socket until cancelled.

        Error handling: a socket that cannot be set up is logged and the
        task ends (``started`` is still reported): the mount works without
        its status, and ``megafs status`` then says the daemon does not
        answer. A failing request is logged and never ends the task.
        """
        path = status_socket_path(self.mountpoint)
        try:
            sock, bound = await self._bind(path)
        except OSError as exc:
            log.error("status socket %s unavailable: %s", path, exc.strerror or exc)
            task_status.started()
            return
        try:
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # EMFILE and friends: wait, then go on
                        log.error("status socket: accept failed: %s", exc)
                        await trio.sleep(0.5)
                        continue
                    nursery.start_soon(self._answer, stream)
        finally:
            sock.close()
            _unlink_if_ours(path, bound)

    async def _bind(self, path: Path) -> tuple[trio.socket.SocketType, os.stat_result]:
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"socket path too long: {path}")

        def prepare() -> None:
            ensure_private_dir(path.parent)
            # Left by a daemon that was killed: only one daemon can serve a
            # mountpoint, so whatever is there is stale.
            path.unlink(missing_ok=True)

        await trio.to_thread.run_sync(prepare)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(os.fsencode(path))
            bound = await trio.to_thread.run_sync(os.stat, path)
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        return sock, bound

    async def _answer(self, stream: trio.SocketStream) -> None:
        try:
            if not _peer_allowed(stream.socket):
                return
            data = (json.dumps(self.snapshot()) + "\n").encode()
            with trio.move_on_after(_SEND_TIMEOUT):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; nothing to tell anyone
        except Exception:
            # A status request must never take the mount down.
            log.exception("status request failed")
        finally:
            await stream.aclose()


def _peer_allowed(sock: trio.socket.SocketType) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


def _unlink_if_ours(path: Path, bound: os.stat_result) -> None:
    """Remove the socket unless a newer daemon has replaced it meanwhile."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino):
            path.unlink()
    except OSError:
        pass
