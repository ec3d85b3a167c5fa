"""Chunk downloads (``cache/downloads.py``) against the real server, seen
through a proxy: chunks that wait, and read-ahead's asked for together, go
a few to a request; a reader's chunk goes at once and never with
read-ahead's; and neither a chunk the server cannot read nor a cancelled
request fails the chunks that travelled with it."""

from __future__ import annotations

import functools
import os
import random
import threading

import trio
import trio.testing

from megafs.cache.downloads import Downloads
from megafs.errors import MegafsError, NotFound, RemoteError
from megafs.remote import RemoteClient
from megafs.wire import MAX_FETCH_ITEMS
from tests.helpers.proxy import Forward, Proxy, ProxyRequest, ProxyResponse
from tests.helpers.server import ServerProcess
from tests.integration.users import User

FETCH = "/v1/chunks/fetch"
GET = r"/v1/chunks/[0-9a-f]{64}"


async def _stored(user: User, count: int) -> dict[bytes, bytes]:
    chunks = {os.urandom(32): os.urandom(1000 + i) for i in range(count)}
    await user.client.put_chunks(list(chunks.items()))
    return chunks


async def _get_all(
    downloads: Downloads, ids: list[bytes], *, ahead: bool = True
) -> dict[bytes, object]:
    """Each chunk's bytes, or the class of the error its download raised;
    all asked for at the same moment (by read-ahead, unless ``ahead`` is
    false)."""
    got: dict[bytes, object] = {}

    async def get(chunk_id: bytes) -> None:
        try:
            got[chunk_id] = bytes(await downloads.get(chunk_id, ahead=ahead))
        except MegafsError as exc:
            got[chunk_id] = type(exc)

    async with trio.open_nursery() as nursery:
        for chunk_id in ids:
            nursery.start_soon(get, chunk_id)
    return got


async def test_chunks_asked_for_at_once_go_a_few_to_a_request(alice: User, proxy: Proxy) -> None:
    """Nine chunks read-ahead asks for at the same moment through one
    slot: two requests of ``MAX_FETCH_ITEMS`` and the last chunk alone, as
    a GET."""
    chunks = await _stored(alice, 2 * MAX_FETCH_ITEMS + 1)
    async with RemoteClient(proxy.url, alice.client.token) as remote:
        got = await _get_all(Downloads(remote, slots=1), list(chunks))
    assert got == chunks
    fetches = proxy.find("POST", FETCH)
    assert [len(r.request_json()["ids"]) for r in fetches] == [MAX_FETCH_ITEMS] * 2
    assert len(proxy.find("GET", GET)) == 1


async def test_a_chunk_the_server_does_not_have_fails_alone(alice: User, proxy: Proxy) -> None:
    chunks = await _stored(alice, 3)
    absent = os.urandom(32)
    async with RemoteClient(proxy.url, alice.client.token) as remote:
        got = await _get_all(Downloads(remote, slots=1), [absent, *chunks])
    assert got == {absent: NotFound, **chunks}
    (fetch, *_) = proxy.find("POST", FETCH)
    assert sorted(fetch.request_json()["ids"]) == sorted(c.hex() for c in [absent, *chunks])


async def test_a_chunk_the_server_cannot_read_fails_no_other(
    alice: User, server: ServerProcess
) -> None:
    """The server answers 500 to any request that reads the victim: the
    others of its request ask again alone and get their bytes; the victim
    fails with its own error."""
    chunks = await _stored(alice, MAX_FETCH_ITEMS)
    victim = next(iter(chunks))
    (stored,) = (server.data_dir / "chunks").rglob(victim.hex())
    stored.unlink()
    stored.mkdir()  # reading it fails
    try:
        async with RemoteClient(server.url, alice.client.token, retries=0) as remote:
            got = await _get_all(Downloads(remote, slots=1), list(chunks))
    finally:
        stored.rmdir()
    assert got == {**chunks, victim: RemoteError}


