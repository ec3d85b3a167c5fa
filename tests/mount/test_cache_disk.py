"""A full disk under the local cache. While it is full of changes waiting
for upload, saving fails with ENOSPC, the daemon keeps serving, and once
there is room again everything it accepted reaches the server. While what
fills it is other programs' files, the cache gives back the room of the
chunks the server has, and reads go on without caching. Real mounts on a
small tmpfs as the cache directory."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess
from tests.helpers.tools import fill_disk, small_disk, wait_for
from tests.mount.test_crash import wait_uploaded

pytestmark = pytest.mark.mount


@contextmanager
def _cache_on_small_disk(drive: Drive, tmp_path: Path, size: str) -> Iterator[Path]:
    """The drive's cache directory on a disk of ``size`` of its own (its log
    kept elsewhere, so it can say what happened once that disk is full)."""
    with small_disk(drive.cache, size):
        (drive.cache / "daemon.log").symlink_to(tmp_path / "daemon.log")
        try:
            yield drive.cache
        finally:
            drive.cleanup()


def _free(disk: Path) -> int:
    return shutil.disk_usage(disk).free


def _cached_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "chunks").glob("*/*"))


def test_a_cache_disk_full_of_changes_waiting_for_upload_is_enospc_and_they_reach_the_server(
    drive: Drive, server: ServerProcess, tmp_path: Path
) -> None:
    with _cache_on_small_disk(drive, tmp_path, "16m") as disk:
        filler = disk / "filler"
        filler.write_bytes(bytes(4 << 20))  # room to make later
        drive.mount()
        os.listdir(drive.mnt)  # kept, to work without the server
        server.stop()  # every chunk waits for upload: none can be given back
        rng = random.Random(7)
        accepted: dict[str, bytes] = {}
        refused: list[int] = []
        # Files of 20 KB, each a chunk of its own: 40 MB, more than the disk.
        for i in range(2000):
            data = rng.randbytes(20_000)
            try:
                (drive.mnt / f"f{i:04d}").write_bytes(data)
            except OSError as exc:
                refused.append(exc.errno)
                if len(refused) >= 20:
                    break
            else:
                accepted[f"f{i:04d}"] = data
        assert refused and set(refused) == {errno.ENOSPC}, refused
        assert len(accepted) > 100

        # Still serving (never ENOTCONN): listing and reading what was accepted.
        assert os.path.ismount(drive.mnt)
        assert len(os.listdir(drive.mnt)) >= len(accepted)
        some = sorted(accepted)[len(accepted) // 2]
        assert (drive.mnt / some).read_bytes() == accepted[some]

        filler.unlink()  # room again, and the server back: the journal drains
        server.start()
        drive.umount()
        assert "unexpected failure" not in drive.daemon_log()
    drive.drop_cache()

    drive.mount()  # a new machine: everything from the server
    for name, data in accepted.items():
        assert (drive.mnt / name).read_bytes() == data, name
    drive.umount()


def test_a_cache_disk_filled_by_other_programs_gets_the_caches_room_back_and_reads_go_on(
    drive: Drive, tmp_path: Path
) -> None:
    rng = random.Random(8)
    big, saved = rng.randbytes(40 << 20), rng.randbytes(8 << 20)
    with _cache_on_small_disk(drive, tmp_path, "200m") as disk:
        drive.mount()
        (drive.mnt / "big").write_bytes(big)
        drive.umount()  # on the server, and in the cache
        drive.mount()
        assert _cached_bytes(disk) >= len(big)

        # Another program fills the disk: the cache gives its room back.
        fillers = [fill_disk(disk / "filler-0")]
        wait_for(  # (the log line comes once the index forgot them too)
            "the cache giving back its room, and saying so",
            lambda: (
                _free(disk) >= 32 << 20
                and _cached_bytes(disk) < 1 << 20
                and bool(re.search(r"gave back \d+ MiB of cached chunks", drive.daemon_log()))
            ),
        )
        (drive.mnt / "saved").write_bytes(saved)  # not ENOSPC

        # Full, with nothing left to give back once `saved` is uploaded.
        wait_uploaded(drive)
        while True:
            fillers.append(fill_disk(disk / f"filler-{len(fillers)}"))
            time.sleep(1.5)  # for the cache to give back whatever it can
            if _free(disk) < 1 << 20:
                break
        # Read for the first time in this mount, so from the server: served,
        # though not cached.
        assert (drive.mnt / "big").read_bytes() == big
        assert "downloaded chunks are not cached meanwhile" in drive.daemon_log()
        assert os.path.ismount(drive.mnt)

        for filler in fillers:
            filler.unlink()
        drive.umount()
        assert "unexpected failure" not in drive.daemon_log()
    drive.drop_cache()

    drive.mount()  # a new machine: everything from the server
    assert (drive.mnt / "big").read_bytes() == big
    assert (drive.mnt / "saved").read_bytes() == saved
    drive.umount()
