"""Running the server: stores, HTTP (Hypercorn's trio worker), garbage
collection and signals, in one nursery.

Lifecycle of :func:`serve`: lock the data directory, open the stores, bind,
announce (``task_status`` and ``server.json``), serve until SIGTERM or
SIGINT, then let requests in flight finish (up to ``GRACEFUL_SECONDS``),
stop the collector, close the stores and remove ``server.json``.

Transport: plain HTTP by default (for loopback, or behind a reverse proxy
that terminates TLS: docs/deploy.md), HTTPS with ``tls``. A client that
stops sending (or reading) is dropped after ``READ_TIMEOUT`` seconds, an
idle kept-alive connection after ``KEEP_ALIVE_SECONDS``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import socket
import sqlite3
import ssl
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import hypercorn.trio
import hypercorn.trio.tcp_server
import trio
from hypercorn.config import Config
from hypercorn.middleware import ProxyFixMiddleware
from hypercorn.typing import ASGIFramework, Framework

from megafs.server.app import create_app
from megafs.server.auth import DEFAULT_LIMITS, LoginLimits
from megafs.server.chunks import ChunkStore, LocalChunkStore
from megafs.server.gc import DEFAULT_CHANGE_RETENTION, collect_garbage
from megafs.server.metadata import MetadataStore, SQLiteMetadataStore

# Hypercorn reads a connection 64 KiB at a time, so a 1 MiB chunk upload
# crosses h11 and the ASGI queue in 16 pieces. Reading up to 1 MiB at once
# cuts the server's CPU per chunk upload by about a fifth (6.5 -> 5.0 ms,
# scripts/bench-server --workloads write). Hypercorn has no setting for it.
hypercorn.trio.tcp_server.MAX_RECV = 1 << 20

__all__ = [
    "DEFAULT_QUOTA",
    "GC_INTERVAL",
    "GRACEFUL_SECONDS",
    "KEEP_ALIVE_SECONDS",
    "READ_TIMEOUT",
    "ServerStartError",
    "TlsFiles",
    "add_security_arguments",
    "parse_listen",
    "run_server",
    "security_options",
    "serve",
]

log = logging.getLogger(__name__)

#: Seconds between garbage collection passes (the first runs at startup).
GC_INTERVAL = 600.0
#: How long requests in flight may take to finish after SIGTERM.
GRACEFUL_SECONDS = 10.0
DEFAULT_QUOTA = 50 * 2**30
#: Seconds a connection may go without sending a byte of a request it
#: started (a slow-loris client holds nothing longer than this).
READ_TIMEOUT = 60
#: Seconds an idle kept-alive connection stays open: longer than httpx
#: keeps one in its pool (5 s), so the client, not the server, closes it
#: and never sends a request on a connection the server is closing.
KEEP_ALIVE_SECONDS = 20


@dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate (chain) and its private key: serve HTTPS."""

    cert: Path
    key: Path


class ServerStartError(Exception):
    """The server cannot start: the data directory, the database or the
    address is unusable. The message is one line, fit for the user."""


async def serve(
    data_dir: Path,
    host: str,
    port: int,
    *,
    default_quota: int = DEFAULT_QUOTA,
    limits: LoginLimits = DEFAULT_LIMITS,
    tls: TlsFiles | None = None,
    behind_proxy: bool = False,
    change_retention: int = DEFAULT_CHANGE_RETENTION,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API on ``host:port`` (0: any free port) with the data in
    ``data_dir``, until SIGTERM or SIGINT; ``task_status.started`` receives
    the port once connections are accepted. ``behind_proxy``: take the
    client's address from the last ``X-Forwarded-For`` entry (the one the
    reverse proxy added), for throttling and logs. ``change_retention``:
    seconds the change feed remembers a delete.

    Must run in the main thread (it handles signals). Raises
    ServerStartError before anything is served if it cannot start.
    Cancellation stops it at once, without the graceful phase.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with _open_stores(data_dir) as (meta, chunks):
            # Starlette's and Hypercorn's ASGI type declarations differ in form only.
            stopping = trio.Event()
            app = cast(
                ASGIFramework,
                create_app(
                    meta, chunks, default_quota=default_quota, limits=limits, stopping=stopping
                ),
            )
            if behind_proxy:
                app = ProxyFixMiddleware(app, mode="legacy", trusted_hops=1)
            config = _hypercorn_config(tls)
            listener = _bind(host, port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_collect_garbage_forever, meta, chunks, change_retention)
                await _serve_http(
                    app,
                    config,
                    listener,
                    signals,
                    stopping,
                    data_dir / "server.json",
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()
    log.info("stopped")


async def _serve_http(
    app: ASGIFramework,
    config: Config,
    listener: socket.socket,
    signals: AsyncIterator[int],
    stopping: trio.Event,
    info: Path,
    *,
    task_status: trio.TaskStatus[int],
) -> None:
    """Serve until a signal, then shut down gracefully. ``info`` (the
    server.json others find the server by) exists exactly while serving."""
    host, port = listener.getsockname()[:2]
    scheme = "https" if config.ssl_enabled else "http"
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
    # Hypercorn adopts the bound socket by descriptor; detach() hands the
    # descriptor over so it is closed once, by Hypercorn.
    config.bind = [f"fd://{listener.detach()}"]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    hypercorn.trio.serve,
                    cast(Framework, app),
                    config,
                    shutdown_trigger=partial(_next_signal, signals, stopping),
                )
            )
            await trio.to_thread.run_sync(
                _write_atomically, info, json.dumps({"url": url, "pid": os.getpid()})
            )
            log.info("serving on %s", url)
            task_status.started(port)
    finally:
        info.unlink(missing_ok=True)


