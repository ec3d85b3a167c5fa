"""Running real Unix tools against a mount, and comparing trees the way
those tools promise to keep them.

Tools are called by absolute path. A missing tool is a test failure naming
the Debian package that provides it (CI installs them), never a skip.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = [
    "Entry",
    "RssSampler",
    "compare_trees",
    "daemon_pid",
    "du_bytes",
    "fill_disk",
    "need",
    "run",
    "small_disk",
    "snapshot",
    "vm_rss",
    "wait_for",
]

#: tool name -> Debian package that ships it (for the failure message).
PACKAGES = {
    "git": "git",
    "rsync": "rsync",
    "sqlite3": "sqlite3",
    "gio": "libglib2.0-bin",
    "setfattr": "attr",
    "getfattr": "attr",
    "setfacl": "acl",
    "getfacl": "acl",
    "tar": "tar",
    "diff": "diffutils",
    "cp": "coreutils",
    "truncate": "coreutils",
    "du": "coreutils",
    "fallocate": "util-linux",
    "vim": "vim",
    "strace": "strace",
    "mount": "mount",
    "umount": "mount",
}


@contextmanager
def small_disk(directory: Path, size: str) -> Iterator[Path]:
    """``directory`` (made if missing) as a disk of ``size`` bytes of its own
    ("16m"): a tmpfs, which the tests, run as root, may mount."""
    directory.mkdir(parents=True, exist_ok=True)
    mount = [need("mount"), "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]
    subprocess.run(mount, check=True)
    try:
        yield directory
    finally:
        subprocess.run([need("umount"), "-l", str(directory)], check=False)


def fill_disk(path: Path) -> Path:
    """Write ``path`` until its disk is full (ENOSPC, checked), as another
    program would; returns ``path``, to unlink when room is wanted again."""
    with open(path, "wb", buffering=0) as f, pytest.raises(OSError) as full:
        while True:
            f.write(bytes(64 << 10))
    assert full.value.errno == errno.ENOSPC, full.value
    return path


def wait_for(
    what: str, condition: Callable[[], bool], timeout: float = 60, interval: float = 0.05
) -> None:
    """Poll ``condition()`` until true: a generous deadline, not a timing
    claim; fails naming ``what``."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(interval)


def need(tool: str) -> str:
    """The absolute path of ``tool``, or a failure naming its package."""
    package = PACKAGES.get(tool, tool)
    for d in ("/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"):
        path = os.path.join(d, tool)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(tool)
    if found:
        return found
    pytest.fail(f"`{tool}` is not installed: install the Debian package `{package}`", pytrace=False)


