"""The client side of the megafs protocol: one HTTP client for the server.

``http`` (:class:`RemoteClient`) speaks ``megafs.wire``; ``responses``
checks every answer field by field (the server is untrusted); ``retry`` is
the one backoff policy for failures that may pass.
"""

from megafs.remote.http import DeleteNode, PutNode, RemoteClient
from megafs.remote.responses import Account, Change, RemoteNode, Session, SessionInfo
from megafs.remote.retry import Backoff, Transient, retrying

__all__ = [
    "Account",
    "Backoff",
    "Change",
    "DeleteNode",
    "PutNode",
    "RemoteClient",
    "RemoteNode",
    "Session",
    "SessionInfo",
    "Transient",
    "retrying",
]
