"""The account's quota in the mount: ``df`` shows it, a write that would go
past it is ENOSPC before any of it is accepted, and what was accepted
reaches the server whole."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.drive import Drive
from tests.helpers.server import running_server

MIB = 1 << 20
QUOTA = 6 * MIB


def _write(path: Path, data: bytes) -> int:
    """Write ``data``; returns how much was written before ENOSPC (or all).

    Unbuffered: each piece is one write(2), so a refused one is not left in
    a buffer for close() to try again."""
    done = 0
    with open(path, "wb", buffering=0) as f:
        try:
            for start in range(0, len(data), 256 * 1024):
                piece = data[start : start + 256 * 1024]
                assert f.write(piece) == len(piece)
                done = start + len(piece)
            os.fsync(f.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return done
    return done


def test_quota_full_is_enospc_and_loses_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path / "server", quota=QUOTA) as server:
        drive = Drive(tmp_path / "alice", server.url)
        drive.signup()
        try:
            drive.mount()
            df = subprocess.run(
                ["df", "-B1", "--output=size", str(drive.mnt)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            assert int(df[-1]) == QUOTA

            kept = os.urandom(2 * MIB)
            assert _write(drive.mnt / "kept.bin", kept) == len(kept)
            big = os.urandom(8 * MIB)
            written = _write(drive.mnt / "big.bin", big)
            assert written < len(big), "a write past the quota was accepted"
            # What was accepted of the big file is there, byte for byte.
            assert (drive.mnt / "big.bin").read_bytes() == big[:written]
            with pytest.raises(OSError) as failed:
                (drive.mnt / "more.bin").write_bytes(os.urandom(4 * MIB))
            assert failed.value.errno == errno.ENOSPC

            # Everything accepted reached the server, nothing more.
            drive.umount()
            drive.drop_cache()
            drive.mount()
            assert (drive.mnt / "kept.bin").read_bytes() == kept
            assert (drive.mnt / "big.bin").read_bytes() == big[:written]
            # (more.bin was created, then its first write refused: empty, as on ext4.)
            assert (drive.mnt / "more.bin").read_bytes() == b""
            assert sorted(os.listdir(drive.mnt)) == ["big.bin", "kept.bin", "more.bin"]
        finally:
            drive.cleanup()
