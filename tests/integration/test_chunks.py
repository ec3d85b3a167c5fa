"""Chunks: upload, download, the missing-probe."""

from __future__ import annotations

import os

import pytest

from megafs.errors import InvalidRequest, NotFound, TooLarge
from megafs.wire import MAX_CHUNK_BYTES, MAX_MISSING_IDS
from tests.integration.users import User


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


async def test_client_refuses_oversized_chunk(alice: User) -> None:
    with pytest.raises(TooLarge):
        await alice.client.put_chunk(os.urandom(32), bytes(MAX_CHUNK_BYTES + 1))
