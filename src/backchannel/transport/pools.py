"""The threads that run one side's plain (``def``) methods, the choice of thread for
each incoming call, and how the threads are shared between streams.

A plain method that calls the peer blocks its thread until the answer is in. When the
peer's answer needs a call back to this side (a listener that calls the provider, whose
method calls a listener again), that nested call must not wait for a thread of the same
pool: with every thread blocked on such a chain, it would wait until the callers time
out. So a *re-entrant* call, one whose parent is a call this side is still waiting for,
runs on a free regular thread when there is one and otherwise on an extra thread of a
pool of its own, bounded separately (``max_reentrant_workers``).

When every thread is taken, work waits in a queue of its stream's own (a *lane*), and a
thread that frees up takes the next work of the next lane in turn: a stream with 400
calls queued gets one thread in turn like every other, so another stream's call starts
when the next thread frees up, not after the 400. Each lane keeps its order.

A stream whose peer reads slower than it asks (over ``max_queued_bytes``) is *held*: its
calls that have not started do not start until its queue drains. A thread that frees
up passes its lane by (other streams' work goes on) and tells the stream, which, while
its queue has room, has the free threads take its work (:meth:`CountedPool.resume_lane`),
a thread done with one telling it again rather than taking the next: threads outpace
the event loop that queues their results. Released, its lane takes turns again.

:class:`concurrent.futures.ThreadPoolExecutor` neither shares its threads between
streams nor says when its work starts to queue; :class:`CountedPool` does both, and
logs the queueing once with the keyword to raise.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast

from backchannel.v1 import envelope_pb2 as pb

logger = logging.getLogger("backchannel")

P = ParamSpec("P")
T = TypeVar("T")

#: the lane of work that comes on no stream (a unary Invoke, a client's own decoding)
NO_STREAM: object = None
#: a lane holding more cancelled work than this (and than twice its live work) is compacted
_COMPACT_OVER = 32


class Awaiting(Protocol):
    """What tells a re-entrant call: the session of the stream the call came on."""

    def awaits(self, call_id: int) -> bool:
        """True while this side waits for the answer to its outgoing call ``call_id``."""
        ...


class Holdable(Protocol):
    """A lane's key whose work may be held back: the session of a stream that may go
    over ``max_queued_bytes``."""

    #: True while the stream's calls that have not started must wait
    calls_held: bool
    #: the pools that passed its lane by while it was held: told when it no longer is
    held_pools: set[CountedPool]

    def fed(self) -> None:
        """A pool thread is free (it finished work of this stream's, or passed its
        lane by), or the lane emptied (called in any thread): the stream may start
        more of its work, with :meth:`CountedPool.resume_lane`, if its queue has room."""
        ...


class _Work(Generic[T]):
    """One submitted function, and the lane it waits in (None once taken or cancelled)."""

    __slots__ = ("args", "function", "future", "kwargs", "lane")

    def __init__(
        self,
        future: concurrent.futures.Future[T],
        function: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.future = future
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.lane: _Lane | None = None

    def run(self) -> None:
        """Run it in this thread, unless it was cancelled while it waited."""
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.function(*self.args, **self.kwargs)
        except BaseException as exc:  # as ThreadPoolExecutor: the future carries it
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class _Lane:
    """One stream's queued work, in arrival order; ``live`` counts what is not cancelled."""

    __slots__ = ("key", "live", "stream", "works")

    def __init__(self, key: object) -> None:
        self.key = key
        # the stream that may be held, when the key is one
        self.stream = cast("Holdable", key) if hasattr(key, "calls_held") else None
        self.works: collections.deque[_Work[Any]] = collections.deque()
        self.live = 0


