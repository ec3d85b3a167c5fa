"""A full disk under the local cache: saving fails with ENOSPC, the daemon
keeps serving, and once there is room again everything it accepted reaches
the server. Real mounts on a small tmpfs as the cache directory."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.drive import Drive
from tests.helpers.tools import small_disk

pytestmark = pytest.mark.mount


@pytest.fixture
def small_cache_disk(drive: Drive, tmp_path: Path) -> Iterator[Path]:
    """The drive's cache directory on a 16 MiB disk of its own (its log
    kept elsewhere, so it can say what happened once that disk is full)."""
    with small_disk(drive.cache, "16m"):
        (drive.cache / "daemon.log").symlink_to(tmp_path / "daemon.log")
        try:
            yield drive.cache
        finally:
            drive.cleanup()


def test_a_full_cache_disk_is_enospc_and_what_was_accepted_reaches_the_server(
    drive: Drive, small_cache_disk: Path
) -> None:
    filler = small_cache_disk / "filler"
    filler.write_bytes(bytes(4 << 20))  # room to make later
    drive.mount()
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

    filler.unlink()  # room again: the journal drains
    drive.umount()
    assert "unexpected failure" not in drive.daemon_log()
    subprocess.run(["umount", str(small_cache_disk)], check=True)
    drive.drop_cache()

    drive.mount()  # a new machine: everything from the server
    for name, data in accepted.items():
        assert (drive.mnt / name).read_bytes() == data, name
    drive.umount()
