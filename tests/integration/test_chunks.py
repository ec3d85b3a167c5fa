"""Chunks: upload (one or a batch), download, the missing-probe."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest
import trio

from megafs.errors import InvalidRequest, NotFound, QuotaExceeded, TooLarge
from megafs.wire import (
    API_PREFIX,
    CHUNK_BATCH_HEADER,
    MAX_CHUNK_BATCH_BYTES,
    MAX_CHUNK_BATCH_ITEMS,
    MAX_CHUNK_BYTES,
    MAX_FETCH_ITEMS,
    MAX_MISSING_IDS,
)
from tests.helpers.server import ServerProcess, running_server
from tests.integration.users import User, new_user


async def test_put_get_and_missing(alice: User) -> None:
    data = os.urandom(MAX_CHUNK_BYTES)
    a, b, absent = os.urandom(32), os.urandom(32), os.urandom(32)
    await alice.client.put_chunk(a, data)
    await alice.client.put_chunk(b, b"x")
    assert await alice.client.get_chunk(a) == data
    assert await alice.client.get_chunk(b) == b"x"
    with pytest.raises(InvalidRequest):
        await alice.client.put_chunk(absent, b"")
    with pytest.raises(NotFound):
        await alice.client.get_chunk(absent)
    assert await alice.client.missing_chunks([a, absent, b, absent]) == {absent}
    assert await alice.client.missing_chunks([]) == set()


async def test_missing_probe_is_batched(alice: User) -> None:
    stored = os.urandom(32)
    await alice.client.put_chunk(stored, b"x")
    ids = [os.urandom(32) for _ in range(MAX_MISSING_IDS + 5)] + [stored]
    assert await alice.client.missing_chunks(ids) == set(ids) - {stored}


async def test_a_fetch_answers_the_stored_chunks_in_the_order_asked(alice: User) -> None:
    a, b, c, absent = (os.urandom(32) for _ in range(4))
    big = os.urandom(MAX_CHUNK_BYTES)
    await alice.client.put_chunks([(a, b"first"), (b, big), (c, b"third")])
    got = await alice.client.get_chunks([c, absent, a, b])
    assert list(got) == [c, a, b]
    assert (got[c], got[a], got[b]) == (b"third", b"first", big)
    assert await alice.client.get_chunks([absent]) == {}


async def test_the_client_refuses_a_fetch_the_server_would(alice: User) -> None:
    chunk = os.urandom(32)
    for ids in ([], [os.urandom(32) for _ in range(MAX_FETCH_ITEMS + 1)], [chunk, chunk]):
        with pytest.raises(InvalidRequest):
            await alice.client.get_chunks(ids)


@pytest.mark.parametrize(
    "body",
    [
        {"ids": []},
        {"ids": ["00" * 32] * (MAX_FETCH_ITEMS + 1)},
        {"ids": ["zz" * 32]},
        {"ids": "00" * 32},
        {"ids": ["00" * 32], "more": 1},
    ],
    ids=["no ids", "too many", "bad id", "not a list", "unknown field"],
)
async def test_a_malformed_fetch_is_refused(
    alice: User, raw: httpx.AsyncClient, body: dict[str, object]
) -> None:
    answer = await raw.post(
        "/chunks/fetch", json=body, headers={"Authorization": f"Bearer {alice.client.token}"}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"


async def test_a_fetch_naming_a_chunk_twice_answers_it_once(
    alice: User, raw: httpx.AsyncClient
) -> None:
    chunk = os.urandom(32)
    await alice.client.put_chunk(chunk, b"once")
    answer = await raw.post(
        "/chunks/fetch",
        json={"ids": [chunk.hex(), chunk.hex()]},
        headers={"Authorization": f"Bearer {alice.client.token}"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.content == _frame(chunk, b"once")


async def test_client_refuses_oversized_chunk(alice: User) -> None:
    with pytest.raises(TooLarge):
        await alice.client.put_chunk(os.urandom(32), bytes(MAX_CHUNK_BYTES + 1))


def _frame(chunk_id: bytes, data: bytes, size: int | None = None) -> bytes:
    return chunk_id + (len(data) if size is None else size).to_bytes(4, "big") + data


async def test_a_batch_stores_each_chunk_as_a_put_would(alice: User) -> None:
    a, b, c = os.urandom(32), os.urandom(32), os.urandom(32)
    big = os.urandom(MAX_CHUNK_BYTES)
    used = (await alice.client.account()).used
    await alice.client.put_chunk(c, b"stored before")
    await alice.client.put_chunks([(a, b"first"), (b, big), (a, b"first"), (c, b"other bytes")])
    assert await alice.client.get_chunk(a) == b"first"
    assert await alice.client.get_chunk(b) == big
    assert await alice.client.get_chunk(c) == b"stored before"  # the first bytes stay
    assert await alice.client.missing_chunks([a, b, c]) == set()
    # Each stored chunk counts once.
    assert (await alice.client.account()).used == used + 5 + len(big) + len(b"stored before")


async def test_the_client_refuses_a_batch_the_server_would(alice: User) -> None:
    with pytest.raises(InvalidRequest):
        await alice.client.put_chunks([])
    with pytest.raises(InvalidRequest):
        await alice.client.put_chunks([(os.urandom(32), b"x")] * (MAX_CHUNK_BATCH_ITEMS + 1))
    with pytest.raises(TooLarge):
        await alice.client.put_chunks([(os.urandom(32), b"")])
    with pytest.raises(TooLarge):
        await alice.client.put_chunks([(os.urandom(32), bytes(MAX_CHUNK_BYTES))] * 4)


@pytest.mark.parametrize(
    "body",
    [
        b"\x07" * (CHUNK_BATCH_HEADER - 1),
        _frame(bytes(32), b"x") + bytes(5),
        _frame(bytes(32), b"xyz", size=4),
        _frame(bytes(32), b"", size=0),
        _frame(bytes(32), b"", size=MAX_CHUNK_BYTES + 1),
        _frame(bytes(32), b"x") * MAX_CHUNK_BATCH_ITEMS,  # one more than a batch holds
    ],
    ids=[
        "header cut short",
        "bytes after",
        "bytes cut short",
        "empty chunk",
        "chunk too large",
        "too many chunks",
    ],
)
async def test_a_malformed_batch_stores_nothing(
    alice: User, raw: httpx.AsyncClient, body: bytes
) -> None:
    """Nothing of it is stored, not even its well-formed first chunk."""
    good = os.urandom(32)
    answer = await raw.post(
        "/chunks/batch",
        content=_frame(good, b"fine") + body,
        headers={"Authorization": f"Bearer {alice.client.token}"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert await alice.client.missing_chunks([good]) == {good}


async def test_an_empty_batch_is_refused(alice: User, raw: httpx.AsyncClient) -> None:
    answer = await raw.post(
        "/chunks/batch", content=b"", headers={"Authorization": f"Bearer {alice.client.token}"}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"


async def test_an_oversized_batch_is_refused(alice: User, raw: httpx.AsyncClient) -> None:
    body = _frame(os.urandom(32), bytes(MAX_CHUNK_BYTES)) * 5
    assert len(body) > MAX_CHUNK_BATCH_BYTES
    answer = await raw.post(
        "/chunks/batch", content=body, headers={"Authorization": f"Bearer {alice.client.token}"}
    )
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"] == "too_large"


async def test_a_batch_counts_against_the_quota(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", quota=10_000) as server:
        user = await new_user(server.url)
        async with user.client as client:
            used = (await client.account()).used
            a, b = os.urandom(32), os.urandom(32)
            with pytest.raises(QuotaExceeded):
                await client.put_chunks([(a, bytes(6000)), (b, bytes(6000))])
            # Whichever came first is stored and counted; the other is not.
            (stored,) = {a, b} - await client.missing_chunks([a, b])
            assert (await client.account()).used == used + 6000
            await client.put_chunks([(stored, bytes(6000))])  # stored again: counted once
            assert (await client.account()).used == used + 6000


async def send_cut_short(port: int, path: str, token: str, length: int, sent: bytes) -> None:
    """A PUT announcing ``length`` bytes that stops after ``sent`` and
    closes the connection: a client killed in the middle of an upload."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode()
            + sent
        )


async def test_an_upload_its_client_stops_sending_stores_nothing(
    alice: User, server: ServerProcess
) -> None:
    """The first bytes of an id stay, so a part of a chunk stored as the
    whole would be that chunk for good: the server answers such a body 400
    and stores nothing of it."""
    chunk_id = os.urandom(32)
    path = f"{API_PREFIX}/chunks/{chunk_id.hex()}"
    mark = server.log_path.stat().st_size
    await send_cut_short(server.port, path, str(alice.client.token), 1 << 20, bytes(128 << 10))
    line = re.compile(rb"method=PUT path=" + re.escape(path.encode()) + rb" status=(\d+)")
    deadline = time.monotonic() + 10
    while not (answered := line.search(server.log_path.read_bytes()[mark:])):
        assert time.monotonic() < deadline, "the server never answered the upload"
        await trio.sleep(0.05)
    assert answered[1] == b"400"
    assert await alice.client.missing_chunks([chunk_id]) == {chunk_id}
