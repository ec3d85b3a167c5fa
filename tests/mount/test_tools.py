"""A test per tool: real programs people run on a drive (git, rsync, tar,
sqlite, editors, cp, truncate/fallocate, gio, a recorder), each doing its
real job inside a megafs mount, and checked the way a user would.

The tools are called by absolute path; a missing one fails the test with
the Debian package to install (see ``tests/helpers/tools.py``):
git rsync sqlite3 libglib2.0-bin acl vim util-linux coreutils tar diffutils.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import os
import random
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from megafs.crypto import CHUNK_SIZE
from tests.helpers.drive import Drive
from tests.helpers.tools import (
    RssSampler,
    compare_trees,
    daemon_pid,
    describe,
    du_bytes,
    need,
    run,
    snapshot,
    xattrs_of,
)

pytestmark = pytest.mark.mount

MiB = 1 << 20
GiB = 1 << 30

#: How much the recorder test writes (and reads behind the writer).
RECORDER_BYTES = 2 * GiB
#: The recorder's write size and its rate cap.
RECORDER_WRITE = 64 * 1024
RECORDER_RATE = 200 * MiB


def _remount_cold(drive: Drive) -> None:
    """Unmount (every change reaches the server), forget the local cache,
    mount again: what another machine of the user would see."""
    drive.umount()
    drive.drop_cache()
    drive.mount()


def _base_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LC_ALL": "C",
        "LANG": "C",
        "TZ": "UTC",
    }


# -- a tree with everything tools are supposed to carry over ---------------------

#: Modification times: pre-1970, 1980, ordinary with nanoseconds, 2100.
MTIMES = [
    -946_684_800_000_000_000 + 123,
    315_532_800_000_000_000,
    1_700_000_000_123_456_789,
    1_600_000_000_999_999_999,
    4_102_444_800_000_000_001,
]

ODD_NAMES = [
    b"with space.txt",
    b"new\nline.txt",
    b"-leading-dash",
    b"--also-an-option",
    b"a" * 255,
    "\u00e9".encode() * 127 + b"x",  # 255 bytes, 128 characters
    b"\xff\xfe-not-utf8",
    b"tab\there*and?[glob]",
    b"caf\xc3\xa9",  # NFC
    b"cafe\xcc\x81",  # NFD: another name
    b"back\\slash",
    b"dir with space/\xff\xfe dir/file \xff",
]


def _build_tree(
    root: Path,
    *,
    hard_links: bool = True,
    on_link_error: Callable[[bytes, OSError], None] | None = None,
) -> None:
    """Files of many sizes and modes, odd names, symlinks (relative,
    absolute, dangling), user.* xattrs, a file owned by another user, hard
    links, and distinct mtimes everywhere (set last, bottom-up)."""
    rng = random.Random(7)
    r = os.fsencode(root)

    def p(rel: bytes) -> bytes:
        return os.path.join(r, rel)

    dirs = {
        b"dir": 0o755,
        b"dir/nested": 0o750,
        b"private": 0o700,
        b"sticky": 0o1777,
        b"setgid-dir": 0o2775,
        b"empty-dir": 0o711,
        b"dir with space": 0o755,
        b"dir with space/\xff\xfe dir": 0o755,
    }
    os.makedirs(r, exist_ok=True)
    for d in dirs:
        os.makedirs(p(d), exist_ok=True)
    for d, mode in dirs.items():
        os.chmod(p(d), mode)
    files: dict[bytes, tuple[bytes, int]] = {
        b"plain.txt": (b"hello, world\n", 0o644),
        b"empty": (b"", 0o600),
        b"exec.sh": (b"#!/bin/sh\necho hi\n", 0o755),
        b"readonly.txt": (b"read only\n", 0o444),
        b"setuid-bin": (b"\x7fELF not really\n", 0o4755),
        b"setgid-dir/inherits": (b"g\n", 0o2644),
        b"big.bin": (rng.randbytes(3 * CHUNK_SIZE + 5), 0o640),
        b"chunk.bin": (rng.randbytes(CHUNK_SIZE), 0o644),
        b"zeros.bin": (bytes(2 * CHUNK_SIZE + 1), 0o644),
        b"dir/nested/deep.txt": (b"deep\n" * 100, 0o644),
        b"private/secret.txt": (b"secret\n", 0o600),
        b"sticky/tmpfile": (b"t\n", 0o666),
        b"owned": (b"owned by someone else\n", 0o640),
        b"hard-a": (b"linked content\n", 0o640),
    }
    for i, name in enumerate(ODD_NAMES):
        files[name] = (b"odd %d: " % i + name + b"\n", 0o644)
    for rel, (data, mode) in files.items():
        with open(p(rel), "wb") as f:
            f.write(data)
        os.chmod(p(rel), mode)
    os.chown(p(b"owned"), 1234, 5678)
    os.chmod(p(b"owned"), 0o640)

    symlinks = {
        b"link-relative": b"plain.txt",
        b"dir/nested/link-up": b"../../plain.txt",
        b"link-absolute": b"/etc/passwd",
        b"link-dangling": b"does/not/exist",
        b"link-to-dir": b"dir",
        b"link-odd": b"\xff\xfe-not-utf8",
        b"link-long": b"x/" * 500 + b"end",
    }
    for rel, target in symlinks.items():
        os.symlink(target, p(rel))

    xattrs = {
        b"plain.txt": {
            b"user.comment": b"a comment",
            b"user.empty": b"",
            b"user.binary": bytes(range(256)),
        },
        b"big.bin": {b"user.large": b"L" * 4000},
        b"dir": {b"user.dirattr": b"on a folder"},
        b"\xff\xfe-not-utf8": {b"user.odd": b"\xff\x00\xfe"},
        b"hard-a": {b"user.shared": b"by every name"},
        b"readonly.txt": {b"user.ro": b"attr on a read-only file"},
    }
    for rel, attrs in xattrs.items():
        for name, value in attrs.items():
            os.setxattr(p(rel), name, value)

    if hard_links:
        for src, dst in (
            (b"hard-a", b"hard-b"),
            (b"hard-a", b"dir/hard-c"),
            (b"exec.sh", b"dir/nested/exec-link"),
        ):
            try:
                os.link(p(src), p(dst))
            except OSError as exc:
                if on_link_error is None:
                    raise
                on_link_error(dst, exc)

    # mtimes last, deepest first, so setting them is the final change.
    everything = []
    for dirpath, dirnames, filenames in os.walk(r):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            everything.append(os.path.join(dirpath, name))
    for i, path in enumerate(sorted(everything)):
        t = MTIMES[i % len(MTIMES)]
        os.utime(path, ns=(t, t), follow_symlinks=False)
    for i, d in enumerate([*sorted((p(d) for d in dirs), key=len, reverse=True), r]):
        t = MTIMES[(i + 2) % len(MTIMES)]
        os.utime(d, ns=(t, t))


def _diff_r(a: Path, b: Path) -> list[str]:
    proc = run([need("diff"), "-r", "--no-dereference", str(a), str(b)], check=False)
    return [] if proc.returncode == 0 else [describe(proc)]


# -- 1. git ------------------------------------------------------------------------


def _git_tree(rng: random.Random) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for i in range(1000):
        parts = [f"pkg{i % 7}", f"mod{i % 11}"] + ([f"sub{i % 3}"] if i % 2 else [])
        rel = "/".join([*parts, f"file_{i:04d}.{('py', 'txt', 'c', 'md')[i % 4]}"])
        lines = [f"# file {i}\n"] + [
            f"line {j} {rng.getrandbits(64):x}\n" for j in range(rng.randint(1, 30))
        ]
        files[rel] = "".join(lines).encode()
    return files


def test_git_init_add_commit_gc_fsck(drive: Drive, tmp_path: Path) -> None:
    git = need("git")
    env = _base_env(tmp_path / "home") | {
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Alice",
        "GIT_AUTHOR_EMAIL": "alice@example.org",
        "GIT_COMMITTER_NAME": "Alice",
        "GIT_COMMITTER_EMAIL": "alice@example.org",
    }
    drive.mount()
    repo = drive.mnt / "repo"
    repo.mkdir()

    def g(*args: str, timeout: float = 180) -> str:
        return run(
            [git, "-c", "gc.auto=0", *args], cwd=repo, env=env, timeout=timeout
        ).stdout.decode()

    rng = random.Random(11)
    files = _git_tree(rng)
    for rel, data in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(data)
    for rel in list(files)[::50]:
        os.chmod(repo / rel, 0o755)
    os.symlink("pkg0/mod0/file_0000.py", repo / "entry-point")

    g("init", "-q", "-b", "main")
    g("add", "-A")
    g("commit", "-q", "-m", "first: 1000 files")
    # A second commit that changes, removes and adds files: deltas for gc.
    names = sorted(files)
    for rel in names[::10]:
        data = files[rel] + b"changed\n"
        (repo / rel).write_bytes(data)
        files[rel] = data
    for rel in names[5::100]:
        (repo / rel).unlink()
        del files[rel]
    for i in range(10):
        rel = f"pkg{i}/new_{i}.txt"
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(b"new %d\n" % i)
        files[rel] = b"new %d\n" % i
    g("add", "-A")
    g("commit", "-q", "-m", "second")
    g("gc", "-q", "--prune=now")

    counts = dict(line.split(": ") for line in g("count-objects", "-v").splitlines())
    assert counts["count"] == "0" and counts["packs"] == "1", counts  # gc packed everything
    fsck = run([git, "fsck", "--full", "--strict", "--no-progress"], cwd=repo, env=env)
    assert fsck.stdout == fsck.stderr == b"", describe(fsck)
    assert g("status", "--porcelain") == ""
    head = g("rev-parse", "HEAD").strip()

    _remount_cold(drive)
    assert g("status", "--porcelain") == ""
    fsck = run([git, "fsck", "--full", "--strict", "--no-progress"], cwd=repo, env=env)
    assert fsck.stdout == fsck.stderr == b"", describe(fsck)
    assert g("rev-parse", "HEAD").strip() == head
    assert len(g("log", "--format=%H").split()) == 2
    tracked = set(g("ls-files", "-z").split("\0")) - {""}
    assert tracked == set(files) | {"entry-point"}
    for rel, data in files.items():
        assert (repo / rel).read_bytes() == data, rel
    assert os.readlink(repo / "entry-point") == "pkg0/mod0/file_0000.py"
    drive.umount()


# -- 2. rsync ----------------------------------------------------------------------


def test_rsync_aHAX_into_the_drive(drive: Drive, tmp_path: Path) -> None:
    rsync = need("rsync")
    setfacl = need("setfacl")
    env = _base_env(tmp_path / "home")
    src = tmp_path / "src"
    _build_tree(src)
    expected = snapshot(src)
    drive.mount()
    dst = drive.mnt / "copy"
    problems: list[str] = []

    first = run([rsync, "-aHAX", f"{src}/", f"{dst}/"], env=env, check=False, timeout=300)
    if first.returncode != 0:
        problems.append("first rsync: " + describe(first))

    again = run(
        [rsync, "-aHAX", "--itemize-changes", "--stats", f"{src}/", f"{dst}/"],
        env=env,
        check=False,
        timeout=300,
    )
    out = again.stdout.decode(errors="replace")
    itemized = [line for line in out.split("Number of files:")[0].splitlines() if line]
    if again.returncode != 0 or itemized or "Number of regular files transferred: 0\n" not in out:
        problems.append(f"second rsync was not a no-op: itemized {itemized}\n" + describe(again))

    problems += _diff_r(src, dst)
    problems += compare_trees(expected, snapshot(dst))

    # ACLs: megafs may refuse them, but the files must arrive intact and
    # rsync must say nothing but that.
    acl_src = tmp_path / "acl-src"
    (acl_src / "shared").mkdir(parents=True)
    (acl_src / "shared" / "report.txt").write_bytes(b"quarterly numbers\n")
    run([setfacl, "-m", "u:1234:rw-", str(acl_src / "shared" / "report.txt")])
    run([setfacl, "-d", "-m", "u:1234:rwx", str(acl_src / "shared")])
    for path in (acl_src / "shared" / "report.txt", acl_src / "shared", acl_src):
        os.utime(path, ns=(MTIMES[2], MTIMES[2]))
    acl_expected = snapshot(acl_src)
    acl = run([rsync, "-aHAX", f"{acl_src}/", f"{drive.mnt / 'acl-copy'}/"], env=env, check=False)
    errors = [
        line
        for line in acl.stderr.decode(errors="replace").splitlines()
        if line and "acl" not in line.lower() and not line.startswith("rsync error: some")
    ]
    if acl.returncode not in (0, 23) or errors:
        problems.append("rsync -A of files with ACLs: " + describe(acl))
    problems += compare_trees(acl_expected, snapshot(drive.mnt / "acl-copy"))

    assert not problems, "\n".join(problems)

    _remount_cold(drive)
    problems = _diff_r(src, dst) + compare_trees(expected, snapshot(dst))
    assert not problems, "after a cold remount:\n" + "\n".join(problems)
    drive.umount()


# -- 3. tar ------------------------------------------------------------------------


def test_tar_xattrs_round_trips(drive: Drive, tmp_path: Path) -> None:
    tar = need("tar")
    env = _base_env(tmp_path / "home")
    flags = [
        "--xattrs",
        "--xattrs-include=user.*",
        "--numeric-owner",
        "--format=posix",
        "--warning=no-timestamp",
    ]
    problems: list[str] = []
    drive.mount()

    # Created on the local disk, extracted into the drive.
    src = tmp_path / "src"
    _build_tree(src)
    expected = snapshot(src)
    run([tar, *flags, "-cf", str(tmp_path / "local.tar"), "-C", str(src), "."], env=env)
    into = drive.mnt / "from-local"
    into.mkdir()
    x = run(
        [tar, *flags, "-xpf", str(tmp_path / "local.tar"), "-C", str(into)], env=env, check=False
    )
    if x.returncode != 0:
        problems.append("extracting into the drive: " + describe(x))
    problems += _diff_r(src, into)
    problems += compare_trees(expected, snapshot(into))

    # A tree made in the drive, archived into the drive, extracted in the drive.
    made = drive.mnt / "made"
    _build_tree(
        made,
        on_link_error=lambda name, exc: problems.append(
            f"link() in the drive for {name!r}: {exc!r}"
        ),
    )
    made_snapshot = snapshot(made)
    c = run(
        [tar, *flags, "-cf", str(drive.mnt / "archive.tar"), "-C", str(made), "."],
        env=env,
        check=False,
    )
    if c.returncode != 0:
        problems.append("archiving the drive: " + describe(c))
    extracted = drive.mnt / "extracted"
    extracted.mkdir()
    x = run(
        [tar, *flags, "-xpf", str(drive.mnt / "archive.tar"), "-C", str(extracted)],
        env=env,
        check=False,
    )
    if x.returncode != 0:
        problems.append("extracting in the drive: " + describe(x))
    problems += _diff_r(made, extracted)
    problems += compare_trees(made_snapshot, snapshot(extracted))
    assert not problems, "\n".join(problems)
    drive.umount()


# -- 4. sqlite ---------------------------------------------------------------------

SQLITE_WORKER = r"""
import sqlite3, sys, time
db, worker, rows, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
con = sqlite3.connect(db, timeout=120, isolation_level=None)
con.execute("PRAGMA busy_timeout = 120000")
assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
seq = 0
while seq < rows:
    if seq == batch:
        # After a first commit, wait until the other writer has committed too, so the
        # two really write the same database at the same time, whatever the scheduling.
        deadline = time.monotonic() + 120
        while not con.execute("SELECT 1 FROM t WHERE worker != ? LIMIT 1", (worker,)).fetchall():
            assert time.monotonic() < deadline, "the other writer never committed"
            time.sleep(0.01)
    con.execute("BEGIN IMMEDIATE")
    for _ in range(min(batch, rows - seq)):
        con.execute("INSERT INTO t (worker, seq, payload) VALUES (?, ?, ?)",
                    (worker, seq, (b"%d:%d;" % (worker, seq)) * 12))
        seq += 1
    con.execute("COMMIT")
