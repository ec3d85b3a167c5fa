"""Crash tests with real processes (issue #6, "never lose data").

A writer process copies files into a real mount while the test kills the
mount daemon (``kill -9``), kills the server, or breaks the network between
them (tests/helpers/proxy.py). After each crash the mount comes back on the
same cache dir, replays its journal, and the test checks what the user sees
against what the writer was told:

- a file whose ``close`` (or ``fsync``) returned is there, byte for byte;
- the file being written at the crash is absent (if it was new), or has its
  earlier complete content, or a prefix of the new content (the daemon
  commits files being written every few seconds, and writes are
  sequential): never anything else;
- no other name appears.

At the end the drive is unmounted cleanly and mounted with an empty cache
dir, as on a new device: the server must have exactly what the user saw.

The plan of files, their sizes and the kill times come from a seed (fixed by
default; ``MEGAFS_CRASH_SEED`` picks another). ``MEGAFS_CRASH_ITERATIONS``
sets the number of daemon kills (20 by default, as the issue asks).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from megafs.cli.status import query_status
from megafs.crypto import CHUNK_SIZE
from megafs.fs import status_socket_path
from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess
from tests.helpers.tools import daemon_pid, wait_for

pytestmark = pytest.mark.mount

SEED = int(os.environ.get("MEGAFS_CRASH_SEED", "20261123"))
ITERATIONS = int(os.environ.get("MEGAFS_CRASH_ITERATIONS", "20"))

#: The writer: performs the plan's operations from a start index (to a
#: stop index), and
#: appends to a progress file (outside the mount) what each one got back:
#: ``start N`` before opening, ``fsync N`` once fsync returned, ``close N``
#: once close returned, ``error N ERRNO`` when a call failed (then it
#: stops: the daemon is gone). os.* calls only, so every error is seen.
WRITER = r"""
import json, os, random, sys

plan_file, root, start, stop, progress_file = sys.argv[1:6]
with open(plan_file) as f:
    plan = json.load(f)
