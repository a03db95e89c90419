"""Handing work between threads and an event loop, waking the loop once per batch.

``loop.call_soon_threadsafe`` writes to the loop's self-pipe on every call: with eight
threads calling through one sync client, or a provider's thread pool finishing methods,
that is a system call and a loop wake-up per call. An :class:`Inbox` queues what other
threads post and wakes its loop only when it is not already due to look.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from backchannel.errors import ChannelClosed

T = TypeVar("T")

_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


class Inbox:
    """Callbacks posted from any thread, run on one loop in the order posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._posted: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._wake_pending = False

    def post(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop soon. Raises ChannelClosed if it is closed."""
        self._posted.append((callback, args))
        with self._lock:
            if self._wake_pending:
                return  # the loop will look before it sleeps again
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed
            with self._lock:
                self._wake_pending = False
            raise ChannelClosed("the event loop is closed") from None

    def _drain(self) -> None:
        # clear the flag first: what is posted from now on wakes the loop again
        with self._lock:
            self._wake_pending = False
        posted = self._posted
        while posted:
            callback, args = posted.popleft()
            callback(*args)


def inbox(loop: asyncio.AbstractEventLoop) -> Inbox:
    """The inbox of ``loop`` (one per loop)."""
    found = _inboxes.get(loop)
    if found is None:
        with _inboxes_lock:
            found = _inboxes.get(loop)
            if found is None:
                found = _inboxes[loop] = Inbox(loop)
    return found


def run_in_pool(pool: concurrent.futures.Executor, function: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``function`` in ``pool``; the returned future (of the running loop) gets its
    outcome. Cancelling the future cancels the work if it has not started yet."""
    return submit(pool, function)[0]


def submit(
    pool: concurrent.futures.Executor, function: Callable[[], T]
) -> tuple[asyncio.Future[T], concurrent.futures.Future[None]]:
    """:func:`run_in_pool`, also returning the pool's own future, which is done only when
    the thread is done with ``function`` (the loop's future may be cancelled before)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    box = inbox(loop)

    def work() -> None:
        try:
            result = function()
        except BaseException as exc:
            box.post(_set_exception, future, exc)
        else:
            box.post(_set_result, future, result)

    submitted = pool.submit(work)
    future.add_done_callback(lambda done: submitted.cancel() if done.cancelled() else None)
    return future, submitted


class Deferred:
    """What a session's result decoder returns when the decoding goes on elsewhere (a
    bulk result, decoded in a worker thread): the call's future gets this future's
    outcome."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future


def post_quietly(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any
) -> None:
    """Like ``inbox(loop).post``, but nothing happens when the loop is closed (for clean-up
    that a closed loop no longer needs)."""
    with contextlib.suppress(ChannelClosed):
        inbox(loop).post(callback, *args)


def _set_result(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, StopIteration):  # a future cannot hold it (PEP 479)
        exc = RuntimeError(f"StopIteration raised: {exc!r}")
    future.set_exception(exc)
