"""When a reverse proxy's consumer went away: whether the proxy is live, why it ended, and
who is told when it does (callbacks, asyncio waiters, blocked threads). A part of
:class:`~backchannel.rpc.provider_callbacks.ReverseProxy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from backchannel.rpc import hooks

# one lock for every proxy (held for a list operation only): a lock per proxy would cost
# its memory for each of the thousands of listeners a provider may hold
_lock = threading.Lock()


class _Waiter:
    """An ``await proxy.gone()`` waiting: its loop and its future."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[str]) -> None:
        self.loop = loop
        self.future = future

    def wake(self, why: str) -> None:
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody to wake
            self.loop.call_soon_threadsafe(_settle, self.future, why)


def _settle(future: asyncio.Future[str], why: str) -> None:
    if not future.done():
        future.set_result(why)


class Lifetime:
    """Whether a reverse proxy is live, and who to tell when it ends.

    An instance ends once, for one of these reasons (:attr:`gone_reason`):
    ``"released by the consumer"`` (``client.release(listener)`` or a remover method),
    ``"released by the provider"`` (:meth:`release`), ``"released: the consumer no
    longer has it"`` (a call answered ``CallbackGone``), or ``"the stream ended: ..."``
    (the consumer closed, died, lost the connection, or the provider stopped).
    """

    # set by the proxy's __init__ (see _init_lifetime)
    _gone: str | None
    _ended_event: threading.Event
    # what to tell when it ends: hooks and waiters; None until the first is added (most
    # proxies never get one), and None again once told: nothing is held after the end
    _watchers: list[Any] | None

    def _init_lifetime(self) -> None:
        self._gone = None
        self._ended_event = threading.Event()
        self._watchers = None

    def _hooks(self) -> hooks.Runner:
        """What runs this instance's hooks: its provider's."""
        raise NotImplementedError

    def _on_loop(self) -> bool:
        """True when called on the thread of the provider's event loop."""
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """False once the instance ended."""
        return self._gone is None

    @property
    def gone_reason(self) -> str | None:
        """Why the instance ended (see the class's docstring); None while it is live."""
        return self._gone

    def on_gone(self, fn: hooks.Hook[Any]) -> Callable[[], None]:
        """Call ``fn(proxy)`` once, when the instance ends (at once if it already has).

        ``fn`` may be ``async def``: it then runs as a task on the provider's loop. A
        plain ``fn`` runs in the thread that ended the instance (or that called
        ``on_gone``, when it had ended already), except the event loop's: from there it
        is handed to a thread of the provider's pool (a thread of its own once the pool
        is shut). The provider's stop waits for it (bounded). What ``fn`` raises is
        logged and swallowed. Returns a function that takes ``fn`` back (a no-op once it
        ran).
        """
        with _lock:
            if self._gone is None:
                if self._watchers is None:
                    self._watchers = []
                self._watchers.append(fn)
                return lambda: self._unwatch(fn)
        self._tell(fn)
        return _nothing

    async def gone(self) -> str:
        """Wait (asyncio) until the instance ended; returns :attr:`gone_reason`."""
        why = self._gone
        if why is not None:
            return why
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, loop.create_future())
        with _lock:
            if self._gone is None:
                if self._watchers is None:
                    self._watchers = []
                self._watchers.append(waiter)
            else:
                waiter.future.set_result(self._gone)
        try:
            return await waiter.future
        finally:
            self._unwatch(waiter)  # cancelled: nothing left behind

    def wait_gone(self, timeout: float | None = None) -> bool:
        """Block this thread until the instance ended, for at most ``timeout`` seconds;
        True if it did. On the provider's event loop it raises RuntimeError (unless
        ``timeout`` is 0: a poll): there it would block every stream, and only the loop
        can end the instance (use ``await proxy.gone()``)."""
        if timeout != 0 and self._on_loop():
            raise RuntimeError(
                f"{self!r}.wait_gone() was called on the provider's event loop thread, where "
                "it would block every stream (and only that loop can end the instance); "
                "use `await proxy.gone()` there"
            )
        return self._ended_event.wait(timeout)

    def wait_ended(self, timeout: float | None = None) -> bool:
        """The same as :meth:`wait_gone` (its older name)."""
        return self.wait_gone(timeout)

    def _unwatch(self, watcher: object) -> None:
        with _lock:
            watchers = self._watchers
            if watchers is not None:
                with contextlib.suppress(ValueError):  # told already, or taken back
                    watchers.remove(watcher)

    def _ended(self, why: str) -> None:
        """The instance ended (idempotent, thread-safe): tell everyone watching."""
        if self._gone is not None:
            return
        with _lock:
            if self._gone is not None:
                return
            self._gone = why
            watchers, self._watchers = self._watchers, None
        self._ended_event.set()
        if watchers:
            for watcher in watchers:
                self._tell(watcher)

    def _tell(self, watcher: Any) -> None:
        why = self._gone
        assert why is not None
        if type(watcher) is _Waiter:
            watcher.wake(why)
            return
        what = f"the on_gone hook {hooks.name(watcher)} of {self!r}"
        self._hooks().fire(watcher, self, what)


def _nothing() -> None:
    """What :meth:`Lifetime.on_gone` returns for a hook that already ran."""