con.close()
print("done", worker, seq)
"""

SQLITE_ROWS = 10_000
SQLITE_BATCH = 20


def test_sqlite_wal_two_writers(drive: Drive, tmp_path: Path) -> None:
    import sqlite3

    sqlite3_cli = need("sqlite3")
    drive.mount()
    db = drive.mnt / "app" / "data.db"
    db.parent.mkdir()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
    con.execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, worker INTEGER, seq INTEGER, "
        "payload BLOB, UNIQUE (worker, seq))"
    )
    con.commit()
    con.close()

    script = tmp_path / "worker.py"
    script.write_text(SQLITE_WORKER)
    per_worker = SQLITE_ROWS // 2
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(db), str(w), str(per_worker), str(SQLITE_BATCH)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for w in (1, 2)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for w, (out, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, (out + err).decode(errors="replace")

    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    order = [w for (w,) in con.execute("SELECT worker FROM t ORDER BY id")]
    con.close()
    assert len(order) == SQLITE_ROWS
    switches = sum(1 for a, b in itertools.pairwise(order) if a != b)
    assert switches > 1, "the two writers did not overlap"

    _remount_cold(drive)
    out = run(
        [
            sqlite3_cli,
            str(db),
            "PRAGMA integrity_check;",
            "SELECT worker, count(*), min(seq), max(seq) FROM t GROUP BY worker;",
        ]
    ).stdout
    assert out.decode().split() == [
        "ok",
        f"1|{per_worker}|0|{per_worker - 1}",
        f"2|{per_worker}|0|{per_worker - 1}",
    ]
    drive.umount()


# -- 5. editors --------------------------------------------------------------------


def test_editor_saves(drive: Drive, tmp_path: Path) -> None:
    vim = need("vim")
    gio = need("gio")
    drive.mount()
    folder = drive.mnt / "docs"
    folder.mkdir()
    doc = folder / "notes.txt"
    doc.write_bytes(b"version 1\n")
    os.chmod(doc, 0o640)
    os.setxattr(doc, "user.tag", b"keep me")

    # Atomic save (most editors, IDEs, config tools): temp file, fsync,
    # rename over the original, fsync the folder.
    reader = os.open(doc, os.O_RDONLY)
    try:
        tmp = folder / ".notes.txt.tmp-4711"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"version 2\n")
        os.fchmod(fd, stat.S_IMODE(os.stat(doc).st_mode))
        os.setxattr(fd, "user.tag", os.getxattr(doc, "user.tag"))
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, doc)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        assert doc.read_bytes() == b"version 2\n"
        # A program that had the old file open still reads the old file.
        assert os.pread(reader, 100, 0) == b"version 1\n"
    finally:
        os.close(reader)
    assert stat.S_IMODE(os.stat(doc).st_mode) == 0o640
    assert sorted(os.listdir(folder)) == ["notes.txt"]

    # Vim's way (backupcopy=no): swap file, rename the original to a backup,
    # write the new file, restore mode and xattrs, delete backup and swap.
    swp = folder / ".notes.txt.swp"
    sfd = os.open(swp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(sfd, b"b0VIM 9.0" + bytes(4087))
    os.fsync(sfd)
    backup = folder / "notes.txt~"
    old = os.stat(doc)
    attrs = xattrs_of(doc)
    os.rename(doc, backup)
    fd = os.open(doc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"version 3\n")
    os.fsync(fd)
    os.fchmod(fd, stat.S_IMODE(old.st_mode))
    for k, v in attrs.items():
        os.setxattr(fd, k, v)
    os.close(fd)
    os.unlink(backup)
    os.close(sfd)
    os.unlink(swp)
    assert doc.read_bytes() == b"version 3\n"
    assert stat.S_IMODE(os.stat(doc).st_mode) == 0o640
    assert xattrs_of(doc) == {b"user.tag": b"keep me"}
    assert sorted(os.listdir(folder)) == ["notes.txt"]

    # Real vim, forced onto the rename path (backupskip is emptied: its
    # default skips backups for everything under /tmp, where tests run).
    env = _base_env(tmp_path / "home")
    ino = os.stat(doc).st_ino
    run(
        [
            vim,
            "-N",
            "-u",
            "NONE",
            "-i",
            "NONE",
            "-es",
            "+set backupcopy=no writebackup nobackup backupskip=",
            "+%s/3/4/",
            "+wq",
            str(doc),
        ],
        cwd=folder,
        env=env,
        timeout=60,
    )
    assert doc.read_bytes() == b"version 4\n"
    assert os.stat(doc).st_ino != ino, "vim did not take the rename path"
    assert stat.S_IMODE(os.stat(doc).st_mode) == 0o640
    features = run([vim, "--version"], env=env).stdout
    if b"+xattr" in features:
        assert xattrs_of(doc) == {b"user.tag": b"keep me"}
    assert sorted(os.listdir(folder)) == ["notes.txt"]

    # GNOME's way (g_file_replace, as gedit): temp file, fsync, rename; a
    # backup copy with --backup.
    genv = _gio_env(tmp_path / "gio-home")
    run([gio, "save", "--backup", str(doc)], input=b"version 5\n", env=genv)
    assert doc.read_bytes() == b"version 5\n"
    assert (folder / "notes.txt~").read_bytes() == b"version 4\n"
    assert stat.S_IMODE(os.stat(doc).st_mode) == 0o640
    os.unlink(folder / "notes.txt~")
    assert sorted(os.listdir(folder)) == ["notes.txt"]

    _remount_cold(drive)
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    assert doc.read_bytes() == b"version 5\n"
    assert stat.S_IMODE(os.stat(doc).st_mode) == 0o640
    drive.umount()


# -- 6. sparse copy ----------------------------------------------------------------

SPARSE_SIZE = 5 * GiB
#: (offset, length) of the data in the sparse file; the rest is holes.
SPARSE_DATA = [(0, MiB + 3), (GiB + 12_345, 2 * MiB), (3 * GiB, MiB), (SPARSE_SIZE - 777, 777)]


def _sha256_stream(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


def test_cp_sparse_5_gib(drive: Drive, server, tmp_path: Path) -> None:
    cp = need("cp")
    truncate = need("truncate")
    src = tmp_path / "disk.img"
    run([truncate, "-s", str(SPARSE_SIZE), str(src)])
    rng = random.Random(6)
    with open(src, "r+b") as f:
        for off, length in SPARSE_DATA:
            f.seek(off)
            f.write(rng.randbytes(length))
    touched = {
        i
        for off, length in SPARSE_DATA
        for i in range(off // CHUNK_SIZE, (off + length - 1) // CHUNK_SIZE + 1)
    }
    want = _sha256_stream(src)

    drive.mount()
    chunks_before = du_bytes(server.data_dir / "chunks")
    data_before = du_bytes(server.data_dir)
    t0 = time.monotonic()
    run([cp, "--sparse=always", str(src), str(drive.mnt / "disk.img")], timeout=120)
    copy_s = time.monotonic() - t0
    st = os.stat(drive.mnt / "disk.img")
    assert st.st_size == SPARSE_SIZE
    assert st.st_blocks * 512 <= len(touched) * CHUNK_SIZE, "du shows the holes as data"
    t0 = time.monotonic()
    got = _sha256_stream(drive.mnt / "disk.img")
    read_s = time.monotonic() - t0
    assert got == want
    drive.umount()
    chunks_growth = du_bytes(server.data_dir / "chunks") - chunks_before
    data_growth = du_bytes(server.data_dir) - data_before
    print(
        f"\nsparse: cp {copy_s:.1f} s, read back {read_s:.1f} s, "
        f"chunks +{chunks_growth / MiB:.2f} MiB, server data +{data_growth / MiB:.2f} MiB "
        f"({len(touched)} chunks hold data)"
    )
    # Each chunk that holds data is stored once: its ciphertext plus, as du
    # counts them, up to two new directories of the chunk store.
    stored = len(touched) * (CHUNK_SIZE + 16 * 1024)
    assert chunks_growth <= stored
    assert data_growth <= stored + 4 * MiB

    drive.drop_cache()
    drive.mount()
    with open(src, "rb") as a, open(drive.mnt / "disk.img", "rb") as b:
        for off, length in [*SPARSE_DATA, (2 * GiB, MiB), (SPARSE_SIZE - MiB, MiB)]:
            a.seek(off)
            b.seek(off)
            assert a.read(length) == b.read(length), off
    drive.umount()


# -- 7. truncate and fallocate ------------------------------------------------------


def _pattern(n: int, seed: int) -> bytearray:
    return bytearray(random.Random(seed).randbytes(n))


def _check(path: Path, model: bytes | bytearray, what: str) -> None:
    data = path.read_bytes()
    assert len(data) == len(model), f"{what}: size {len(data)}, expected {len(model)}"
    if data != model:
        first = next(i for i in range(len(data)) if data[i] != model[i])
        raise AssertionError(
            f"{what}: first difference at byte {first} "
            f"(got {data[first : first + 8]!r}, expected "
            f"{bytes(model[first : first + 8])!r})"
        )


def _resize(model: bytearray, size: int) -> None:
    if size < len(model):
        del model[size:]
    else:
        model.extend(bytes(size - len(model)))


def test_truncate_and_fallocate(drive: Drive) -> None:
    truncate = need("truncate")
    fallocate = need("fallocate")
    drive.mount()
    f = drive.mnt / "resize.bin"
    model = _pattern(3 * MiB + 100, 1)
    f.write_bytes(model)
    _check(f, model, "written")

    for size in (MiB + 1, 3 * MiB + 17, MiB - 1, MiB, MiB + 1, 2 * MiB + 5, 0, 5):
        run([truncate, "-s", str(size), str(f)])
        _resize(model, size)
        _check(f, model, f"truncate -s {size}")
        if size == 0:  # data again for the next steps
            model = _pattern(2 * MiB + 77, 2)
            f.write_bytes(model)

    # Through an open descriptor, with writes that are not sealed yet.
    fd = os.open(f, os.O_RDWR)
    try:
        piece = bytes(_pattern(100 * 1024, 3))
        os.pwrite(fd, piece, 2 * MiB + 3)
        _resize(model, 2 * MiB + 3)
        model += piece
        os.ftruncate(fd, 2 * MiB + 50)
        _resize(model, 2 * MiB + 50)
        edge = bytes(_pattern(40, 4))
        os.pwrite(fd, edge, MiB - 10)
        model[MiB - 10 : MiB + 30] = edge
        os.ftruncate(fd, 3 * MiB + 17)
        _resize(model, 3 * MiB + 17)
        assert os.pread(fd, 200, 2 * MiB) == bytes(model[2 * MiB : 2 * MiB + 200])
    finally:
        os.close(fd)
    _check(f, model, "ftruncate with unsealed writes")

    _remount_cold(drive)
    _check(f, model, "after a cold remount")

    def either(
        args: list[str],
        path: Path,
        expect_ok: Callable[[], None],
        what: str,
        before: bytes | bytearray,
    ) -> None:
        proc = run([fallocate, *args, str(path)], check=False)
        if proc.returncode == 0:
            expect_ok()
        else:
            # Refused: it must be the clean EOPNOTSUPP (util-linux words it
            # "keep size mode is unsupported" for --punch-hole), nothing changed.
            assert (
                b"Operation not supported" in proc.stderr
                or b"keep size mode is unsupported" in proc.stderr
            ), describe(proc)
            _check(path, before, f"{what} refused")

    # fallocate -l on a new file.
    new = drive.mnt / "reserved.bin"
    either(
        ["-l", str(5 * MiB + 3)],
        new,
        lambda: _check(new, bytes(5 * MiB + 3), "fallocate -l (new file)"),
        "fallocate -l (new file)",
        b"",
    )
    # fallocate -l past the end of a file with data.
    before = bytes(model)
    grown = bytearray(model) + bytes(6 * MiB - len(model))
    either(
        ["-l", str(6 * MiB)],
        f,
        lambda: _check(f, grown, "fallocate -l (grow)"),
        "fallocate -l (grow)",
        before,
    )
    model = bytearray(f.read_bytes())  # whichever it was, checked above
    # Punching a hole across a chunk boundary keeps the size.
    before = bytes(model)
    punched = bytearray(model)
    punched[MiB - 5 : MiB + 5] = bytes(10)
    either(
        ["--punch-hole", "-o", str(MiB - 5), "-l", "10"],
        f,
        lambda: _check(f, punched, "fallocate --punch-hole"),
        "fallocate --punch-hole",
        before,
    )
    model = bytearray(f.read_bytes())
    # posix_fallocate(3), as applications call it: glibc falls back to
    # writing where the filesystem says EOPNOTSUPP; it must succeed.
    fd = os.open(f, os.O_RDWR)
    try:
        os.posix_fallocate(fd, MiB, 7 * MiB + 9)
    finally:
        os.close(fd)
    _resize(model, max(len(model), 8 * MiB + 9))
    _check(f, model, "posix_fallocate")

    # The exact errno of fallocate(2) (the tool only shows a message):
    # success with its effect, or EOPNOTSUPP with nothing changed.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    keep_size, punch_hole = 0x01, 0x02
    fd = os.open(f, os.O_RDWR)
    try:
        for mode, off, length in ((0, 0, 9 * MiB), (keep_size | punch_hole, MiB - 3, 7)):
            if libc.fallocate(fd, mode, off, length) == 0:
                if mode & punch_hole:
                    model[off : off + length] = bytes(length)
                else:
                    _resize(model, max(len(model), off + length))
            else:
                err = ctypes.get_errno()
                assert err == errno.EOPNOTSUPP, (mode, errno.errorcode.get(err, err))
            assert os.fstat(fd).st_size == len(model)
            assert os.pread(fd, len(model) + 1, 0) == model, f"fallocate mode {mode}"
    finally:
        os.close(fd)

    _remount_cold(drive)
    _check(f, model, "after the second cold remount")
    _check(new, bytes(new.stat().st_size), "reserved.bin after remount")
    drive.umount()


# -- 8. gio ------------------------------------------------------------------------


def _gio_env(home: Path) -> dict[str, str]:
    env = _base_env(home)
    run_dir = home / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    return env | {
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_RUNTIME_DIR": str(run_dir),
        "GIO_USE_VFS": "local",
        "GIO_USE_VOLUME_MONITOR": "unix",
        "GSETTINGS_BACKEND": "memory",
        "DBUS_SESSION_BUS_ADDRESS": "disabled:",
    }


def _trashinfo(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    assert lines[0] == "[Trash Info]", lines
    return dict(line.split("=", 1) for line in lines[1:] if line)


def test_gio_copy_move_trash(drive: Drive, tmp_path: Path) -> None:
    gio = need("gio")
    env = _gio_env(tmp_path / "home")
    drive.mount()
    m = drive.mnt
    docs = m / "docs"
    docs.mkdir()
    (docs / "a.txt").write_bytes(b"version A\n")
    os.chmod(docs / "a.txt", 0o640)
    os.setxattr(docs / "a.txt", "user.color", b"blue")
    os.utime(docs / "a.txt", ns=(MTIMES[2], MTIMES[2]))
    (docs / "with space.txt").write_bytes(b"spaced\n")
    (docs / "album").mkdir()
    for i in range(5):
        (docs / "album" / f"photo-{i}.jpg").write_bytes(os.urandom(10_000 + i))

    def gio_ok(*args: str | Path) -> None:
        run([gio, *map(str, args)], env=env, timeout=60)

    # copy, with and without --preserve
    gio_ok("copy", docs / "a.txt", docs / "a-copy.txt")
    assert (docs / "a-copy.txt").read_bytes() == b"version A\n"
    gio_ok("copy", "--preserve", docs / "a.txt", docs / "a-kept.txt")
    st = os.stat(docs / "a-kept.txt")
    assert (docs / "a-kept.txt").read_bytes() == b"version A\n"
    assert st.st_mtime_ns // 1000 == MTIMES[2] // 1000  # GIO keeps microseconds
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert xattrs_of(docs / "a-kept.txt") == {b"user.color": b"blue"}

    # move inside the drive (a rename), and into it from the local disk
    (m / "elsewhere").mkdir()
    gio_ok("move", docs / "a-copy.txt", m / "elsewhere" / "moved.txt")
    assert not (docs / "a-copy.txt").exists()
    assert (m / "elsewhere" / "moved.txt").read_bytes() == b"version A\n"
    local = tmp_path / "local.txt"
    local.write_bytes(b"from the local disk\n")
    gio_ok("move", local, m / "elsewhere" / "from-local.txt")
    assert not local.exists()
    assert (m / "elsewhere" / "from-local.txt").read_bytes() == b"from the local disk\n"
    gio_ok("move", docs / "album", m / "elsewhere" / "album")
    assert sorted(os.listdir(m / "elsewhere" / "album")) == [f"photo-{i}.jpg" for i in range(5)]

    # trash: the freedesktop.org $topdir/.Trash-$uid of the mount
    gio_ok("trash", docs / "a.txt")
    (docs / "a.txt").write_bytes(b"version B\n")
    gio_ok("trash", docs / "a.txt", docs / "with space.txt", m / "elsewhere" / "album")
    assert sorted(os.listdir(docs)) == ["a-kept.txt"]
    trash = m / f".Trash-{os.getuid()}"
    assert trash.is_dir(), sorted(os.listdir(m))
    assert stat.S_IMODE(os.stat(trash).st_mode) == 0o700
    assert not (tmp_path / "home" / ".local/share/Trash/files").exists() or not os.listdir(
        tmp_path / "home" / ".local/share/Trash/files"
    ), "trashed into the home trash"
    infos = {}
    for info in (trash / "info").iterdir():
        assert info.name.endswith(".trashinfo"), info
        fields = _trashinfo(info)
        assert "DeletionDate" in fields
        infos[info.name.removesuffix(".trashinfo")] = urllib.parse.unquote(fields["Path"])
    assert sorted(os.listdir(trash / "files")) == sorted(infos)
    by_path: dict[str, list[str]] = {}
    for name, original in infos.items():
        # Relative to the mount ($topdir), as the spec asks for $topdir trash.
        by_path.setdefault(original, []).append(name)
    assert sorted(by_path) == ["docs/a.txt", "docs/with space.txt", "elsewhere/album"]
    versions = sorted((trash / "files" / n).read_bytes() for n in by_path["docs/a.txt"])
    assert versions == [b"version A\n", b"version B\n"]
    assert sorted(os.listdir(trash / "files" / by_path["elsewhere/album"][0])) == [
        f"photo-{i}.jpg" for i in range(5)
    ]
    listed = run([gio, "list", str(trash / "files")], env=env).stdout.decode().splitlines()
    assert sorted(listed) == sorted(infos)

    # Restore as a file manager does: move back to Path, drop the .trashinfo.
    name = by_path["elsewhere/album"][0]
    gio_ok("move", trash / "files" / name, m / "elsewhere/album")
    os.unlink(trash / "info" / f"{name}.trashinfo")
    assert len(os.listdir(m / "elsewhere" / "album")) == 5

    _remount_cold(drive)
    assert sorted(os.listdir(trash / "files")) == sorted(set(infos) - {name})
    assert sorted(os.listdir(m / "elsewhere")) == ["album", "from-local.txt", "moved.txt"]
    assert xattrs_of(docs / "a-kept.txt") == {b"user.color": b"blue"}
    drive.umount()


# -- 9. recorder --------------------------------------------------------------------

RECORDER_COMMON = r"""
import hashlib, os, random, struct, sys, time
WRITE = int(os.environ["REC_WRITE"])
PATTERN = random.Random(2024).randbytes(WRITE)
def block(i):
    return struct.pack("<Q", i) + PATTERN[8:]
