"""Sessions: listed with their device and times, revoked one by one or all
but the current one (refused at once), expiring when unused."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from megafs.errors import AuthFailed, InvalidRequest, NotFound
from megafs.remote import RemoteClient
from megafs.server import SQLiteMetadataStore
from megafs.wire import LONG_SESSION_IDLE_SECONDS, SESSION_IDLE_SECONDS
from tests.helpers.drive import Drive
from tests.helpers.schema import UNDO_V3
from tests.helpers.server import ServerProcess
from tests.integration.users import User


async def test_list_and_revoke(alice: User, bob: User, server: ServerProcess) -> None:
    async with RemoteClient(server.url) as laptop, RemoteClient(server.url) as phone:
        await laptop.login(alice.creds.email, alice.creds.auth_secret, "laptop", long_lived=True)
        await phone.login(alice.creds.email, alice.creds.auth_secret, "phone")
        sessions = await laptop.sessions()
        assert [s.device for s in sessions] == ["test-device", "laptop", "phone"]
        assert [s.current for s in sessions] == [False, True, False]
        now = time.time()
        for session in sessions:
            assert abs(session.created - now) < 60 and session.last_seen >= session.created
        long_lived, short = sessions[1], sessions[2]
        assert abs(long_lived.expires - now - LONG_SESSION_IDLE_SECONDS) < 60
        assert abs(short.expires - now - SESSION_IDLE_SECONDS) < 60

        await laptop.revoke_session(short.id)
        with pytest.raises(AuthFailed):  # at once
            await phone.account()
        with pytest.raises(NotFound):
            await laptop.revoke_session(short.id)
        with pytest.raises(NotFound):  # another account's session does not exist
            await bob.client.revoke_session(long_lived.id)
        with pytest.raises(InvalidRequest):
            await laptop.revoke_session("../account")

        assert await laptop.revoke_other_sessions() == 1
        with pytest.raises(AuthFailed):
            await alice.client.account()
        assert [s.device for s in await laptop.sessions()] == ["laptop"]
        assert await bob.client.account()  # bob's sessions are his own


async def test_an_unused_session_expires_a_used_one_lives_on(
    alice: User, server: ServerProcess
) -> None:
    token = alice.client.token
    assert token is not None
    token_hash = hashlib.sha256(token.encode()).digest()
    now = int(time.time())
    with sqlite3.connect(server.data_dir / "meta.sqlite3") as db:
        db.execute("PRAGMA busy_timeout=10000")
        db.execute(
            "UPDATE sessions SET last_seen = ?, expires = ? WHERE token_hash = ?",
            (now - 3600, now + 5, token_hash),
        )
    db.close()
    await alice.client.account()  # used: pushed forward by its idle time
    (session,) = [s for s in await alice.client.sessions() if s.current]
    assert session.expires >= now + SESSION_IDLE_SECONDS


async def test_a_version_1_database_is_upgraded(tmp_path: Path) -> None:
    """Sessions of a server from before session ids keep working."""
    path = tmp_path / "meta.sqlite3"
    meta = await trio.to_thread.run_sync(SQLiteMetadataStore, path)
    account = await meta.create_account(
        "a@example.org", {}, b"h", b"k", "00" * 16, b"m", quota=1000, now=1
    )
    await meta.add_session(
        b"t" * 32, "0123456789abcdef", account.id, "old", now=1, idle_seconds=10**9
    )
    await meta.aclose()
    with sqlite3.connect(path) as db:  # what version 1 had
        for table in ("totp", "recovery_codes", "recovery_keys", "throttle"):
            db.execute(f"DROP TABLE {table}")
        db.execute("DROP INDEX sessions_id")
        db.execute("DROP INDEX sessions_account")
        db.execute("ALTER TABLE sessions DROP COLUMN id")
        db.execute("ALTER TABLE sessions DROP COLUMN idle_seconds")
        for statement in UNDO_V3:
            db.execute(statement)
        db.execute("UPDATE server_config SET value = '1' WHERE key = 'schema_version'")
    db.close()
    meta = await trio.to_thread.run_sync(SQLiteMetadataStore, path)
    try:
        session = await meta.session(b"t" * 32, now=2)
        assert session is not None and re.fullmatch("[0-9a-f]{16}", session.id)
        assert await meta.totp(account.id) is None
    finally:
        await meta.aclose()


def test_cli_sessions(server: ServerProcess, tmp_path: Path) -> None:
    drive = Drive(tmp_path / "a", server.url, email="cli-sessions@example.org")
    drive.signup()
    drive.cli(
        "login", server.url, drive.email, "--password-file", str(drive.password_file), "--remember"
    )
    other = Drive(tmp_path / "b", server.url, email=drive.email)
    other.cli(
        "login", server.url, drive.email, "--password-file", str(other.password_file), "--remember"
    )
    listed = drive.cli("sessions").stdout
    rows = re.findall(r"^([* ]) ([0-9a-f]{16}) ", listed, re.MULTILINE)
    assert len(rows) == 2, listed
    (mine,) = [sid for mark, sid in rows if mark == "*"]
    (theirs,) = [sid for mark, sid in rows if mark == " "]

    usage = drive.cli("sessions", "revoke", check=False)
    assert usage.returncode == 2 and "--all-others" in usage.stderr
    assert drive.cli("sessions", "revoke", "0" * 16, check=False).returncode == 1
    drive.cli("sessions", "revoke", theirs)
    gone = other.cli("sessions", check=False)
    assert gone.returncode == 3 and "revoked or has expired" in gone.stderr
    assert f"* {mine} " in drive.cli("sessions").stdout
    assert "0 other sessions ended" in drive.cli("sessions", "revoke", "--all-others").stdout
