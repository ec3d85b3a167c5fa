"""``megafs quickstart``: the embedded default, on one machine.

Starts a megafs server on loopback with its data under the XDG data dir
(reusing one that is already running), creates an account on first run
with a random password whose unlocked key is remembered (the server is this
machine's own), and mounts. Running it again is harmless.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import trio

from megafs.cli.config import AccountConfig, Credentials, Paths, default_device
from megafs.errors import MegafsError

__all__ = ["quickstart"]


def _server_url(data_dir: Path) -> str | None:
    """The URL of a server already running on ``data_dir``, if it answers."""
    from megafs.remote import RemoteClient

    try:
        info = json.loads((data_dir / "server.json").read_text())
        url, pid = str(info["url"]), int(info["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None

    async def health() -> bool:
        try:
            async with RemoteClient(url, timeout=3, retries=0) as remote:
                await remote.health()
            return True
        except MegafsError:
            return False

    return url if trio.run(health) else None


def _start_server(data_dir: Path, listen: str) -> str:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (data_dir / "server.json").unlink(missing_ok=True)
    with open(data_dir / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "megafs", "server", "--data", str(data_dir), "--listen", listen],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        url = _server_url(data_dir)
        if url:
            return url
        if proc.poll() is not None:
            raise _fail(f"the local server did not start; see {data_dir / 'server.log'}")
        time.sleep(0.1)
    proc.terminate()
    raise _fail(f"the local server did not answer in time; see {data_dir / 'server.log'}")


def _fail(message: str) -> Exception:
    from megafs.cli.main import CliError

    return CliError(message)


def quickstart(args: argparse.Namespace, paths: Paths) -> int:
    from megafs.cli.account import signup
    from megafs.cli.main import _is_mounted, build_parser, cmd_mount
    from megafs.cli.security import remember
    from megafs.remote import RemoteClient

    data_dir = Paths.default_server_dir()
    url = _server_url(data_dir)
    if url:
        print(f"using the megafs server already running at {url} (data in {data_dir})")
    else:
        url = _start_server(data_dir, args.listen)
        print(f"started a megafs server at {url} (data in {data_dir})")

    account = AccountConfig.load(paths)
    marker = data_dir / "quickstart-account"
    ours = marker.read_text().strip() if marker.exists() else None
    if account is not None and account.email == ours and Credentials.load(paths, account):
        if account.server != url:  # the local server came back on another port
            account = AccountConfig(server=url, email=account.email, device=account.device)
            account.save(paths)
        print(f"using account {account.email}")
    else:
        email = f"{os.environ.get('USER') or 'me'}@{default_device()}"
        password = secrets.token_urlsafe(24).encode()
        device = default_device()

        async def create():  # type: ignore[no-untyped-def]
            async with RemoteClient(url) as remote:
                return await signup(
                    remote,
                    email,
                    password,
                    device,
                    uid=os.getuid(),
                    gid=os.getgid(),
                    long_lived=True,
                )

        unlocked = trio.run(create)
        account = AccountConfig(server=url, email=email, device=device)
        account.save(paths)
        marker.write_text(email + "\n")
        where = remember(paths, account, unlocked)
        print(f"created account {email}; its key is remembered in {where}")

    mountpoint = Path(args.mountpoint).expanduser().absolute()
    if _is_mounted(mountpoint):
        print(f"{mountpoint} is already mounted")
    else:
        mountpoint.mkdir(parents=True, exist_ok=True)
        # The mount command's own parser supplies every default.
        mount_args = build_parser().parse_args(
            ["mount", str(mountpoint), "--cache-size", str(args.cache_size)]
        )
        code = cmd_mount(mount_args, paths)
        if code:
            return code
    pid = json.loads((data_dir / "server.json").read_text())["pid"]
    print(
        "\nEverything you put in the folder is encrypted before it leaves this process.\n"
        f"  stop the drive:   megafs umount {mountpoint}\n"
        f"  stop the server:  kill {pid}\n"
        f"  start again:      megafs quickstart {mountpoint}"
    )
    return 0
