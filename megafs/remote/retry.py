"""The one retry policy of megafs: exponential backoff with jitter.

Only failures that may pass by themselves are retried: the network, a
timeout, a server error (500, 502, 503, 504). An attempt signals one by
raising :class:`Transient` around the error the caller should see if no
attempt succeeds; everything else (a 4xx answer, a malformed response)
propagates at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from megafs.errors import MegafsError

__all__ = ["Backoff", "Transient", "retrying"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Transient(Exception):
    """An attempt failed in a way a later attempt may not. ``error`` is
    raised (chained from this exception's cause) when retries run out."""

    def __init__(self, error: MegafsError) -> None:
        super().__init__(error.detail)
        self.error = error


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: ``base`` seconds doubling up to ``cap``."""

    base: float = 0.25
    cap: float = 8.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based). Half of
        it is random ("equal jitter"), so clients that failed together do not
        come back together, yet none retries at once."""
        ceiling = min(self.cap, self.base * 2.0 ** (retry - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


async def retrying(
    attempt: Callable[[], Awaitable[T]], *, retries: int, what: str, backoff: Backoff = Backoff()
) -> T:
    """Await ``attempt()`` up to ``1 + retries`` times while it raises
    :class:`Transient`; then raise that failure's ``error``.

    Cancellation: the waits are plain ``trio.sleep`` calls, so cancelling
    the caller stops the retries at once.
    """
    retry = 0
    while True:
        try:
            return await attempt()
        except Transient as failure:
            if retry >= retries:
                raise failure.error from failure.__cause__
            retry += 1
            delay = backoff.delay(retry)
            log.log(
                logging.DEBUG if retry == 1 else logging.INFO,
                "%s failed (%s); retry %d of %d in %.1f s",
                what,
                failure.error.detail,
                retry,
                retries,
                delay,
            )
            await trio.sleep(delay)
