"""A background event-loop thread that sync code hands coroutines to (anyio's blocking portal).

The sync :class:`~backchannel.Client` and :class:`~backchannel.Server` hold no logic of
their own: each runs the asyncio core on one of these and waits for the results. A
blocking call made *from* the loop thread is refused with a clear error, because it
would wait for the very loop it blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from backchannel.errors import ChannelClosed
from backchannel.transport import observe
from backchannel.transport.handoff import inbox

T = TypeVar("T")

logger = logging.getLogger(__name__)


def wait_on_loop(loop: asyncio.AbstractEventLoop, start: Callable[[], asyncio.Future[T]]) -> T:
    """From another thread: run ``start`` on ``loop`` and block until its future is done.

    Lighter than a coroutine handed to the loop (no task): ``start`` sends the call and
    returns the future of its outcome. Raises ChannelClosed when the loop is closed.
    """
    outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

    def begin() -> None:
        try:
            future = start()
        except BaseException as exc:
            outcome.set_exception(exc)
            return
        future.add_done_callback(functools.partial(_copy_outcome, outcome))

    if observe.AVAILABLE:  # OpenTelemetry: the call is made in the caller's span
        begin = observe.carry(begin)
    inbox(loop).post(begin)  # raises ChannelClosed when the loop is closed
    return wait_for(outcome)


#: how long a sync facade's close waits for its closing, then for its loop to stop
CLOSE_WAIT = 10.0

#: how long the main thread blocks at most before it looks for a signal (Ctrl-C)
SIGNAL_CHECK = 0.2


def wait_for(future: concurrent.futures.Future[T], timeout: float | None = None) -> T:
    """``future.result(timeout)``, but a main thread waiting here still gets its
    KeyboardInterrupt promptly.

    A process-directed signal (Ctrl-C, ``kill -INT``) may be taken by any thread that
    does not block it, e.g. an event loop's; Python then only flags it for the main
    thread, which does not wake from an untimed lock wait: it would wait for ever. So
    the main thread waits in slices of :data:`SIGNAL_CHECK` seconds; other threads
    (which never get KeyboardInterrupt) wait in one piece.
    """
    if threading.current_thread() is not threading.main_thread():
        return future.result(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = SIGNAL_CHECK if deadline is None else min(SIGNAL_CHECK, deadline - time.monotonic())
        try:
            return future.result(max(left, 0))
        except concurrent.futures.TimeoutError:
            if future.done() or (deadline is not None and time.monotonic() >= deadline):
                raise  # the call's own TimeoutError, or the caller's time is up


def _copy_outcome(target: concurrent.futures.Future[T], source: asyncio.Future[T]) -> None:
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


#: the environment variable that chooses the loop of the sync facades' threads:
#: "asyncio" keeps asyncio's own even when uvloop is installed
LOOP_ENVIRONMENT = "BACKCHANNEL_LOOP"


#: what ``$BACKCHANNEL_LOOP`` may say ("" or unset: uvloop when installed)
LOOP_CHOICES = ("asyncio", "uvloop")


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for a sync facade's thread: uvloop's when it is installed (the
    ``fast`` extra) unless ``$BACKCHANNEL_LOOP`` is ``asyncio``, else asyncio's;
    ``$BACKCHANNEL_LOOP=uvloop`` without uvloop is an ImportError, any other value a
    ValueError (a typo never silently picks a loop)."""
    chosen = os.environ.get(LOOP_ENVIRONMENT, "")
    if chosen and chosen not in LOOP_CHOICES:
        raise ValueError(
            f"${LOOP_ENVIRONMENT} must be 'asyncio' or 'uvloop' (or unset), got {chosen!r}"
        )
    if chosen != "asyncio":
        try:
            import uvloop
        except ImportError:
            if chosen == "uvloop":
                raise ImportError(
                    f"${LOOP_ENVIRONMENT}=uvloop needs uvloop (pip install 'backchannel[fast]')"
                ) from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


class LoopThread:
    """Runs an event loop (:func:`new_loop`) in a daemon thread until :meth:`close`."""

    def __init__(self, name: str) -> None:
        self._ready = threading.Event()
        # made here, so that a bad $BACKCHANNEL_LOOP is raised to the caller, not lost in
        # the thread (which would leave this constructor waiting for ever)
        self._loop: asyncio.AbstractEventLoop | None = new_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()  # the loop runs before anyone may submit to it

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this thread runs."""
        assert self._loop is not None
        return self._loop

    def in_loop_thread(self) -> bool:
        """True when called from this loop's own thread."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine on the loop; return a future for its outcome."""
        if not self._thread.is_alive() or self.loop.is_closed():
            coro.close()
            raise ChannelClosed("the background event loop is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and block this thread until it finishes (or
        ``timeout`` seconds pass: TimeoutError, the coroutine goes on)."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(
                "a blocking backchannel call was made from its own event loop thread, where "
                "it would wait forever; use the asyncio API (AsyncClient / await) there"
            )
        return wait_for(self.submit(coro), timeout)

    def close_with(
        self, closing: Coroutine[Any, Any, object], timeout: float | None = None
    ) -> None:
        """Run ``closing`` (a facade's own close) for ``timeout`` seconds at most, then
        :meth:`close`, as long again at most: a close never waits for ever, whatever the
        loop is stuck on (one that is stuck is left to its daemon thread, logged);
        ``timeout`` defaults to :data:`CLOSE_WAIT`."""
        timeout = CLOSE_WAIT if timeout is None else timeout
        try:
            self.run(closing, timeout)
        except ChannelClosed:
            pass  # closed already
        except concurrent.futures.TimeoutError:
            logger.warning("%s: closing took over %ss; left running", self._thread.name, timeout)
        self.close(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop the loop and wait for the thread to end, ``timeout`` seconds at most (a
        loop held by a stuck callback is left to its daemon thread); no-op when already
        closed. ``timeout`` defaults to :data:`CLOSE_WAIT`."""
        if self._thread.is_alive() and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                self.loop.call_soon_threadsafe(self.loop.stop)
            if not self.in_loop_thread():
                self._thread.join(CLOSE_WAIT if timeout is None else timeout)