"""

RECORDER_WRITER = (
    RECORDER_COMMON
    + r"""
path, total, rate, report_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
report = os.fdopen(report_fd, "w", buffering=1)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
t0 = time.monotonic()
written = 0
i = 0
while written < total:
    n = os.write(fd, block(i))
    assert n == WRITE, n
    written += n
    i += 1
    if i % 16 == 0 or written >= total:
        report.write(f"{written}\n")
    ahead = written / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
os.close(fd)
report.close()
print(f"{written} {time.monotonic() - t0:.3f}")
"""
)

RECORDER_READER = (
    RECORDER_COMMON
    + r"""
path, total, report_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
reports = os.fdopen(report_fd, "r")
fd = None
pos = 0
lag = 0
t0 = time.monotonic()
for line in reports:
    target = int(line)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
    lag = max(lag, target - pos)
    while pos < target:
        data = os.pread(fd, min(1 << 20, target - pos), pos)
        if not data:
            print(f"FAIL short read at {pos}: the writer reported {target} bytes written "
                  f"(size {os.fstat(fd).st_size})")
            sys.exit(1)
        for off in range(0, len(data), WRITE):
            piece = data[off:off + WRITE]
            i = (pos + off) // WRITE
            if piece != block(i)[:len(piece)]:
                bad = next(k for k in range(len(piece)) if piece[k] != block(i)[k])
                print(f"FAIL wrong bytes at {pos + off + bad}")
                sys.exit(1)
        pos += len(data)