async def test_a_cancelled_request_leaves_its_chunks_to_their_callers(
    alice: User, proxy: Proxy
) -> None:
    """The one slot is busy while three chunks queue; the first of them
    takes the other two along, and is cancelled while its request is under
    way. The other two ask again and get their bytes."""
    first, *chunks = await _stored(alice, 4)
    stored = await alice.client.get_chunks([first, *chunks])
    release_first = threading.Event()
    fetch_sent = threading.Event()
    release_fetch = threading.Event()
    held: list[list[str]] = []

    @proxy.on(method="GET", path=GET, times=1)
    def hold_first(request: ProxyRequest, forward: Forward) -> ProxyResponse:
        release_first.wait(30)
        return forward()

    @proxy.on(method="POST", path=FETCH, times=1)
    def hold_fetch(request: ProxyRequest, forward: Forward) -> ProxyResponse:
        held.append(request.json()["ids"])
        fetch_sent.set()
        release_fetch.wait(30)
        return forward()

    got: dict[bytes, bytes] = {}
    async with RemoteClient(proxy.url, alice.client.token) as remote:
        downloads = Downloads(remote, slots=1)

        async def get(chunk_id: bytes) -> None:
            got[chunk_id] = bytes(await downloads.get(chunk_id))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, first)
            await trio.testing.wait_all_tasks_blocked()
            lead_scope = trio.CancelScope()

            async def lead() -> None:
                with lead_scope:
                    await get(chunks[0])

            nursery.start_soon(lead)
            await trio.testing.wait_all_tasks_blocked()
            for chunk_id in chunks[1:]:
                nursery.start_soon(get, chunk_id)
                await trio.testing.wait_all_tasks_blocked()
            release_first.set()
            await trio.to_thread.run_sync(fetch_sent.wait, 30)
            lead_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            release_fetch.set()
    assert lead_scope.cancelled_caught
    assert got == {c: bytes(stored[c]) for c in (first, *chunks[1:])}
    assert held == [[c.hex() for c in chunks]]  # the lead's, with the other two
    asked_again = [r.path.rsplit("/", 1)[1] for r in proxy.find("GET", GET)[1:]]
    for r in proxy.find("POST", FETCH)[1:]:
        asked_again += r.request_json()["ids"]
    assert sorted(asked_again) == sorted(c.hex() for c in chunks[1:])


async def test_callers_cancelled_together_leave_no_request_slot_taken(
    alice: User, server: ServerProcess
) -> None:
    """Read-ahead's prefetches of one handle are cancelled together (the
    reader closed the file or jumped) while they queue, are handed a slot,
    or are being fetched, in every order their cancellations happen to run.
    None of it may keep a slot: afterwards every chunk still downloads."""
    chunks = await _stored(alice, 8)
    ids = list(chunks)
    rng = random.Random(7)
    async with RemoteClient(server.url, alice.client.token) as remote:
        downloads = Downloads(remote, slots=2)
        for _ in range(150):
            async with trio.open_nursery() as nursery:
                for chunk_id in rng.sample(ids, 6):
                    nursery.start_soon(downloads.get, chunk_id)
                await trio.sleep(rng.uniform(0, 0.004))
                nursery.cancel_scope.cancel()
        with trio.fail_after(10):
            assert await _get_all(downloads, ids) == chunks


async def test_a_readers_chunk_goes_at_once_and_never_with_read_aheads(
    alice: User, proxy: Proxy
) -> None:
    """Readers' chunks asked for at the same moment, with a slot free for
    each, go alone and at once (the kernel asks for a file's first two
    chunks almost together); so they do beside three of read-ahead's (a
    reader's first read starts read-ahead just before it asks for its own),
    which travel together. Queued behind a busy slot, each kind goes with
    its own."""

    def asked() -> tuple[list[str], list[list[str]]]:
        gets = sorted(r.path.rsplit("/", 1)[1] for r in proxy.find("GET", GET))
        fetches = [sorted(r.request_json()["ids"]) for r in proxy.find("POST", FETCH)]
        proxy.forget()
        return gets, fetches

    readers = await _stored(alice, 2)
    ahead = await _stored(alice, 3)
    async with RemoteClient(proxy.url, alice.client.token) as remote:
        downloads = Downloads(remote, slots=3)
        assert await _get_all(downloads, list(readers), ahead=False) == readers
        assert asked() == (sorted(c.hex() for c in readers), [])
        got: dict[bytes, bytes] = {}

        async def get(chunk_id: bytes, *, kind: bool) -> None:
            got[chunk_id] = bytes(await downloads.get(chunk_id, ahead=kind))

        async with trio.open_nursery() as nursery:
            for chunk_id in ahead:
                nursery.start_soon(functools.partial(get, chunk_id, kind=True))
            for chunk_id in readers:
                nursery.start_soon(functools.partial(get, chunk_id, kind=False))
    assert got == {**readers, **ahead}
    assert asked() == (sorted(c.hex() for c in readers), [sorted(c.hex() for c in ahead)])

    busy, a1, r1, r2, a2 = await _stored(alice, 5)
    release = threading.Event()
    proxy.on(lambda request, forward: release.wait(30) and forward(), path=GET, times=1)
    async with RemoteClient(proxy.url, alice.client.token) as remote:
        downloads = Downloads(remote, slots=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(downloads.get, busy)  # holds the one slot
            await trio.testing.wait_all_tasks_blocked()
            for chunk_id, kind in [(a1, True), (r1, False), (r2, False), (a2, True)]:
                nursery.start_soon(functools.partial(downloads.get, chunk_id, ahead=kind))
                await trio.testing.wait_all_tasks_blocked()
            release.set()
    gets = [r.path.rsplit("/", 1)[1] for r in proxy.find("GET", GET)]
    assert gets == [busy.hex(), a1.hex(), a2.hex()]
    (fetch,) = proxy.find("POST", FETCH)
    assert fetch.request_json()["ids"] == [r1.hex(), r2.hex()]
