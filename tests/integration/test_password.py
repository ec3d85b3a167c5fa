"""Changing the password, and resetting a forgotten one with the recovery
key: the master key stays the same (nothing is re-encrypted), only its
wrap changes, and every other session ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from megafs.crypto import KdfParams, derive_password_keys, unwrap_master_key
from megafs.errors import AuthFailed, PermissionDenied
from megafs.remote import RemoteClient
from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess
from tests.integration.users import User


async def master_key(url: str, email: str, password: str) -> tuple[bytes, bytes]:
    """(master key, root id) as a client with ``password`` unlocks them:
    the KDF parameters and keyblob the server has now, the KEK derived
    from the password."""
    async with RemoteClient(url) as client:
        params = KdfParams.from_json(await client.prelogin(email))
        pw = await trio.to_thread.run_sync(derive_password_keys, password.encode(), params)
        session = await client.login(email, pw.auth_secret, "check")
        await client.logout()
    return unwrap_master_key(pw.kek, session.account.keyblob)


def write(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    return str(path)


async def test_passwd(server: ServerProcess, tmp_path: Path) -> None:
    drive = Drive(tmp_path / "a", server.url, email="passwd@example.org")
    drive.signup()
    old_password = drive.password_file.read_text().strip()
    before = await master_key(server.url, drive.email, old_password)
    drive.cli(
        "login", server.url, drive.email, "--password-file", str(drive.password_file), "--remember"
    )
    other = Drive(tmp_path / "b", server.url, email=drive.email)
    other.cli(
        "login", server.url, drive.email, "--password-file", str(other.password_file), "--remember"
    )
    new_file = write(tmp_path / "new", "a brand new passphrase")

    wrong = drive.cli(
        "passwd",
        "--password-file",
        write(tmp_path / "bad", "not it at all"),
        "--new-password-file",
        new_file,
        check=False,
    )
    assert wrong.returncode == 3, wrong.stderr
    short = drive.cli(
        "passwd",
        "--password-file",
        str(drive.password_file),
        "--new-password-file",
        write(tmp_path / "short", "short"),
        check=False,
    )
    assert short.returncode == 1 and "at least 8" in short.stderr

    drive.cli(
        "passwd", "--password-file", str(drive.password_file), "--new-password-file", new_file
    )
    assert await master_key(server.url, drive.email, "a brand new passphrase") == before
    with pytest.raises(AuthFailed):
        await master_key(server.url, drive.email, old_password)
    drive.cli("sessions")  # the session that changed it (remembered here) lives on
    revoked = other.cli("sessions", check=False)
    assert revoked.returncode == 3 and "revoked" in revoked.stderr
    other.cli("login", server.url, drive.email, "--password-file", new_file)


async def test_password_change_needs_the_current_password(alice: User) -> None:
    """A session alone cannot change the password (nor set a recovery key)."""
    kdf = alice.creds.kdf
    with pytest.raises(PermissionDenied):
        await alice.client.change_password(os.urandom(32), kdf, os.urandom(32), b"k")
    with pytest.raises(PermissionDenied):
        await alice.client.set_recovery_key(os.urandom(32), os.urandom(32), b"k")
    await alice.client.change_password(alice.creds.auth_secret, kdf, os.urandom(32), b"k")
    assert (await alice.client.account()).keyblob == b"k"  # this session stays


async def test_recovery_key_resets_a_forgotten_password(
    server: ServerProcess, tmp_path: Path
) -> None:
    drive = Drive(tmp_path / "a", server.url, email="recovery@example.org")
    drive.signup()
    old_password = drive.password_file.read_text().strip()
    before = await master_key(server.url, drive.email, old_password)
    drive.cli(
        "login", server.url, drive.email, "--password-file", str(drive.password_file), "--remember"
    )
    shown = drive.cli("recovery-key", "--password-file", str(drive.password_file)).stdout
    key = shown.split("\n\n")[1].strip()
    assert len(key.split("-")) == 13, shown

    fresh = Drive(tmp_path / "b", server.url, email=drive.email)
    new_file = write(tmp_path / "new", "chosen after forgetting")
    bad = fresh.cli(
        "login",
        server.url,
        drive.email,
        "--recovery-key-file",
        write(tmp_path / "bad-key", key[:-4] + "AAAA"),
        "--password-file",
        new_file,
        check=False,
    )
    assert bad.returncode == 3 and "wrong email or recovery key" in bad.stderr
    fresh.cli(
        "login",
        server.url,
        drive.email,
        "--recovery-key-file",
        write(tmp_path / "key", key.lower().replace("-", " ")),
        "--password-file",
        new_file,
        "--remember",
    )

    assert await master_key(server.url, drive.email, "chosen after forgetting") == before
    with pytest.raises(AuthFailed):
        await master_key(server.url, drive.email, old_password)
    ended = drive.cli("sessions", check=False)  # every earlier session ended
    assert ended.returncode == 3
    fresh.cli("sessions")


async def test_recovery_needs_the_right_key_and_says_nothing_else(
    alice: User, server: ServerProcess
) -> None:
    async with RemoteClient(server.url) as client:
        answers = []
        for email in (alice.creds.email, "nobody-at-all@example.org"):
            with pytest.raises(AuthFailed) as failed:
                await client.recovery_start(email, os.urandom(32))
            answers.append(failed.value.detail)
        recovery_auth = os.urandom(32)
        await alice.client.set_recovery_key(alice.creds.auth_secret, recovery_auth, b"wrap")
        assert await client.recovery_start(alice.creds.email, recovery_auth) == b"wrap"
        with pytest.raises(AuthFailed) as failed:
            await client.recovery_start(alice.creds.email, os.urandom(32))
        answers.append(failed.value.detail)
    assert len(set(answers)) == 1
