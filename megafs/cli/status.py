"""``megafs status``: ask mount daemons how they are doing.

The client side of the status socket (megafs/fs/status.py): connect, read
one JSON document, done. Which mounts exist is taken from two places,
because each alone misses a case: the kernel's mount table
(/proc/self/mountinfo) knows a mount whose daemon was killed, which has no
one left to answer; the status sockets know a daemon that is still
uploading after the kernel unmounted its filesystem.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from megafs.cli.config import Paths
from megafs.cli.main import EXIT_MOUNTPOINT, EXIT_NO_ANSWER, EXIT_OK, CliError
from megafs.fs import canonical_mountpoint, status_dir, status_socket_path

__all__ = ["NoAnswer", "cmd_status", "query_status"]

_FUSE_TYPE = "fuse.megafs"
#: A document larger than this is not a status answer.
_MAX_ANSWER = 1 << 20


class NoAnswer(Exception):
    """The daemon did not answer; the message says how (for the user)."""


def query_status(path: Path, *, timeout: float) -> dict[str, Any]:
    """The status document of the daemon listening on ``path``.

    Raises NoAnswer if nobody listens there, or nothing (or something that
    is not a status document) arrives within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fsencode(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoAnswer("its daemon is not running (killed or crashed?)") from None
        except TimeoutError:
            raise NoAnswer(f"its daemon does not answer within {timeout:g} s") from None
        except OSError as exc:
            raise NoAnswer(f"cannot reach its daemon: {exc.strerror or exc}") from None
        received = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAnswer(f"its daemon does not answer within {timeout:g} s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise NoAnswer(f"its daemon does not answer within {timeout:g} s") from None
            except OSError as exc:
                raise NoAnswer(f"its daemon hung up: {exc.strerror or exc}") from None
            if not data:
                break
            received += data
            if len(received) > _MAX_ANSWER:
                raise NoAnswer("its daemon sent something that is not a status")
    try:
        doc = json.loads(received)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or "mountpoint" not in doc:
        raise NoAnswer("its daemon hung up without an answer")
    return doc


def _mount_table() -> dict[Path, tuple[str, str]]:
    """Mountpoint -> (filesystem type, super options) of every mount this
    process sees; the last mount on a path wins, as in the kernel."""
    table: dict[Path, tuple[str, str]] = {}
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return table
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index(b"-")
            target = _unescape(fields[4])
            fstype, options = fields[sep + 1].decode(), fields[sep + 3].decode()
        except (ValueError, IndexError):
            continue
        table[Path(os.fsdecode(target))] = (fstype, options)
    return table


def _unescape(field: bytes) -> bytes:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def _ours(options: str) -> bool:
    """A FUSE mount made by this user (``user_id=`` in its options)."""
    for option in options.split(","):
        key, _, value = option.partition("=")
        if key == "user_id":
            return value == str(os.getuid())
    return False


def _size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _describe(doc: dict[str, Any]) -> str:
    """The human form of one status document."""
    if "error" in doc:
        return f"{doc['mountpoint']}: {doc['error']}"
    offline = doc.get("offline_seconds", 0)
    link = "online" if doc.get("online") else f"OFFLINE for {offline:.0f} s"
    state = "unmounted, finishing uploads" if doc.get("state") == "unmounting" else "mounted"
    files, size = doc.get("pending_files", 0), doc.get("pending_bytes", 0)
    if files or size:
        pending = f"{_plural(files, 'file')} ({_size(size)}) waiting for upload"
    else:
        pending = "nothing: every change is on the server"
    lines = [
        f"{doc['mountpoint']}: {state}, {link} (daemon pid {doc.get('pid')})",
        f"  account     {doc.get('email')} on {doc.get('server')}",
        f"  pending     {pending}",
        f"  cache       {_size(doc.get('cache_used_bytes', 0))} used of "
        f"{_size(doc.get('cache_limit_bytes', 0))}",
        f"  last error  {doc.get('last_error') or 'none'}",
    ]
    conflicts = doc.get("conflicts") or []
    if conflicts:
        lines.append(f"  conflicts   {len(conflicts)}:")
        lines.extend(f"    {c}" for c in conflicts)
    else:
        lines.append("  conflicts   none")
    return "\n".join(lines)


def _one(mountpoint: Path, timeout: float) -> dict[str, Any]:
    """The status of one mountpoint, or CliError with the documented code."""
    path = canonical_mountpoint(mountpoint)
    try:
        return query_status(status_socket_path(path), timeout=timeout)
    except NoAnswer as exc:
        fstype, _ = _mount_table().get(path, ("", ""))
        if fstype == _FUSE_TYPE:
            raise CliError(f"{path} is a megafs mount, but {exc}", EXIT_NO_ANSWER) from None
        if fstype:
            message = f"{path} is not a megafs mount (it is {fstype})"
            raise CliError(message, EXIT_MOUNTPOINT) from None
        if not os.path.lexists(path):
            raise CliError(f"{path} does not exist", EXIT_MOUNTPOINT) from None
        raise CliError(f"{path} is not mounted", EXIT_MOUNTPOINT) from None


def _all(timeout: float) -> tuple[list[dict[str, Any]], bool]:
    """Every megafs mount and draining daemon of this user; and whether
    every one of them answered."""
    found: dict[Path, dict[str, Any]] = {}
    asked: set[Path] = set()
    everyone = True
    for mountpoint, (fstype, options) in _mount_table().items():
        if fstype != _FUSE_TYPE or not _ours(options):
            continue
        path = status_socket_path(mountpoint)
        asked.add(path)
        try:
            found[mountpoint] = query_status(path, timeout=timeout)
        except NoAnswer as exc:
            everyone = False
            found[mountpoint] = {"mountpoint": os.fsdecode(mountpoint), "error": str(exc)}
    try:
        sockets = sorted(status_dir().glob("*.sock"))
    except OSError:
        sockets = []
    for path in sockets:
        if path in asked:
            continue
        try:
            doc = query_status(path, timeout=timeout)
        except NoAnswer:
            continue  # left by a killed daemon whose mount is gone
        found.setdefault(Path(doc["mountpoint"]), doc)
    return [found[m] for m in sorted(found)], everyone


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    """Print the status of one mount, or of every mount of this user."""
    if args.mountpoint is not None:
        doc = _one(Path(args.mountpoint), args.timeout)
        print(json.dumps(doc, indent=2) if args.json else _describe(doc))
        return EXIT_OK
    docs, everyone = _all(args.timeout)
    if args.json:
        print(json.dumps(docs, indent=2))
    elif not docs:
        print("no megafs mounts")
    else:
        print("\n\n".join(_describe(d) for d in docs))
    if not everyone:
        silent = sum(1 for d in docs if "error" in d)
        print(
            f"megafs: {_plural(silent, 'mount')} did not answer (see above)",
            file=sys.stderr,
        )
        return EXIT_NO_ANSWER
    return EXIT_OK
