"""The client against a server that goes away, and against a hostile one.

The hostile server is a few lines of raw trio sockets that answer every
request with bytes chosen by the test: garbage, truncated or oversized
bodies, malformed JSON and fields. The client must end each case with a
FormatError or RemoteError (never another exception, never unbounded
memory)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

from megafs.errors import (
    AuthFailed,
    FormatError,
    MegafsError,
    NotEmpty,
    NotFound,
    RemoteError,
    RemoteTimeout,
    TooLarge,
    VersionConflict,
)
from megafs.remote import DeleteNode, PutNode, RemoteClient
from megafs.remote.transport import TransportError, TransportTimeout
from megafs.wire import MAX_CHUNK_BYTES, b64e, frame_chunks
from tests.helpers.server import ServerProcess
from tests.integration.users import new_user

NODE = bytes(range(16))
CHUNK = bytes(range(32))
TOKEN = "t" * 43


async def test_retries_across_a_server_restart(own_server: ServerProcess) -> None:
    user = await new_user(own_server.url, retries=10)
    async with user.client as client, trio.open_nursery() as nursery:
        await trio.to_thread.run_sync(own_server.stop)
        nursery.start_soon(partial(trio.to_thread.run_sync, own_server.start))
        assert (await client.get_node(user.root)).version == 1


async def test_gives_up_with_remote_error_chained_from_the_cause() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        async with RemoteClient(f"http://127.0.0.1:{port}", retries=1) as client:
            with pytest.raises(RemoteError) as info:
                await client.health()
    assert isinstance(info.value.__cause__, TransportError)
    assert isinstance(info.value.__cause__.__cause__, ConnectionRefusedError)
    assert not isinstance(info.value, RemoteTimeout)


# -- a hostile server ----------------------------------------------------------------

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def hostile(answer: bytes | Handler) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server answering every request with ``answer`` (bytes, then close;
    or a coroutine function that writes to the stream itself). Yields its
    URL and the list of request heads it received."""
    requests: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                requests.append(await _read_request(stream))
                if isinstance(answer, bytes):
                    await stream.send_all(answer)
                else:
                    await answer(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client hung up, as it should on a bad answer

    async with serving(handle) as url:
        yield url, requests


@asynccontextmanager
async def serving(handle: Handler, *, receive_buffer: int | None = None) -> AsyncIterator[str]:
    """``handle`` serves each connection to a free port of 127.0.0.1;
    yields the URL. ``receive_buffer``: the connections' SO_RCVBUF (a small
    one makes a client's large send wait for the server to read)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    if receive_buffer is not None:
        listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


async def _read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        part = await stream.receive_some()
        if not part:
            break
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        part = await stream.receive_some()
        if not part:
            break
        body += part
    return head


def http(status: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{head}\r\n").encode() + body


def ok(value: Any) -> bytes:
    return http("200 OK", json.dumps(value).encode(), "Content-Type: application/json")


def node(**change: Any) -> dict[str, Any]:
    return {
        "id": NODE.hex(),
        "parent": None,
        "version": 1,
        "meta": b64e(b"m"),
        "content": None,
        "content_size": 0,
        **change,
    }


async def endless_chunked(stream: trio.SocketStream) -> None:
    await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (65536, bytes(65536))
    while True:  # until the client hangs up
        await stream.send_all(piece)


async def silent(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


Call = Callable[[RemoteClient], Awaitable[Any]]


async def get_node(client: RemoteClient) -> Any:
    return await client.get_node(NODE)


async def list_children(client: RemoteClient) -> Any:
    return await client.list_children(NODE)


async def get_chunk(client: RemoteClient) -> Any:
    return await client.get_chunk(CHUNK)


async def login(client: RemoteClient) -> Any:
    return await client.login("a@b.c", bytes(32), "d")


async def missing(client: RemoteClient) -> Any:
    return await client.missing_chunks([CHUNK])


async def changes(client: RemoteClient) -> Any:
    """From cursor 5, at most 2."""
    return await client.changes(5, limit=2)


def change(seq: int, **fields: Any) -> dict[str, Any]:
    return {"id": NODE.hex(), "parent": None, "version": 1, "seq": seq, "deleted": False, **fields}


async def batch(client: RemoteClient) -> Any:
    """A put and a delete."""
    return await client.commit_batch(
        [PutNode(NODE, None, 0, b"m", None, (), bytes(16)), DeleteNode(NODE, 1)]
    )


HOSTILE = [
    ("garbage", b"hello there\r\n\r\n", get_node, RemoteError),
    ("not JSON", http("200 OK", b"{nope"), get_node, FormatError),
    ("deep JSON", http("200 OK", b"[" * 100_000), get_node, FormatError),
    ("JSON list", ok([]), get_node, FormatError),
    ("missing field", ok({k: v for k, v in node().items() if k != "meta"}), get_node, FormatError),
    ("version as text", ok(node(version="1")), get_node, FormatError),
    ("version zero", ok(node(version=0)), get_node, FormatError),
    ("version as bool", ok(node(version=True)), get_node, FormatError),
    ("short id", ok(node(id="ab" * 15)), get_node, FormatError),
    ("another node", ok(node(id="ab" * 16)), get_node, FormatError),
    ("bad base64", ok(node(meta="%%%")), get_node, FormatError),
    ("size lies", ok(node(content=b64e(b"abc"), content_size=2)), get_node, FormatError),
    ("size without content", ok(node(content_size=9)), get_node, FormatError),
    ("oversized meta", ok(node(meta=b64e(bytes(256 * 1024 + 1)))), get_node, FormatError),
    ("foreign child", ok({"nodes": [node(parent="ab" * 16)]}), list_children, FormatError),
    (
        "duplicate child",
        ok({"nodes": [node(id="ab" * 16, parent=NODE.hex())] * 2}),
        list_children,
        FormatError,
    ),
    ("nodes not a list", ok({"nodes": {}}), list_children, FormatError),
    ("unasked missing id", ok({"missing": ["ef" * 32]}), missing, FormatError),
    ("changes before the cursor", ok({"changes": [change(5)], "cursor": 5}), changes, FormatError),
    (
        "changes out of order",
        ok({"changes": [change(7), change(6)], "cursor": 6}),
        changes,
        FormatError,
    ),
    (
        "changes beyond the limit",
        ok({"changes": [change(6), change(7), change(8)], "cursor": 8}),
        changes,
        FormatError,
    ),
    ("cursor not the last change", ok({"changes": [change(6)], "cursor": 9}), changes, FormatError),
    ("empty page moves the cursor", ok({"changes": [], "cursor": 9}), changes, FormatError),
    (
        "deleted as text",
        ok({"changes": [change(6, deleted="no")], "cursor": 6}),
        changes,
        FormatError,
    ),
    ("batch results not a list", ok({"results": {}}), batch, FormatError),
    ("too few batch results", ok({"results": [{"version": 1}]}), batch, FormatError),
    (
        "batch version as text",
        ok({"results": [{"version": "1"}, {"version": 0}]}),
        batch,
        FormatError,
    ),
    ("batch put version 0", ok({"results": [{"version": 0}, {"version": 0}]}), batch, FormatError),
    ("batch delete version", ok({"results": [{"version": 1}, {"version": 2}]}), batch, FormatError),
    (
        "batch unknown error",
        ok({"results": [{"error": "internal", "detail": "x"}, {"version": 0}]}),
        batch,
        FormatError,
    ),
    (
        "batch error without detail",
        ok({"results": [{"error": "not_found"}, {"version": 0}]}),
        batch,
        FormatError,
    ),
    (
        "token with CRLF",
        ok({"token": "x" * 40 + "\r\nX-Evil: 1", "expires": 1, "account": {}}),
        login,
        FormatError,
    ),
    (
        "huge Content-Length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        get_chunk,
        FormatError,
    ),
    ("truncated body", http("200 OK", bytes(100))[:-90], get_chunk, RemoteError),
    ("compressed", http("200 OK", b"\x1f\x8b", "Content-Encoding: gzip"), get_chunk, FormatError),
    ("redirect", http("302 Found", b"", "Location: http://example.org/"), get_chunk, RemoteError),
    ("HTML 404", http("404 Not Found", b"<html>gone</html>"), get_chunk, NotFound),
    ("HTML 401", http("401 Unauthorized", b"<html>no</html>"), get_chunk, AuthFailed),
]


@pytest.mark.parametrize(
    "answer, call, expected",
    [
        *(pytest.param(*case[1:], id=case[0]) for case in HOSTILE),
        pytest.param(endless_chunked, get_chunk, FormatError, id="endless body"),
    ],
)
async def test_hostile_answers(
    answer: bytes | Handler, call: Call, expected: type[MegafsError]
) -> None:
    async with hostile(answer) as (url, _), RemoteClient(url, TOKEN, retries=0) as client:
        with pytest.raises(expected) as info:
            await call(client)
    assert type(info.value) is expected


async def test_error_answers_carry_the_server_detail_made_printable() -> None:
    body = json.dumps({"error": "version_conflict", "detail": "at \x1b[31mversion 7\x07"})
    async with (
        hostile(http("409 Conflict", body.encode())) as (url, _),
        RemoteClient(url, TOKEN, retries=0) as client,
    ):
        with pytest.raises(VersionConflict) as info:
            await client.delete_node(NODE, expect_version=1)
    assert info.value.detail == "at  [31mversion 7"
    results = ok(
        {"results": [{"error": "not_empty", "detail": "\x1b]0;owned\x07"}, {"version": 0}]}
    )
    async with hostile(results) as (url, _), RemoteClient(url, TOKEN, retries=0) as client:
        error, deleted = await batch(client)
    assert isinstance(error, NotEmpty) and error.detail == "]0;owned" and deleted == 0


async def test_server_errors_are_retried_then_reported() -> None:
    async with (
        hostile(http("503 Service Unavailable", b"busy")) as (url, requests),
        RemoteClient(url, TOKEN, retries=2) as client,
    ):
        with pytest.raises(RemoteError, match="503"):
            await client.get_chunk(CHUNK)
    assert len(requests) == 3
    async with (
        hostile(http("504 Gateway Timeout", b"")) as (url, requests),
        RemoteClient(url, TOKEN, retries=0) as client,
    ):
        with pytest.raises(RemoteTimeout):
            await client.get_chunk(CHUNK)
    async with (
        hostile(http("400 Bad Request", b"")) as (url, requests),
        RemoteClient(url, TOKEN, retries=3) as client,
    ):
        with pytest.raises(MegafsError):
            await client.get_chunk(CHUNK)
    assert len(requests) == 1  # a 4xx is never retried


async def test_a_silent_server_times_out() -> None:
    async with (
        hostile(silent) as (url, _),
        RemoteClient(url, TOKEN, timeout=0.3, retries=1) as client,
    ):
        with pytest.raises(RemoteTimeout) as info:
            await client.get_chunk(CHUNK)
    assert isinstance(info.value.__cause__, TransportTimeout)


async def test_the_token_travels_only_in_the_authorization_header() -> None:
    async with (
        hostile(http("204 No Content", b"")) as (url, requests),
        RemoteClient(url, TOKEN, retries=0) as client,
    ):
        await client.delete_node(NODE, expect_version=3)
    request_line, *headers = requests[0].split(b"\r\n")
    assert request_line == f"DELETE /v1/nodes/{NODE.hex()}?expect_version=3 HTTP/1.1".encode()
    assert [h for h in headers if TOKEN.encode() in h] == [
        f"Authorization: Bearer {TOKEN}".encode()
    ]


async def test_chunk_of_maximum_size_is_accepted() -> None:
    data = os.urandom(MAX_CHUNK_BYTES)
    async with (
        hostile(http("200 OK", data)) as (url, _),
        RemoteClient(url, TOKEN, retries=0) as client,
    ):
        assert await client.get_chunk(CHUNK) == data


# -- connections ---------------------------------------------------------------------


@asynccontextmanager
async def keeping_alive(
    answer: Callable[[int], bytes],
) -> AsyncIterator[tuple[str, list[int]]]:
    """A server that answers request after request on each connection
    with ``answer(n)`` (n counts the requests of the whole server) until
    the client hangs up. Yields its URL and, per connection, how many
    requests it carried."""
    per_connection: list[int] = []
    count = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal count
        index = len(per_connection)
        per_connection.append(0)
        async with stream:
            try:
                while await _read_request(stream):
                    per_connection[index] += 1
                    count += 1
                    await stream.send_all(answer(count))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async with serving(handle) as url:
        yield url, per_connection


HEALTHY = ok({"ok": True, "version": "1"})


async def test_requests_share_one_kept_alive_connection() -> None:
    async with (
        keeping_alive(lambda n: HEALTHY) as (url, per_connection),
        RemoteClient(url, retries=0) as client,
    ):
        for _ in range(5):
            assert await client.health() == "1"
    assert per_connection == [5]


@pytest.mark.parametrize(
    "closing",
    [
        pytest.param(http("200 OK", b'{"ok":true,"version":"1"}', "Connection: close"), id="close"),
        pytest.param(HEALTHY.replace(b"HTTP/1.1", b"HTTP/1.0"), id="HTTP/1.0 without keep-alive"),
        pytest.param(HEALTHY + b"HTTP/1.1 200 OK\r\n", id="bytes after the answer"),
    ],
)
async def test_a_connection_is_not_reused_after_an_answer_that_ends_it(closing: bytes) -> None:
    async with (
        keeping_alive(lambda n: closing if n == 1 else HEALTHY) as (url, per_connection),
        RemoteClient(url, retries=0) as client,
    ):
        for _ in range(3):
            assert await client.health() == "1"
    assert per_connection == [1, 2]


async def test_a_connection_the_server_closed_while_idle_is_not_used() -> None:
    """The server ends the kept-alive connection after its answer; the
    next request opens a new one instead of failing (no retries left)."""
    requests_seen = 0

    async def answer_then_hang_up(stream: trio.SocketStream) -> None:
        nonlocal requests_seen
        requests_seen += 1
        await stream.send_all(HEALTHY)

    async with (
        hostile(answer_then_hang_up) as (url, requests),
        RemoteClient(url, retries=0) as client,
    ):
        assert await client.health() == "1"
        await trio.sleep(0.1)  # the server's close arrives
        assert await client.health() == "1"
    assert requests_seen == len(requests) == 2


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"ok"\r\n14\r\n:true,"version":"1"}\r\n0\r\n\r\n',
            id="chunked",
        ),
        pytest.param(b'HTTP/1.0 200 OK\r\n\r\n{"ok":true,"version":"1"}', id="ended by the close"),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n" + HEALTHY, id="after 100 Continue"),
    ],
)
async def test_answers_framed_otherwise_are_read_whole(framing: bytes) -> None:
    async with hostile(framing) as (url, _), RemoteClient(url, retries=0) as client:
        assert await client.health() == "1"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(http("404 Not Found", bytes(1 << 20)), id="sent"),
        pytest.param(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 99999999999\r\n\r\n", id="announced"
        ),
    ],
)
async def test_an_oversized_error_body_still_gives_the_status(answer: bytes) -> None:
    async with (
        hostile(answer) as (url, _),
        RemoteClient(url, TOKEN, retries=0) as client,
    ):
        with pytest.raises(NotFound):
            await client.get_chunk(CHUNK)


async def test_a_large_body_arrives_intact_in_small_pieces() -> None:
    data = os.urandom(300_000)

    async def trickle(stream: trio.SocketStream) -> None:
        answer = http("200 OK", data)
        for start in range(0, len(answer), 7_001):
            await stream.send_all(answer[start : start + 7_001])
            await trio.sleep(0)

    async with hostile(trickle) as (url, _), RemoteClient(url, TOKEN, retries=0) as client:
        assert await client.get_chunk(CHUNK) == data


async def test_chunks_still_held_are_not_overwritten_by_later_answers() -> None:
    """Fetches of a few chunks land in reused buffers (``ReceiveBuffers``):
    one is reused only once no chunk of its answer is held any more."""
    ids = [bytes([n]) * 32 for n in (1, 2)]
    sent = {n: [os.urandom(1 << 20), os.urandom(1 << 20)] for n in (1, 2, 3)}

    def answer(n: int) -> bytes:
        return http("200 OK", frame_chunks(zip(ids, sent[n], strict=True)))

    async with keeping_alive(answer) as (url, _), RemoteClient(url, TOKEN, retries=0) as client:
        first = await client.get_chunks(ids)
        second = await client.get_chunks(ids)
        assert [first[i] for i in ids] == sent[1]
        assert [second[i] for i in ids] == sent[2]
        del first, second
        third = await client.get_chunks(ids)
        assert [third[i] for i in ids] == sent[3]


async def test_an_answer_sent_before_the_whole_request_was_read_is_reported() -> None:
    """A server may refuse an upload from its head alone, answer and
    close: the client reports that answer, not the broken pipe its
    unfinished send then meets."""
    refusal = http(
        "413 Content Too Large",
        json.dumps({"error": "too_large", "detail": "over quota"}).encode(),
        "Connection: close",
    )

    async def refuse_early(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(1)
            await stream.send_all(refusal)
        # Closed with the body unread: the client's send meets a reset.

    # A small receive window, so the upload cannot all fit in buffers.
    async with (
        serving(refuse_early, receive_buffer=4096) as url,
        RemoteClient(url, TOKEN, retries=0) as client,
    ):
        with pytest.raises(TooLarge, match="over quota"):
            await client.put_chunk(CHUNK, bytes(MAX_CHUNK_BYTES))
