"""The threads that run one side's plain (``def``) methods, and the choice of thread for
each incoming call.

A plain method that calls the peer blocks its thread until the answer is in. When the
peer's answer needs a call back to this side (a listener that calls the provider, whose
method calls a listener again), that nested call must not wait for a thread of the same
pool: with every thread blocked on such a chain, it would wait until the callers time
out. So a *re-entrant* call, one whose parent is a call this side is still waiting for,
runs on a free regular thread when there is one and otherwise on an extra thread of a
pool of its own, bounded separately (``max_reentrant_workers``).

:class:`concurrent.futures.ThreadPoolExecutor` does not say when its work starts to
queue; :class:`CountedPool` counts, and logs it once with the keyword to raise.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

from backchannel.v1 import envelope_pb2 as pb

logger = logging.getLogger("backchannel")

P = ParamSpec("P")
T = TypeVar("T")


class Awaiting(Protocol):
    """What tells a re-entrant call: the session of the stream the call came on."""

    def awaits(self, call_id: int) -> bool:
        """True while this side waits for the answer to its outgoing call ``call_id``."""
        ...


class CountedPool(concurrent.futures.Executor):
    """A thread pool that knows how many of its threads are taken, and warns once when
    work has to queue for one.

    ``busy`` counts work submitted and not yet done (running or queued), so
    ``busy < max_workers`` means a thread takes new work at once.
    """

    def __init__(self, max_workers: int, name: str, exhausted: str) -> None:
        self.max_workers = max_workers
        self.name = name
        self._exhausted = exhausted  # the warning, logged once
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._busy = 0
        self._warned = False

    @property
    def busy(self) -> int:
        """Work submitted and not done yet: running, or queued for a thread."""
        return self._busy

    def has_free_thread(self) -> bool:
        """True when work submitted now starts at once."""
        return self._busy < self.max_workers

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` on a thread of the pool (or queue it for one)."""
        with self._lock:
            self._busy += 1
            warn = self._busy > self.max_workers and not self._warned  # it queues
            if warn:
                self._warned = True
        if warn:
            logger.warning(self._exhausted)
        try:
            future = self._executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._done()
            raise
        future.add_done_callback(self._done)  # also when cancelled before it ran
        return future

    def _done(self, _future: object = None) -> None:
        with self._lock:
            self._busy -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut the pool down (see :meth:`concurrent.futures.Executor.shutdown`)."""
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)


class CallPools:
    """One side's pools for plain methods: the regular one (``max_workers``) and the one
    for re-entrant calls that find it full (``max_reentrant_workers``)."""

    def __init__(
        self, max_workers: int, max_reentrant_workers: int, *, role: str, owners: str
    ) -> None:
        """``role`` names the threads and the pool in words ("provider", "callback");
        ``owners`` the classes whose keywords set the sizes ("Server or AsyncServer")."""
        for keyword, value in (
            ("max_workers", max_workers),
            ("max_reentrant_workers", max_reentrant_workers),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{keyword} must be an int >= 1, got {value!r}")
        self.regular = CountedPool(
            max_workers,
            f"backchannel-{role}",
            f"the {role} thread pool is exhausted: all {max_workers} threads "
            f"(max_workers={max_workers}) are busy and plain methods now queue for a free "
            f"one; if calls stall or time out, raise max_workers= on the {owners} "
            "(logged once)",
        )
        self.reentrant = CountedPool(
            max_reentrant_workers,
            f"backchannel-{role}-reentrant",
            f"the {role} re-entrant thread pool is exhausted: all {max_reentrant_workers} "
            f"threads (max_reentrant_workers={max_reentrant_workers}) run nested calls "
            "whose callers wait for them, and more nested calls now queue, which stalls "
            f"their chains until they time out; raise max_reentrant_workers= on the {owners}"
            " (logged once)",
        )

    def for_call(self, call: pb.Call, session: Awaiting | None) -> concurrent.futures.Executor:
        """The pool to run ``call`` in, a call that came on ``session`` (None: not on a
        stream, so never re-entrant).

        A call whose parent this side is still waiting for is re-entrant: the thread
        (or task) that made the parent is blocked on it, maybe holding the last regular
        thread, so it never queues behind the regular pool.
        """
        if (
            self.regular.has_free_thread()
            or not call.parent_id
            or session is None
            or not session.awaits(call.parent_id)
        ):
            return self.regular
        return self.reentrant

    def shutdown(self) -> None:
        """Stop both pools: queued work is cancelled, running work finishes on its own."""
        self.regular.shutdown(wait=False, cancel_futures=True)
        self.reentrant.shutdown(wait=False, cancel_futures=True)