async def _next_signal(signals: AsyncIterator[int], stopping: trio.Event) -> None:
    async for signum in signals:
        log.info("%s: finishing the requests in flight", signal.Signals(signum).name)
        stopping.set()  # long polls answer now rather than at their end
        return


@asynccontextmanager
async def _open_stores(data_dir: Path) -> AsyncIterator[tuple[MetadataStore, ChunkStore]]:
    """Lock the data directory (one server per directory: chunk locks are
    in-process) and open both stores; closes them on exit, even when
    cancelled."""

    def open_all() -> tuple[int, SQLiteMetadataStore, LocalChunkStore]:
        lock = None
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = os.open(data_dir / "server.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ServerStartError(f"another megafs server is using {data_dir}") from None
            return lock, SQLiteMetadataStore(data_dir / "meta.sqlite3"), LocalChunkStore(data_dir)
        except (OSError, sqlite3.Error) as exc:
            if lock is not None:
                os.close(lock)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ServerStartError(f"cannot use the data directory {data_dir}: {reason}") from exc

    lock, meta, chunks = await trio.to_thread.run_sync(open_all)
    try:
        yield meta, chunks
    finally:
        with trio.CancelScope(shield=True):
            await chunks.aclose()
            await meta.aclose()
            os.close(lock)


def _bind(host: str, port: int) -> socket.socket:
    """The listening address, bound here so a busy port is a clear error."""
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _hypercorn_config(tls: TlsFiles | None) -> Config:
    """Hypercorn's settings; with ``tls``, its certificate and key are
    loaded here so an unusable one stops the start with a clear message."""
    config = Config()
    config.accesslog = None  # the app logs one line per request itself
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_SECONDS
    config.read_timeout = READ_TIMEOUT
    config.keep_alive_timeout = KEEP_ALIVE_SECONDS
    if tls is not None:
        config.certfile, config.keyfile = str(tls.cert), str(tls.key)
        try:
            config.create_ssl_context()
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ServerStartError(
                f"cannot use the TLS certificate {tls.cert} and key {tls.key}: {reason}"
            ) from exc
    return config


async def _collect_garbage_forever(
    meta: MetadataStore, chunks: ChunkStore, change_retention: int
) -> None:
    while True:
        try:
            await collect_garbage(meta, chunks, now=time.time(), change_retention=change_retention)
        except Exception:
            log.exception("garbage collection failed; next attempt in %.0f s", GC_INTERVAL)
        await trio.sleep(GC_INTERVAL)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port); ValueError
    if malformed."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen must be HOST:PORT, not {listen!r}")
    return host, int(port)


def run_server(
    data_dir: Path,
    listen: str,
    *,
    default_quota: int,
    limits: LoginLimits = DEFAULT_LIMITS,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    behind_proxy: bool = False,
    change_retention: int = DEFAULT_CHANGE_RETENTION,
) -> int:
    """Run the server in the foreground until SIGTERM or SIGINT; returns an
    exit code: 0 after a clean stop; 1 if it cannot start and 2 for a
    malformed ``listen`` or only one of ``tls_cert`` and ``tls_key``, each
    with one line on stderr."""
    try:
        host, port = parse_listen(listen)
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
    except ValueError as exc:
        print(f"megafs: {exc}", file=sys.stderr)
        return 2
    tls = TlsFiles(tls_cert, tls_key) if tls_cert and tls_key else None
    try:
        trio.run(
            partial(
                serve,
                data_dir,
                host,
                port,
                default_quota=default_quota,
                limits=limits,
                tls=tls,
                behind_proxy=behind_proxy,
                change_retention=change_retention,
            )
        )
    except ServerStartError as exc:
        print(f"megafs: {exc}", file=sys.stderr)
        return 1
    return 0


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """The transport, login-throttling and retention options, shared by
    ``megafs server`` and ``python -m megafs.server``;
    :func:`security_options` turns them into :func:`run_server` arguments."""
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        type=Path,
        help="serve HTTPS with this certificate (chain); needs --tls-key",
    )
    parser.add_argument("--tls-key", metavar="PEM", type=Path, help="the certificate's private key")
    parser.add_argument(
        "--behind-proxy",
        action="store_true",
        help="a reverse proxy forwards the requests: take the client's address "
        "from the last X-Forwarded-For entry",
    )
    parser.add_argument(
        "--failed-logins-per-account",
        metavar="N",
        type=_count,
        default=DEFAULT_LIMITS.account_free,
        help="failed logins in a row an email may have before it is locked "
        f"out for a while (default {DEFAULT_LIMITS.account_free})",
    )
    parser.add_argument(
        "--failed-logins-per-address",
        metavar="N",
        type=_count,
        default=DEFAULT_LIMITS.address_free,
        help=f"the same for a client address (default {DEFAULT_LIMITS.address_free})",
    )
    parser.add_argument(
        "--change-retention-days",
        metavar="N",
        type=_count,
        default=DEFAULT_CHANGE_RETENTION // 86400,
        help="days the change feed remembers deleted files; a client that has not "
        f"synced for longer lists everything again (default {DEFAULT_CHANGE_RETENTION // 86400})",
    )


def security_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "behind_proxy": args.behind_proxy,
        "change_retention": args.change_retention_days * 86400,
        "limits": LoginLimits(
            account_free=args.failed_logins_per_account, address_free=args.failed_logins_per_address
        ),
    }


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a count: {text!r}")
    return int(text)
