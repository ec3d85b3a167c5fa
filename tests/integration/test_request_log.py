"""The server logs one structured line per request, and never a token, a
secret, a code or an email."""

from __future__ import annotations

import os
import re

import httpx

from megafs.remote import RemoteClient
from megafs.wire import API_PREFIX, b64e
from tests.helpers.server import ServerProcess
from tests.integration.users import enable_totp, new_user

LINE = re.compile(
    r"INFO megafs\.server\.app: request method=[A-Z]+ path=\S+ status=(\d{3}|-) "
    r"ms=\d+ client=\S+$"
)


async def test_one_line_per_request_without_secrets(own_server: ServerProcess) -> None:
    user = await new_user(own_server.url)
    async with user.client as client:
        _, codes = await enable_totp(client)
        async with RemoteClient(own_server.url) as other:
            await other.login(user.creds.email, user.creds.auth_secret, "d", code=codes[0])
            await other.sessions()
    async with httpx.AsyncClient(base_url=own_server.url + API_PREFIX) as http:
        await http.get("/nodes/x%0Aforged line%20status=200")
        await http.post(
            "/login?email=" + user.creds.email,
            json={"email": user.creds.email, "auth_secret": b64e(os.urandom(32)), "device": "d"},
        )
    assert own_server.stop() == 0

    lines = [line for line in own_server.log().splitlines() if " request " in line]
    assert len(lines) >= 7
    assert all(LINE.search(line) for line in lines), lines
    assert all(line.count(" status=") == 1 for line in lines)  # no forged fields
    assert any("forged" in line for line in lines)
    log = own_server.log()
    for secret in (
        user.creds.email,
        user.creds.email.split("@")[0],
        user.session.token,
        b64e(user.creds.auth_secret),
        codes[0],
        user.creds.kdf["salt"],
    ):
        assert secret not in log, secret