log = os.open(progress_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def note(text):
    os.write(log, (text + "\n").encode())


PIECE = 256 << 10
for n in range(int(start), min(int(stop), len(plan))):
    rel, seed, size, fsync = plan[n]
    data = random.Random(seed).randbytes(size)
    path = os.path.join(root, rel)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        note(f"start {n}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[:PIECE]):]
            if fsync:
                os.fsync(fd)
                note(f"fsync {n}")
        finally:
            os.close(fd)
        note(f"close {n}")
    except OSError as exc:
        note(f"error {n} {exc.errno}")
        sys.exit(0)
note("end")
"""


# -- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """Write file ``rel`` with ``size`` bytes from ``random.Random(seed)``."""

    rel: str
    seed: int
    size: int
    fsync: bool

    def data(self) -> bytes:
        return random.Random(self.seed).randbytes(self.size)


def _size(rng: random.Random) -> int:
    """Mixed sizes from 0 bytes to 3 MiB: mostly small files, as in a home
    folder, and chunk boundaries on purpose."""
    r = rng.random()
    if r < 0.05:
        return 0
    if r < 0.08:
        return rng.choice((CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE))
    if r < 0.50:
        return rng.randint(1, 4096)
    if r < 0.82:
        return rng.randint(4097, 256 << 10)
    if r < 0.96:
        return rng.randint(256 << 10, 3 << 19)
    return rng.randint(3 << 19, 3 << 20)


def make_plan(seed: int, files: int, passes: int) -> list[Op]:
    """``files`` files in nested folders, written ``passes`` times over
    (later passes rewrite each file with new content and a new size)."""
    rng = random.Random(seed)
    names = []
    for i in range(files):
        if i % 11 == 0:
            names.append(f"f{i:03d}.bin")
        else:
            names.append(f"d{i % 7}/s{i % 3}/f{i:03d}.bin")
    return [
        Op(rel, rng.getrandbits(64), _size(rng), rng.random() < 0.15)
        for _ in range(passes)
        for rel in names
    ]


def plan_dirs(plan: list[Op]) -> set[str]:
    dirs: set[str] = set()
    for op in plan:
        parent = os.path.dirname(op.rel)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    return dirs


# -- what the user must see ---------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    size: int
    sha256: str


def digest(data: bytes) -> Seen:
    return Seen(len(data), hashlib.sha256(data).hexdigest())


def scan(root: Path) -> tuple[dict[str, Seen], set[str]]:
    """Every file (relative path -> size and checksum, read through the
    mount) and every folder under ``root``."""
    files: dict[str, Seen] = {}
    dirs: set[str] = set()
    for parent, subdirs, names in os.walk(root):
        rel_parent = os.path.relpath(parent, root)
        for d in subdirs:
            dirs.add(os.path.normpath(os.path.join(rel_parent, d)))
        for name in names:
            path = os.path.join(parent, name)
            h = hashlib.sha256()
            length = 0
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    length += len(block)
                size = os.fstat(f.fileno()).st_size
            rel = os.path.normpath(os.path.join(rel_parent, name))
            # What read() returned must agree with what stat() says.
            files[rel] = Seen(length, h.hexdigest()) if length == size else Seen(-1, "size")
    return files, dirs


class Model:
    """What the writer was told, hence what the mount must show."""

    def __init__(self, plan: list[Op]) -> None:
        self.plan = plan
        self.dirs = plan_dirs(plan)
        #: Files that must be there, exactly so.
        self.state: dict[str, Seen] = {}
        #: The next operation to run.
        self.next_op = 0
        self._digests: dict[int, Seen] = {}
        self.files_verified = 0

    def full(self, n: int) -> Seen:
        if n not in self._digests:
            self._digests[n] = digest(self.plan[n].data())
        return self._digests[n]

    def apply(self, progress: list[str]) -> tuple[int | None, bool]:
        """Take in a writer's progress; returns (the operation cut by the
        crash or None, whether its fsync had returned)."""
        inflight: int | None = None
        fsynced = False
        for line in progress:
            kind, *rest = line.split()
            if kind == "end":
                continue
            n = int(rest[0])
            if kind == "start":
                inflight, fsynced = n, False
            elif kind == "fsync":
                self.state[self.plan[n].rel] = self.full(n)
                fsynced = True
            elif kind == "close":
                self.state[self.plan[n].rel] = self.full(n)
                inflight, fsynced = None, False
                self.next_op = n + 1
        if inflight is not None:
            self.next_op = inflight
        return inflight, fsynced

    def check(
        self, files: dict[str, Seen], dirs: set[str], inflight: int | None, fsynced: bool
    ) -> list[str]:
        """Problems with what the mount shows; adopts the state of the file
        that was being written (a valid one) as what must stay."""
        problems = []
        cut = self.plan[inflight].rel if inflight is not None and not fsynced else None
        for rel, want in sorted(self.state.items()):
            if rel == cut:
                continue
            got = files.get(rel)
            if got is None:
                problems.append(f"{rel}: missing (expected {want.size} bytes)")
            elif got != want:
                problems.append(f"{rel}: wrong content: {got.size} bytes, expected {want.size}")
            else:
                self.files_verified += 1
        if cut is not None:
            assert inflight is not None
            got, old = files.get(cut), self.state.get(cut)
            if got is None:
                if old is not None:
                    problems.append(f"{cut}: was being rewritten and disappeared")
            elif got != old and not self._is_prefix(inflight, got):
                problems.append(
                    f"{cut}: was being written; shows {got.size} bytes that are neither "
                    f"its earlier content nor a prefix of the new"
                )
            else:
                self.files_verified += 1
                self.state[cut] = got
        extra = sorted(set(files) - set(self.state) - {cut})
        if extra:
            problems.append(f"names that were never written: {extra}")
        strange = sorted(dirs - self.dirs)
        if strange:
            problems.append(f"folders that were never made: {strange}")
        return problems

    def _is_prefix(self, n: int, got: Seen) -> bool:
        op = self.plan[n]
        return got.size <= op.size and digest(op.data()[: got.size]) == got


# -- processes ----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _in_mount_table(path: Path) -> bool:
    target = os.fsencode(path.resolve()).replace(b" ", b"\\040")
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


def wait_uploaded(drive: Drive, timeout: float = 120) -> None:
    """Until ``megafs status`` says every change is on the server; a change
    stuck in the journal fails here with the daemon's last error, rather
    than as a ``megafs umount`` that never returns."""
    end = time.monotonic() + timeout
    while True:
        doc = _status(drive)
        if doc["pending_files"] == 0 and doc["pending_chunks"] == 0 and doc["online"]:
            return
        if time.monotonic() > end:
            pytest.fail(
                _failure(
                    drive,
                    f"changes never reached the server in {timeout:.0f} s",
                    [f"status: {doc}"],
                ),
                pytrace=False,
            )
        time.sleep(0.2)


def _status(drive: Drive) -> dict[str, Any]:
    """What ``megafs status --json`` prints, asked in-process (the command
    itself is tested in test_status.py): a Python start-up per poll would
    make polling coarse and load the machine."""
    return query_status(status_socket_path(drive.mnt), timeout=30)


def kill_daemon(drive: Drive, *writers: subprocess.Popen[bytes]) -> None:
    """``kill -9`` the mount daemon, wait for ``writers`` to notice (the dead
    mount answers ENOTCONN), then remove the dead mount as a user would
    (``fusermount3 -u -z``): unmounting before the writers stop would let
    them write into the folder underneath."""
    pid = daemon_pid(drive.config)
    os.kill(pid, signal.SIGKILL)
    wait_for("the daemon to die", lambda: not _alive(pid))
    for writer in writers:
        writer.wait(60)
    subprocess.run(["fusermount3", "-u", "-z", str(drive.mnt)], check=False, capture_output=True)
    wait_for("the dead mount to go", lambda: not _in_mount_table(drive.mnt))


class Writer:
    """The writer process, running ``plan[start:stop]`` into ``root``."""

    def __init__(
        self, tmp: Path, plan_file: Path, root: Path, start: int, tag: str, stop: int = 1 << 30
    ) -> None:
        script = tmp / "writer.py"
        if not script.exists():
            script.write_text(WRITER)
        self.progress = tmp / f"progress-{tag}.txt"
        self.progress.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(plan_file),
                str(root),
                str(start),
                str(stop),
                str(self.progress),
            ],
            stdin=subprocess.DEVNULL,
        )

    def lines(self) -> list[str]:
        try:
            return self.progress.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait(self, timeout: float = 120) -> list[str]:
        assert self.proc.wait(timeout) == 0
        return self.lines()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _write_plan(tmp: Path, plan: list[Op]) -> Path:
    path = tmp / "plan.json"
    path.write_text(json.dumps([[o.rel, o.seed, o.size, o.fsync] for o in plan]))
    return path


#: Daemon log lines that no crash may cause: the client refusing its own
#: earlier state as a server rollback, two nodes left under one name, or the
#: server refusing a change (one device alone never conflicts with itself).
LOG_MARKERS = (
    "refused (rollback)",
    "two children named alike",
    "does not open",
    "server refused a change",
)


def log_problems(drive: Drive) -> list[str]:
    return [
        f"daemon.log: {line}"
        for line in drive.daemon_log().splitlines()
        if any(marker in line for marker in LOG_MARKERS)
    ]


def _failure(drive: Drive, message: str, problems: list[str]) -> str:
    log = drive.daemon_log()
    return (
        f"{message} (MEGAFS_CRASH_SEED={SEED}):\n  "
        + "\n  ".join(problems[:30])
        + f"\n--- daemon.log (tail)\n{log[-4000:]}"
    )


def check_new_device(drive: Drive, model: Model) -> dict[str, Seen]:
    """Mount the unmounted drive on an empty cache, as a new device would,
    and check it shows exactly what the model holds; returns the files."""
    drive.drop_cache()
    drive.mount()
    files, dirs = scan(drive.mnt)
    problems = model.check(files, dirs, None, False) + log_problems(drive)
    assert not problems, _failure(drive, "on a new device", problems)
    drive.umount()
    return files


# -- (a) kill -9 of the daemon ------------------------------------------------------------


def test_daemon_killed_during_copy(drive: Drive, tmp_path: Path) -> None:
    """500 files (0 bytes to 3 MiB, some fsync'd), the daemon killed with
    SIGKILL at random points of the copy, ITERATIONS times; each time the
    mount comes back on the same cache dir and shows every file the writer
    finished, and nothing that is not a state the writer produced."""
    rng = random.Random(SEED)
    # More passes than the kills get through: once the writer has finished
    # its plan, a kill cannot land in the copy. A run alone on the machine
    # wrote 3 901 files in its 20 kills (with 4 passes, it finished the
    # plan after about ten).
    plan = make_plan(SEED, files=500, passes=16)
    plan_file = _write_plan(tmp_path, plan)
    model = Model(plan)
    cut_mid_op = 0
    drive.mount()
    writer: Writer | None = None
    try:
        for iteration in range(ITERATIONS):
            writer = Writer(tmp_path, plan_file, drive.mnt, model.next_op, str(iteration))
            # Early kills land in the replay of the previous run's journal,
            # later ones in the copy, its uploads and its commits.
            time.sleep(rng.uniform(0.05, 2.5))
            kill_daemon(drive, writer.proc)
            progress = writer.wait()
            inflight, fsynced = model.apply(progress)
            cut_mid_op += inflight is not None
            drive.mount()
            files, dirs = scan(drive.mnt)
            problems = model.check(files, dirs, inflight, fsynced) + log_problems(drive)
            assert not problems, _failure(drive, f"after kill {iteration + 1}", problems)
        # Back to normal: a clean unmount puts everything on the server,
        # and a new device (empty cache) sees exactly what the user saw.
        wait_uploaded(drive)
        drive.umount()
        check_new_device(drive, model)
    finally:
        if writer is not None:
            writer.kill()
    print(
        f"{ITERATIONS} kills ({cut_mid_op} in the middle of a file), {model.next_op} of "
        f"{len(plan)} writes done, {len(model.state)} files, {model.files_verified} "
        f"file checks"
    )
    # Most kills must have hit the copy itself, or the test proved little.
    assert cut_mid_op >= ITERATIONS // 2, cut_mid_op
    assert model.next_op > 500, "the copy never got to rewriting files"


# -- (a') kill -9 while only metadata changes -----------------------------------------------

#: chmod every file of the mount, round and round, until the mount dies.
CHMOD_LOOP = r"""
import os, sys
root = sys.argv[1]
mode = 0o600
try:
    names = sorted(os.listdir(root))
    while True:
        mode ^= 0o044
        for name in names:
            os.chmod(os.path.join(root, name), mode)
except OSError:
    sys.exit(0)
"""


def test_daemon_killed_during_metadata_changes(drive: Drive, tmp_path: Path) -> None:
    """Files long on the server get chmod'ed over and over while the daemon
    is killed: after each remount every file is there with its content, and
    its mode is one of the two the loop sets."""
    rng = random.Random(SEED + 1)
    contents = {f"doc-{i:02d}.txt": rng.randbytes(rng.randint(1, 20000)) for i in range(30)}
    drive.mount()
    for name, data in contents.items():
        (drive.mnt / name).write_bytes(data)
    drive.umount()  # everything on the server; the journal is empty
    script = tmp_path / "chmod.py"
    script.write_text(CHMOD_LOOP)
    for iteration in range(max(3, ITERATIONS // 2)):
        drive.mount()
        files, _ = scan(drive.mnt)
        problems = [
            f"{name}: missing" if name not in files else f"{name}: wrong content"
            for name, data in contents.items()
            if files.get(name) != digest(data)
        ]
        problems += [
            f"{name}: mode {os.stat(drive.mnt / name).st_mode & 0o777:o}"
            for name in contents
            if name in files and os.stat(drive.mnt / name).st_mode & 0o777 not in (0o600, 0o644)
        ]
        problems += log_problems(drive)
        assert not problems, _failure(drive, f"after kill {iteration}", problems)
        loop = subprocess.Popen([sys.executable, str(script), str(drive.mnt)])
        try:
            time.sleep(rng.uniform(0.3, 1.5))
            kill_daemon(drive, loop)
            assert loop.wait(60) == 0
        finally:
            if loop.poll() is None:
                loop.kill()
                loop.wait()
    drive.mount()
    wait_uploaded(drive)
    drive.umount()


# -- (b) kill -9 of the server ---------------------------------------------------------------


def _uploading(drive: Drive, since: int) -> bool:
    doc = _status(drive)
    return doc["pending_bytes"] > 0 and doc["uploaded_chunks"] > since


def test_server_killed_during_uploads(drive: Drive, server: ServerProcess, tmp_path: Path) -> None:
    """The server is killed (SIGKILL) three times while the daemon uploads
    a copy, and restarted on the same data dir and port; the writer never
    notices, ``megafs status`` shows the outage, and in the end a new device
    finds every file. Each outage gets a third of the copy, started just
    before it, so that there is always something on its way up."""
    plan = make_plan(SEED + 2, files=150, passes=1)
    plan_file = _write_plan(tmp_path, plan)
    model = Model(plan)
    drive.mount()
    os.listdir(drive.mnt)  # the root is listed once, while the server is up
    uploaded = 0
    for outage, start in enumerate(range(0, len(plan), 50)):
        writer = Writer(tmp_path, plan_file, drive.mnt, start, f"server-{outage}", stop=start + 50)
        try:
            # Mid-upload: chunks wait for the server, and uploads have made
            # progress since it came back.
            wait_for(
                "uploads in progress",
                partial(_uploading, drive, uploaded),
                timeout=120,
                interval=0.02,
            )
            server.kill()
            wait_for("status to show the outage", lambda: not _status(drive)["online"])
            uploaded = _status(drive)["uploaded_chunks"]
            time.sleep(0.5 + outage)
            server.start()
            progress = writer.wait(timeout=300)
        finally:
            writer.kill()
        assert progress[-1] == "end", progress[-3:]
        model.apply(progress)
    wait_uploaded(drive, timeout=180)
    drive.umount()
    files = check_new_device(drive, model)
    assert len(files) == len({op.rel for op in plan})


# -- (c) a faulty network ---------------------------------------------------------------------


def test_copy_through_a_faulty_network(tmp_path: Path, server: ServerProcess) -> None:
    """Drops, delays, resets, 5xx answers and truncated bodies between the
    daemon and the server, while a copy runs and the daemon is killed once;
    after a remount every file is intact, and on a new device too."""
    from tests.helpers.proxy import running_proxy

    plan = make_plan(SEED + 3, files=120, passes=1)
    plan_file = _write_plan(tmp_path, plan)
    model = Model(plan)
    with running_proxy(server.url) as proxy:
        drive = Drive(tmp_path / "alice", proxy.url)
        try:
            drive.signup()
            drive.mount("--fsync-timeout", "120")
            os.listdir(drive.mnt)
            faults = partial(
                proxy.faults,
                drop=0.05,
                delay=(0.0, 0.05),
                reset=0.05,
                error5xx=0.08,
                truncate=0.05,
                after_server=0.5,
                seed=SEED,
            )
            faults()
            stop = threading.Event()
            forgetter = threading.Thread(target=_forget_records, args=(proxy, stop), daemon=True)
            forgetter.start()
            try:
                writer = Writer(tmp_path, plan_file, drive.mnt, 0, "faulty-1")
                try:
                    wait_for("half the copy", lambda: len(writer.lines()) > len(plan), 300)
                    kill_daemon(drive, writer.proc)
                    inflight, fsynced = model.apply(writer.wait())
                finally:
                    writer.kill()
                # The login of the new mount gets a clean network; the
                # journal's replay that follows does not.
                proxy.clear()
                drive.mount("--fsync-timeout", "120")
                faults()
                files, dirs = scan(drive.mnt)
                problems = model.check(files, dirs, inflight, fsynced) + log_problems(drive)
                assert not problems, _failure(drive, "after the kill", problems)
                writer = Writer(tmp_path, plan_file, drive.mnt, model.next_op, "faulty-2")
                try:
                    progress = writer.wait(timeout=600)
                finally:
                    writer.kill()
                assert progress[-1] == "end", progress[-3:]
                model.apply(progress)
                wait_uploaded(drive, timeout=300)  # through the faults
                drive.umount()
            finally:
                stop.set()
                forgetter.join()
            stats = proxy.statistics()
            proxy.clear()
            check_new_device(drive, model)
        finally:
            drive.cleanup()
    # The faults really happened, of every kind: how many depends on the
    # seed (it draws both the plan, so the number of requests, and each
    # request's fault), so a bare count would fail for some seeds.
    print(f"proxy: {stats}")
    kinds = {k: stats.get(k, 0) for k in ("drop", "reset", "error", "truncate")}
    assert sum(kinds.values()) >= 10, stats
    cut, errors, cut_answers = kinds["drop"] + kinds["reset"], kinds["error"], kinds["truncate"]
    assert cut and errors and cut_answers, stats


def _forget_records(proxy: Any, stop: threading.Event) -> None:
    """The proxy records every body; chunks add up to megabytes."""
    while not stop.wait(1.0):
        proxy.forget()