print(f"{pos} {lag} {time.monotonic() - t0:.3f}")
"""
)


def test_recorder_appends_while_a_reader_follows(drive: Drive, tmp_path: Path) -> None:
    total = RECORDER_BYTES
    assert total % RECORDER_WRITE == 0
    (tmp_path / "writer.py").write_text(RECORDER_WRITER)
    (tmp_path / "reader.py").write_text(RECORDER_READER)
    env = os.environ | {"REC_WRITE": str(RECORDER_WRITE)}
    drive.mount()
    pid = daemon_pid(drive.config)
    path = drive.mnt / "recording.raw"
    r, w = os.pipe()
    with RssSampler(pid) as rss:
        t0 = time.monotonic()
        writer = subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "writer.py"),
                str(path),
                str(total),
                str(RECORDER_RATE),
                str(w),
            ],
            pass_fds=(w,),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        reader = subprocess.Popen(
            [sys.executable, str(tmp_path / "reader.py"), str(path), str(total), str(r)],
            pass_fds=(r,),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(r)
        os.close(w)
        wout, werr = writer.communicate(timeout=600)
        rout, rerr = reader.communicate(timeout=120)
        elapsed = time.monotonic() - t0
        assert writer.returncode == 0, (wout + werr).decode(errors="replace")
        assert reader.returncode == 0, (rout + rerr).decode(errors="replace")
        assert os.stat(path).st_size == total
        t1 = time.monotonic()
        drive.umount(timeout=600)
        umount_s = time.monotonic() - t1
    written, write_s = wout.split()
    read, lag, _ = rout.split()
    assert int(written) == int(read) == total
    # The daemon's memory must not grow with what is written: after a
    # warm-up (its caches and buffers filling, the first tenth of the
    # recording) RSS stays within a band, and never gets large.
    values = rss.values()
    idle = values[0]
    steady = [v for t, v in rss.samples if t >= 0.1 * elapsed]
    trace = " ".join(f"{t:.0f}s:{v // MiB}" for t, v in rss.samples)
    print(
        f"\nrecorder: {total / MiB:.0f} MiB in {float(write_s):.1f} s "
        f"({total / MiB / float(write_s):.0f} MiB/s), reader lag <= {int(lag) / MiB:.0f} MiB, "
        f"writer+reader {elapsed:.1f} s, umount {umount_s:.1f} s; daemon RSS idle "
        f"{idle / MiB:.0f} MiB, steady {min(steady) / MiB:.0f}..{max(steady) / MiB:.0f} MiB, "
        f"max {max(values) / MiB:.0f} MiB over {len(values)} samples\nRSS MiB: {trace}"
    )
    assert len(steady) >= 3, trace
    assert max(steady) - min(steady) < 150 * MiB, f"daemon RSS grows (MiB): {trace}"
    assert max(values) < 400 * MiB, f"daemon RSS too large (MiB): {trace}"