class CountedPool(concurrent.futures.Executor):
    """A thread pool shared fairly between streams, that knows how many of its threads
    are taken and warns once when work has to queue for one.

    :meth:`submit_to` names the stream (any hashable key: its session) the work belongs
    to; :meth:`submit` is the lane of work on no stream. While a thread is free, work
    starts at once, whatever its lane. When none is, work queues in its lane, and each
    thread that finishes takes the oldest work of the lane whose turn it is, the lanes
    taking turns (round robin): a lane's work waits for at most one thread per other
    lane with work queued, however much work any of them queued. ``busy`` counts work
    submitted and not yet done (running or queued).
    """

    def __init__(self, max_workers: int, name: str, exhausted: str) -> None:
        self.max_workers = max_workers
        self.name = name
        self._exhausted = exhausted  # the warning, logged once
        # it only ever gets work while one of its threads is free: it never queues
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._busy = 0
        self._taken = 0  # threads running work (or taking the next), at most max_workers
        self._lanes: dict[object, _Lane] = {}  # lanes with live work queued
        self._turns: collections.deque[_Lane] = collections.deque()  # the same, in turn
        self._warned = False
        self._shut = False

    @property
    def busy(self) -> int:
        """Work submitted and not done yet: running, or queued for a thread."""
        return self._busy

    @property
    def queued(self) -> int:
        """Work queued for a thread, cancelled work left out."""
        return sum(lane.live for lane in list(self._lanes.values()))

    def has_free_thread(self) -> bool:
        """True when work submitted now starts at once."""
        return self._taken < self.max_workers

    def lane(self, key: object) -> Lane:
        """An executor that submits to this pool in the lane ``key``."""
        return Lane(self, key)

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` on a thread of the pool (or queue it for one), in
        the lane of work on no stream."""
        return self.submit_to(NO_STREAM, fn, *args, **kwargs)

    def submit_to(
        self, key: object, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` on a thread of the pool now, or queue it in the
        lane ``key`` until a thread takes it in turn. Cancelling the future of queued
        work takes it out of the queue."""
        warn = False
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._busy += 1
            if self._taken < self.max_workers:  # the usual case: as a plain executor
                self._taken += 1
                work = None
            else:  # it queues, in its lane
                future: concurrent.futures.Future[T] = concurrent.futures.Future()
                work = _Work(future, fn, args, kwargs)
                lane = self._lanes.get(key)
                if lane is None:
                    lane = self._lanes[key] = _Lane(key)
                    self._turns.append(lane)
                lane.works.append(work)
                lane.live += 1
                work.lane = lane
                warn, self._warned = not self._warned, True
        if work is not None:
            future.add_done_callback(functools.partial(self._dequeue, work))
            if warn:
                logger.warning(self._exhausted)
            return future
        try:
            started = self._executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._done()
            raise
        started.add_done_callback(self._done)  # also when cancelled before it ran
        return started

    def _done(self, _future: object = None) -> None:
        """A thread's work is over: it takes the oldest live work of the lane whose turn
        it is (that lane goes to the back of the turns), or is free when none waits."""
        while True:
            with self._lock:
                self._busy -= 1
                work = self._take_next()
                if work is None:
                    self._taken -= 1
                    return
                shut = self._shut
            if not shut:
                # the thread stays taken: the executor has it, or one of its own, run this
                try:
                    self._executor.submit(work.run).add_done_callback(self._done)
                    return
                except RuntimeError:  # shut down meanwhile
                    pass
            work.future.cancel()  # shutting down: queued work does not start; next one

    def _take_next(self) -> _Work[Any] | None:
        """Under the lock: the oldest live work of the lane whose turn it is, out of its
        lane, or None when no work waits. A held stream's lane is passed by (it goes to
        the back of the turns) and the stream told (it may feed this pool its work)."""
        turns = self._turns
        passed = 0
        while len(turns) > passed:
            lane = turns[0]
            stream = lane.stream
            if stream is not None and stream.calls_held:
                stream.held_pools.add(self)
                if stream.calls_held:  # read again: released in between, it saw no pool
                    stream.fed()  # this thread is free: the stream may have room for it
                    turns.rotate(-1)
                    passed += 1
                    continue
            work = lane.works.popleft()
            if work.lane is None:  # cancelled while it waited: a live one is behind
                continue
            work.lane = None
            lane.live -= 1
            turns.popleft()
            if lane.live:
                turns.append(lane)
            else:  # what is left in it was cancelled
                del self._lanes[lane.key]
            return work
        return None

    def resume(self) -> None:
        """A held stream was released: free threads take its queued work (and any other
        lane's) as they would have, had it not been held."""
        while True:
            with self._lock:
                if self._shut or self._taken >= self.max_workers:
                    return
                work = self._take_next()
                if work is None:
                    return
                self._taken += 1
            try:
                self._executor.submit(work.run).add_done_callback(self._done)
            except RuntimeError:  # shut down meanwhile: it does not start
                with self._lock:
                    self._taken -= 1
                    self._busy -= 1
                work.future.cancel()
                return

    def holds(self, key: object) -> bool:
        """True while work of the lane ``key`` is queued."""
        return key in self._lanes

    def resume_lane(self, key: object) -> None:
        """Free threads take the queued work of the held stream ``key``, which stays
        held: a thread done with one does not take the next but tells the stream
        (:meth:`Holdable.fed`), whose loop starts more once it has queued the results
        (threads outpace it). The stream calls this while its queue has room."""
        while True:
            with self._lock:
                lane = self._lanes.get(key)
                if self._shut or self._taken >= self.max_workers or lane is None:
                    return
                stream = lane.stream
                work = lane.works.popleft()
                if work.lane is None:  # cancelled while it waited: a live one is behind
                    continue
                work.lane = None
                lane.live -= 1
                if not lane.live:
                    del self._lanes[key]
                    self._turns.remove(lane)
                self._taken += 1
            done = self._done if stream is None else functools.partial(self._fed, stream)
            try:
                self._executor.submit(work.run).add_done_callback(done)
            except RuntimeError:  # shut down meanwhile: it does not start
                with self._lock:
                    self._taken -= 1
                    self._busy -= 1
                work.future.cancel()
                return

    def _fed(self, stream: Holdable, future: object) -> None:
        self._done(future)
        stream.fed()

    def _dequeue(self, work: _Work[Any], _future: object) -> None:
        """Queued work's future is done: if it was cancelled while it waited, it leaves
        its lane (a lane with nothing live left leaves the turns)."""
        with self._lock:
            lane = work.lane
            if lane is None:  # it was taken to run: _done counts it
                return
            work.lane = None
            self._busy -= 1
            lane.live -= 1
            if not lane.live:
                del self._lanes[lane.key]
                self._turns.remove(lane)  # one entry per stream with work queued
                if lane.stream is not None and lane.stream.calls_held:
                    lane.stream.fed()  # its parked calls wait for this lane to empty
            elif len(lane.works) > 2 * lane.live + _COMPACT_OVER:  # amortized O(1)
                lane.works = collections.deque(w for w in lane.works if w.lane is not None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut the pool down (see :meth:`concurrent.futures.Executor.shutdown`): with
        ``cancel_futures``, queued work is cancelled; running work finishes."""
        with self._lock:
            self._shut = True
            queued = [w for lane in self._turns for w in lane.works if w.lane is not None]
        if cancel_futures:
            for work in queued:
                work.future.cancel()
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)


class Lane(concurrent.futures.Executor):
    """One stream's way into a :class:`CountedPool`: what it submits queues (when it
    has to) behind that stream's own earlier work only, and takes its turn."""

    __slots__ = ("key", "pool")

    def __init__(self, pool: CountedPool, key: object) -> None:
        self.pool = pool
        self.key = key

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` in the pool, in this lane."""
        return self.pool.submit_to(self.key, fn, *args, **kwargs)


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
            f"one, each stream's in turn; if calls stall or time out, raise max_workers= "
            f"on the {owners} (logged once)",
        )
        self.reentrant = CountedPool(
            max_reentrant_workers,
            f"backchannel-{role}-reentrant",
            f"the {role} re-entrant thread pool is exhausted: all {max_reentrant_workers} "
            f"threads (max_reentrant_workers={max_reentrant_workers}) run nested calls "
            "(or decode big results) whose callers wait for them, and more now queue, "
            "which stalls their chains until they time out; raise max_reentrant_workers= "
            f"on the {owners} (logged once)",
        )

    def for_call(self, call: pb.Call, session: Awaiting | None) -> CountedPool:
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

    def executor_for(self, call: pb.Call, session: Awaiting | None) -> concurrent.futures.Executor:
        """Where ``call`` runs: the pool :meth:`for_call` chooses, in the lane of its
        stream (``session``; None shares the lane of work on no stream)."""
        return self.for_call(call, session).lane(session)

    def for_waiter(self, session: Awaiting | None) -> concurrent.futures.Executor:
        """Where work runs that a caller on this side waits for and that never blocks
        (decoding a big result): a free regular thread, else the re-entrant pool. The
        caller may hold the last regular thread: behind it the work would never start."""
        pool = self.regular if self.regular.has_free_thread() else self.reentrant
        return pool.lane(session)

    def shutdown(self) -> None:
        """Stop both pools: queued work is cancelled, running work finishes on its own."""
        self.regular.shutdown(wait=False, cancel_futures=True)
        self.reentrant.shutdown(wait=False, cancel_futures=True)
