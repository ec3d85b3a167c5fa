"""Running the server: stores, HTTP (Hypercorn's trio worker), garbage
collection and signals, in one nursery.

Lifecycle of :func:`serve`: lock the data directory, open the stores, bind,
announce (``task_status`` and ``server.json``), serve until SIGTERM or
SIGINT, then let requests in flight finish (up to ``GRACEFUL_SECONDS``),
stop the collector, close the stores and remove ``server.json``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import cast

import hypercorn.trio
import trio
from hypercorn.config import Config
from hypercorn.typing import Framework
from starlette.applications import Starlette

from megafs.server.app import create_app
from megafs.server.chunks import ChunkStore, LocalChunkStore
from megafs.server.gc import collect_garbage
from megafs.server.metadata import MetadataStore, SQLiteMetadataStore

__all__ = [
    "DEFAULT_QUOTA",
    "GC_INTERVAL",
    "GRACEFUL_SECONDS",
    "ServerStartError",
    "parse_listen",
    "run_server",
    "serve",
]

log = logging.getLogger(__name__)

#: Seconds between garbage collection passes (the first runs at startup).
GC_INTERVAL = 600.0
#: How long requests in flight may take to finish after SIGTERM.
GRACEFUL_SECONDS = 10.0
DEFAULT_QUOTA = 50 * 2**30


class ServerStartError(Exception):
    """The server cannot start: the data directory, the database or the
    address is unusable. The message is one line, fit for the user."""


async def serve(
    data_dir: Path,
    host: str,
    port: int,
    *,
    default_quota: int = DEFAULT_QUOTA,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API on ``host:port`` (0: any free port) with the data in
    ``data_dir``, until SIGTERM or SIGINT; ``task_status.started`` receives
    the port once connections are accepted.

    Must run in the main thread (it handles signals). Raises
    ServerStartError before anything is served if it cannot start.
    Cancellation stops it at once, without the graceful phase.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with _open_stores(data_dir) as (meta, chunks):
            app = create_app(meta, chunks, default_quota=default_quota)
            listener = _bind(host, port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_collect_garbage_forever, meta, chunks)
                await _serve_http(app, listener, signals, data_dir / "server.json",
                                  task_status=task_status)
                nursery.cancel_scope.cancel()
    log.info("stopped")


async def _serve_http(
    app: Starlette,
    listener: socket.socket,
    signals: AsyncIterator[int],
    info: Path,
    *,
    task_status: trio.TaskStatus[int],
) -> None:
    """Serve until a signal, then shut down gracefully. ``info`` (the
    server.json others find the server by) exists exactly while serving."""
    host, port = listener.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(
                # Starlette's and Hypercorn's ASGI type declarations differ in form only.
                hypercorn.trio.serve, cast(Framework, app), _hypercorn_config(listener),
                shutdown_trigger=partial(_next_signal, signals),
            ))
            await trio.to_thread.run_sync(
                _write_atomically, info, json.dumps({"url": url, "pid": os.getpid()}))
            log.info("serving on %s", url)
            task_status.started(port)
    finally:
        info.unlink(missing_ok=True)


async def _next_signal(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.info("%s: finishing the requests in flight", signal.Signals(signum).name)
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
                raise ServerStartError(
                    f"another megafs server is using {data_dir}") from None
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
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
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


def _hypercorn_config(listener: socket.socket) -> Config:
    config = Config()
    # Hypercorn adopts the bound socket by descriptor; detach() hands the
    # descriptor over so it is closed once, by Hypercorn.
    config.bind = [f"fd://{listener.detach()}"]
    config.accesslog = None  # the app logs one line per request itself
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_SECONDS
    return config


async def _collect_garbage_forever(meta: MetadataStore, chunks: ChunkStore) -> None:
    while True:
        try:
            await collect_garbage(meta, chunks, now=time.time())
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


def run_server(data_dir: Path, listen: str, *, default_quota: int) -> int:
    """Run the server in the foreground until SIGTERM or SIGINT; returns an
    exit code: 0 after a clean stop; 1 if it cannot start and 2 for a
    malformed ``listen``, each with one line on stderr."""
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        print(f"megafs: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(partial(serve, data_dir, host, port, default_quota=default_quota))
    except ServerStartError as exc:
        print(f"megafs: {exc}", file=sys.stderr)
        return 1
    return 0
