"""Two-factor authentication (TOTP, RFC 6238) against the real server: the
codes are computed here, as an authenticator app would, from the secret
the server handed out, for chosen times."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megafs.errors import (
    AlreadyExists,
    AuthFailed,
    NotFound,
    PermissionDenied,
    SecondFactorRequired,
)
from megafs.remote import RemoteClient
from megafs.wire import RECOVERY_CODE_RE, RECOVERY_CODES, TOTP_STEP
from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess
from tests.integration.users import (
    Creds,
    User,
    clear_of_step_edge,
    enable_totp,
    totp_code,
)


async def login(server: ServerProcess, creds: Creds, code: str | None = None) -> None:
    async with RemoteClient(server.url) as client:
        await client.login(creds.email, creds.auth_secret, "test", code=code)
        await client.logout()


async def test_enable_then_logins_need_a_code(alice: User, server: ServerProcess) -> None:
    secret, codes = await enable_totp(alice.client)
    assert len(codes) == RECOVERY_CODES == len(set(codes))
    assert all(RECOVERY_CODE_RE.fullmatch(code) for code in codes)

    with pytest.raises(SecondFactorRequired):
        await login(server, alice.creds)
    with pytest.raises(AuthFailed) as wrong_password:  # no hint that 2FA is on
        async with RemoteClient(server.url) as client:
            await client.login(alice.creds.email, bytes(32), "test")
    assert not isinstance(wrong_password.value, SecondFactorRequired)
    now = await clear_of_step_edge()
    await login(server, alice.creds, totp_code(secret, now))
    with pytest.raises(AlreadyExists):  # on already: no new secret
        await alice.client.totp_setup()
    assert (await alice.client.account()).root_id == alice.root  # the session stays


async def test_a_code_works_once(alice: User, server: ServerProcess) -> None:
    secret, _ = await enable_totp(alice.client)
    now = await clear_of_step_edge()
    code = totp_code(secret, now)
    await login(server, alice.creds, code)
    with pytest.raises(AuthFailed, match="already used"):
        await login(server, alice.creds, code)
    # The first code (used to enable) is of an older step: refused too.
    with pytest.raises(AuthFailed):
        await login(server, alice.creds, totp_code(secret, now - TOTP_STEP))


async def test_one_step_of_clock_skew_either_way(alice: User, server: ServerProcess) -> None:
    """Codes of the steps next to the server's are accepted, two steps away
    are not. Steps only move forward: a code of a step before the newest
    one used is refused even inside the window."""
    secret = await alice.client.totp_setup()
    now = await clear_of_step_edge()
    await alice.client.totp_enable(totp_code(secret, now - TOTP_STEP))
    for skew in (2, -2):
        with pytest.raises(AuthFailed):
            await login(server, alice.creds, totp_code(secret, now + skew * TOTP_STEP))
    await login(server, alice.creds, totp_code(secret, now))
    await login(server, alice.creds, totp_code(secret, now + TOTP_STEP))
    with pytest.raises(AuthFailed):  # fine by the clock, but older than the last used
        await login(server, alice.creds, totp_code(secret, now))


async def test_enable_needs_a_right_code_for_the_secret_shown(
    alice: User, server: ServerProcess
) -> None:
    with pytest.raises(NotFound):  # nothing to confirm yet
        await alice.client.totp_enable("123456")
    first = await alice.client.totp_setup()
    second = await alice.client.totp_setup()  # shown again: the first is void
    assert first != second
    now = await clear_of_step_edge()
    with pytest.raises(PermissionDenied, match="wrong two-factor code"):
        await alice.client.totp_enable(totp_code(first, now))
    for skew in (2, -2):
        with pytest.raises(PermissionDenied, match="wrong two-factor code"):
            await alice.client.totp_enable(totp_code(second, now + skew * TOTP_STEP))
    await login(server, alice.creds)  # still off
    await alice.client.totp_enable(totp_code(second, now))
    with pytest.raises(SecondFactorRequired):
        await login(server, alice.creds)


async def test_recovery_codes_work_once_each(alice: User, server: ServerProcess) -> None:
    _, codes = await enable_totp(alice.client)
    await login(server, alice.creds, codes[0])
    await login(server, alice.creds, codes[1].upper().replace("-", " "))  # as typed
    with pytest.raises(AuthFailed):
        await login(server, alice.creds, codes[0])
    with pytest.raises(AuthFailed):
        await login(server, alice.creds, "aaaa-bbbb-cccc-dddd")


async def test_disable_needs_the_password_and_a_code(alice: User, server: ServerProcess) -> None:
    _, codes = await enable_totp(alice.client)
    creds = alice.creds
    async with RemoteClient(server.url) as client:
        with pytest.raises(AuthFailed):
            await client.totp_disable(creds.email, bytes(32), codes[0])
        with pytest.raises(AuthFailed):
            await client.totp_disable(creds.email, creds.auth_secret, "000000")
        await client.totp_disable(creds.email, creds.auth_secret, codes[0])
        with pytest.raises(NotFound):
            await client.totp_disable(creds.email, creds.auth_secret, codes[1])
    await login(server, creds)  # no code needed any more
    await alice.client.totp_setup()  # and it can be set up anew


# -- through the command line ----------------------------------------------------------


def _secret_from(output: str) -> str:
    found = re.search(r"enter the key ([A-Z2-7]+)", output)
    assert found, output
    return found.group(1)


async def test_cli_enable_login_mount_credentials(server: ServerProcess, tmp_path: Path) -> None:
    """``2fa enable`` in two steps (a script has no terminal), then a login
    needs ``--totp-code``; a remembered login keeps working without one;
    ``2fa disable`` with a recovery code."""
    drive = Drive(tmp_path / "a", server.url, email="cli-2fa@example.org")
    drive.signup()
    shown = drive.cli("2fa", "enable", "--password-file", str(drive.password_file))
    assert "otpauth://totp/" in shown.stdout and "not on yet" in shown.stdout
    secret = _secret_from(shown.stdout)
    now = await clear_of_step_edge()
    on = drive.cli(
        "2fa",
        "enable",
        "--password-file",
        str(drive.password_file),
        "--code",
        totp_code(secret, now - TOTP_STEP),
    )
    codes = re.findall(r"^  ([a-z2-7-]{19})$", on.stdout, re.MULTILINE)
    assert len(codes) == RECOVERY_CODES, on.stdout

    refused = drive.cli(
        "login", server.url, drive.email, "--password-file", str(drive.password_file), check=False
    )
    assert refused.returncode == 3
    assert refused.stderr.strip().splitlines() == [
        "megafs: this account uses two-factor authentication: give --totp-code CODE "
        "(a code from the app, or a recovery code)"
    ]
    wrong = drive.cli(
        "login",
        server.url,
        drive.email,
        "--password-file",
        str(drive.password_file),
        "--totp-code",
        "000000",
        check=False,
    )
    assert wrong.returncode == 3 and "wrong or already used" in wrong.stderr
    drive.cli(
        "login",
        server.url,
        drive.email,
        "--password-file",
        str(drive.password_file),
        "--totp-code",
        totp_code(secret, now),
        "--remember",
    )
    # The remembered login needs neither password nor code.
    listed = drive.cli("sessions")
    assert listed.stdout.count("\n* ") == 1

    other = Drive(tmp_path / "b", server.url, email=drive.email)
    other.cli(
        "login",
        server.url,
        drive.email,
        "--password-file",
        str(drive.password_file),
        "--totp-code",
        codes[0],
    )
    off = other.cli(
        "2fa", "disable", "--password-file", str(other.password_file), "--code", codes[1]
    )
    assert "off" in off.stdout
    other.login()  # no code needed any more
