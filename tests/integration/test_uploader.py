"""The uploader against the real server: what it remembers per node once
changes have landed, and the waits (fsync, close) built on that."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from megafs.cache import Uploader
from megafs.crypto import AccountKeys
from megafs.remote import RemoteClient
from tests.helpers.parts import local_parts
from tests.helpers.server import ServerProcess
from tests.integration.users import User


async def _put(uploader: Uploader, parent: bytes, node_id: bytes, meta: bytes = b"m") -> int:
    # Records and manifests are opaque to the server and to the uploader.
    return await uploader.put(node_id, parent=parent, meta=meta, content=b"c", chunks=(), rev=1)


async def test_landed_changes_leave_nothing_per_node_and_their_waits_return(
    server: ServerProcess, alice: User, tmp_path: Path
) -> None:
    """A mount that writes a big tree keeps no per-node record of the
    journal states that landed (it would grow with every node written), yet
    a wait for any of them, before or after it landed, returns."""
    keys = AccountKeys.from_master(os.urandom(32), alice.root)
    async with (
        RemoteClient(server.url, alice.session.token) as remote,
        local_parts(remote, keys, tmp_path) as (_, _, uploader),
    ):
        nodes = [os.urandom(16) for _ in range(300)]
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            with trio.fail_after(60):
                seqs = [await _put(uploader, alice.root, n) for n in nodes]
                await uploader.wait_committed(nodes[0], seqs[0])
                await uploader.wait_idle()
                for node_id, seq in zip(nodes, seqs, strict=True):
                    await uploader.wait_committed(node_id, seq)
            assert uploader._done_seq == {}
            assert not any(uploader.busy(n) for n in nodes)

            # Two more states of one node: a wait for each returns.
            first = await _put(uploader, alice.root, nodes[0])
            second = await _put(uploader, alice.root, nodes[0], b"latest")
            assert uploader.busy(nodes[0])
            with trio.fail_after(60):
                await uploader.wait_committed(nodes[0], first)
                await uploader.wait_committed(nodes[0], second)
            assert not uploader.busy(nodes[0])
            assert uploader._done_seq == {}
            listed = {n.id: n.meta for n in await remote.list_children(alice.root)}
            assert set(nodes) <= set(listed)
            assert listed[nodes[0]] == b"latest"
            nursery.cancel_scope.cancel()