def run(
    args: Sequence[str | os.PathLike[str] | bytes],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; on an unexpected exit code, fail with its whole output."""
    proc = subprocess.run(
        list(args),
        cwd=cwd,
        env=dict(env) if env is not None else None,
        capture_output=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(describe(proc))
    return proc


def describe(proc: subprocess.CompletedProcess[bytes]) -> str:
    def show(b: bytes) -> str:
        text = b.decode(errors="replace")
        return text if len(text) < 6000 else text[:3000] + "\n[...]\n" + text[-3000:]

    cmd = " ".join(os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in proc.args)
    return (
        f"`{cmd}` exited {proc.returncode}\n--- stdout\n{show(proc.stdout)}"
        f"\n--- stderr\n{show(proc.stderr)}"
    )


# -- the daemon -------------------------------------------------------------------


def daemon_pid(config_dir: Path) -> int:
    """The pid of the (single) mount daemon of a config dir."""
    files = sorted((config_dir / "mounts").glob("*.json"))
    assert len(files) == 1, f"expected one mount in {config_dir / 'mounts'}: {files}"
    return int(json.loads(files[0].read_text())["pid"])


def vm_rss(pid: int) -> int | None:
    """Resident set size in bytes, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread
    until stopped or the process exits."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = vm_rss(self.pid)
            if rss is None:
                return
            self.samples.append((time.monotonic() - self._t0, rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def values(self) -> list[int]:
        return [v for _, v in self.samples]


def du_bytes(path: Path) -> int:
    """``du -sb``: apparent size of everything under ``path``."""
    if not path.exists():
        return 0
    out = run([need("du"), "-sb", str(path)]).stdout
    return int(out.split()[0])


# -- trees --------------------------------------------------------------------------


@dataclass
class Entry:
    """What tools promise to carry over for one name."""

    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    sha256: str = ""
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    ino: int = 0
    nlink: int = 1


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "dir"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "chardev"),
        (stat.S_ISBLK, "blockdev"),
    ):
        if test(mode):
            return name
    return "?"


def _sha256_file(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def xattrs_of(path: bytes | str, prefix: bytes = b"user.") -> dict[bytes, bytes]:
    """The ``prefix`` extended attributes of a name (symlinks not followed)."""
    p = os.fsencode(path)
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        return {}
    out: dict[bytes, bytes] = {}
    for name in names:
        bname = os.fsencode(name)
        if bname.startswith(prefix):
            out[bname] = os.getxattr(p, name, follow_symlinks=False)
    return out


def snapshot(
    root: str | os.PathLike[str] | bytes, *, skip: Iterable[bytes] = ()
) -> dict[bytes, Entry]:
    """Every name under ``root`` (root itself as ``b"."``), by relative path
    in bytes, so names that are not UTF-8 survive."""
    base = os.fsencode(root)
    skipped = set(skip)
    out: dict[bytes, Entry] = {}

    def add(rel: bytes, full: bytes) -> None:
        st = os.lstat(full)
        e = Entry(
            kind=_kind(st.st_mode),
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            ino=st.st_ino,
            nlink=st.st_nlink,
        )
        if e.kind == "file":
            e.size = st.st_size
            e.sha256 = _sha256_file(full)
        elif e.kind == "symlink":
            e.target = os.readlink(full)
        if e.kind != "symlink":  # user.* xattrs are not allowed on symlinks
            e.xattrs = xattrs_of(full)
        out[rel] = e

    add(b".", base)
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(base, rel_dir) if rel_dir else base
        for de in os.scandir(full_dir):
            rel = os.path.join(rel_dir, de.name) if rel_dir else de.name
            if rel in skipped:
                continue
            add(rel, de.path)
            if de.is_dir(follow_symlinks=False):
                stack.append(rel)
    return out


def link_groups(tree: Mapping[bytes, Entry]) -> set[frozenset[bytes]]:
    """Names of regular files grouped by inode, groups of two or more."""
    by_ino: dict[int, set[bytes]] = {}
    for rel, e in tree.items():
        if e.kind == "file":
            by_ino.setdefault(e.ino, set()).add(rel)
    return {frozenset(g) for g in by_ino.values() if len(g) > 1}


def compare_trees(
    expected: Mapping[bytes, Entry],
    actual: Mapping[bytes, Entry],
    *,
    mtime: bool = True,
    owner: bool = True,
    xattrs: bool = True,
    root_attrs: bool = True,
    symlink_mtime: bool = True,
    hard_links: bool = True,
) -> list[str]:
    """Every difference between two snapshots, as readable lines."""
    problems: list[str] = []
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing:
        problems.append(f"missing from the copy: {missing}")
    if extra:
        problems.append(f"not in the original: {extra}")
    for rel in sorted(set(expected) & set(actual)):
        if rel == b"." and not root_attrs:
            continue
        e, a = expected[rel], actual[rel]
        what = repr(rel)
        if e.kind != a.kind:
            problems.append(f"{what}: is a {a.kind}, expected a {e.kind}")
            continue
        if e.kind != "symlink" and e.mode != a.mode:
            problems.append(f"{what}: mode {a.mode:o}, expected {e.mode:o}")
        if owner and (e.uid, e.gid) != (a.uid, a.gid):
            problems.append(f"{what}: owner {a.uid}:{a.gid}, expected {e.uid}:{e.gid}")
        if mtime and (e.kind != "symlink" or symlink_mtime) and e.mtime_ns != a.mtime_ns:
            problems.append(f"{what}: mtime_ns {a.mtime_ns}, expected {e.mtime_ns}")
        if e.kind == "file" and (e.size, e.sha256) != (a.size, a.sha256):
            problems.append(f"{what}: content differs (size {a.size}, expected {e.size})")
        if e.kind == "symlink" and e.target != a.target:
            problems.append(f"{what}: symlink to {a.target!r}, expected {e.target!r}")
        if xattrs and e.xattrs != a.xattrs:
            problems.append(f"{what}: xattrs {a.xattrs!r}, expected {e.xattrs!r}")
        if hard_links and e.kind == "file" and e.nlink != a.nlink:
            problems.append(f"{what}: st_nlink {a.nlink}, expected {e.nlink}")
    if hard_links:
        want, got = link_groups(expected), link_groups(actual)
        if want != got:
            problems.append(
                "hard links differ: names sharing an inode in the copy "
                f"{sorted(sorted(g) for g in got)}, expected {sorted(sorted(g) for g in want)}"
            )
    return problems
