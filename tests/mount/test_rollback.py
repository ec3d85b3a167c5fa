"""Rule 8: the client remembers the newest revision of every node it has
seen and refuses an older one, even across remounts."""

from __future__ import annotations

import os
import sqlite3

import pytest

from tests.helpers.drive import Drive

pytestmark = pytest.mark.mount


def _rows(server) -> dict[str, tuple[bytes, bytes | None]]:
    with sqlite3.connect(server.data_dir / "meta.sqlite3") as db:
        return {
            i: (bytes(m), c if c is None else bytes(c))
            for i, m, c in db.execute("SELECT id, meta, content FROM nodes")
        }


def test_server_rollback_of_a_seen_node_is_refused(drive: Drive, server) -> None:
    drive.mount()
    (drive.mnt / "report.txt").write_text("version one")
    (drive.mnt / "other.txt").write_text("untouched")
    drive.umount()
    old = _rows(server)

    drive.mount()
    (drive.mnt / "report.txt").write_text("version two, newer")
    drive.umount()
    new = _rows(server)
    changed = [i for i in old if i in new and old[i] != new[i]]
    assert changed, "the rewrite changed no node on the server"

    # The server (or whoever controls it) puts the old records back. The
    # client lists from its own copy while the change feed says nothing
    # changed, so the server also claims to have forgotten old deletes,
    # which makes the client list everything from the server again.
    server.stop()
    with sqlite3.connect(server.data_dir / "meta.sqlite3") as db:
        for node_id in changed:
            meta, content = old[node_id]
            db.execute(
                "UPDATE nodes SET meta = ?, content = ? WHERE id = ?", (meta, content, node_id)
            )
        db.execute("UPDATE accounts SET change_seq = change_seq + 1, pruned_seq = change_seq + 1")
    server.start()

    drive.mount()  # same cache dir: the client remembers what it saw
    names = os.listdir(drive.mnt)
    assert "other.txt" in names
    assert (drive.mnt / "other.txt").read_text() == "untouched"
    # The rolled-back file is never shown with its old content.
    if "report.txt" in names:
        with pytest.raises(OSError):
            (drive.mnt / "report.txt").read_text()
    assert "rollback" in drive.daemon_log()
    drive.umount()
