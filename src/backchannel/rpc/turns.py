"""The lock that makes a listener's calls take turns: :class:`asyncio.Lock`, plus a
synchronous :meth:`Turns.take` for the usual case of a free lock, so that a callback
whose listener is free costs no coroutine to lock it.
"""

from __future__ import annotations

import asyncio
import collections


class Turns:
    """A FIFO lock for one event loop, as :class:`asyncio.Lock` (same order, same
    cancellation behaviour), with :meth:`take` to lock it at once when it is free."""

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def locked(self) -> bool:
        """True while someone holds it."""
        return self._held

    def take(self) -> bool:
        """Lock it now if it is free and nobody waits for it (else False: await
        :meth:`acquire`, which queues behind those waiting)."""
        if self._held or self._waiters:
            return False
        self._held = True
        return True

    async def acquire(self) -> bool:
        """Wait for it, in arrival order, and lock it."""
        if self.take():
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        except asyncio.CancelledError:
            if not self._held:  # woken, then cancelled: the turn passes to the next
                self._wake_first()
            raise
        self._held = True
        return True

    def release(self) -> None:
        """Unlock it; the first waiting, if any, takes it next."""
        if not self._held:
            raise RuntimeError("Turns.release(): it is not locked")
        self._held = False
        if self._waiters:
            self._wake_first()

    def _wake_first(self) -> None:
        if self._waiters:
            first = self._waiters[0]
            if not first.done():
                first.set_result(None)
