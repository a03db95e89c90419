"""Running an application's lifetime hooks (a reverse proxy's gone callbacks, a provider's
``on_connect`` and ``on_disconnect``) for one provider: an ``async def`` one as a task on
its loop, a plain one in the calling thread or, when that is the loop's, on a thread of
its pool; each tracked until it returned, so that the provider's stop waits for them.
What a hook raises is logged (rate-limited) and goes no further.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger("backchannel")

T = TypeVar("T")

#: a hook: called with one argument; ``async def`` ones are awaited on the loop
Hook = Callable[[T], object]

#: a hook function's failure is logged with its traceback at most once per this many
#: seconds; the others at DEBUG, counted, and the count told with the next traceback (a
#: thousand listeners of one consumer going at once with a buggy hook make one traceback)
LOG_WINDOW = 60.0
#: at most this many functions are remembered; past it, the others share one window
_LOGGED_MAX = 1024
#: function name -> [when its last traceback was logged, failures logged at DEBUG since]
_windows: dict[str, list[float]] = {}
_windows_lock = threading.Lock()
_now = time.monotonic  # the clock of the log windows (a test's may replace it)


def is_async(fn: Callable[..., object]) -> bool:
    """True for an ``async def`` function (or an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004  (an async __call__, not callable())
    )


def name(fn: object) -> str:
    """A hook's name for log lines: ``module.QualName`` of the function (of the function
    inside a ``functools.partial``)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{qualname}"


def _settle(done: concurrent.futures.Future[None], _: object = None) -> None:
    if not done.done():
        # two threads may settle one hook's future at once: the second does nothing
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            done.set_result(None)


class Runner:
    """Runs one provider's hooks and knows which have not returned yet.

    ``loop`` is the provider's event loop, ``in_loop`` tells whether the caller runs on
    its thread, ``pool`` is where a plain hook fired on the loop runs (a plain hook
    never runs on the loop: it could block every stream). When ``pool`` is shut down (the
    provider stopped), a plain hook fired on the loop gets a thread of its own.
    """

    def __init__(
        self,
        pool: concurrent.futures.Executor,
        loop: asyncio.AbstractEventLoop,
        in_loop: Callable[[], bool],
    ) -> None:
        self._pool = pool
        self._loop = loop
        self._in_loop = in_loop
        #: a future per hook fired and not returned yet (dropped when it returns)
        self._pending: set[concurrent.futures.Future[None]] = set()
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # the loop holds tasks weakly

    def fire(
        self,
        fn: Hook[T],
        arg: T,
        what: str,
        *,
        after: concurrent.futures.Future[None] | None = None,
    ) -> concurrent.futures.Future[None]:
        """Run ``fn(arg)`` (thread-safe), once ``after`` (another hook's future) is done
        when given; returns a future done once ``fn`` returned (or was not run). ``what``
        names the hook in log lines."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._pending.add(done)
        done.add_done_callback(self._forget)
        if after is not None and not after.done():
            after.add_done_callback(lambda _: self._run(fn, arg, what, done))
        else:
            self._run(fn, arg, what, done)
        return done

    def _forget(self, done: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._pending.discard(done)

    def _run(self, fn: Hook[T], arg: T, what: str, done: concurrent.futures.Future[None]) -> None:
        on_loop = self._in_loop()
        if is_async(fn):
            if on_loop:
                self._start(fn, arg, what, done)
                return
            try:
                self._loop.call_soon_threadsafe(self._start, fn, arg, what, done)
            except RuntimeError:  # the loop is closed: nothing can run on it any more
                logger.warning("%s was not run: the provider's event loop is closed", what)
                _settle(done)
            return
        if not on_loop:
            self._call(fn, arg, what, done)
            return
        try:
            submitted = self._pool.submit(self._call, fn, arg, what, done)
        except RuntimeError:  # the pool is shut down (the provider stopped): not the loop
            name = "backchannel-hook"
            threading.Thread(
                target=self._call, args=(fn, arg, what, done), name=name, daemon=True
            ).start()
            return
        # cancelled in the queue (the provider stopped before a thread took it): not run
        submitted.add_done_callback(lambda f: _settle(done) if f.cancelled() else None)

    def _call(self, fn: Hook[T], arg: T, what: str, done: concurrent.futures.Future[None]) -> None:
        """A plain hook, in this thread; a coroutine it returns is run on the loop."""
        try:
            result = fn(arg)
        except Exception as exc:
            failed(fn, what, exc)
            _settle(done)
            return
        if not inspect.iscoroutine(result):  # the usual case
            _settle(done)
            return
        try:  # a plain function that returned a coroutine
            running = asyncio.run_coroutine_threadsafe(_guard(result, fn, what), self._loop)
        except RuntimeError:
            result.close()
            logger.warning("%s was not run: the provider's event loop is closed", what)
            _settle(done)
            return
        running.add_done_callback(functools.partial(_settle, done))

    def _start(self, fn: Hook[T], arg: T, what: str, done: concurrent.futures.Future[None]) -> None:
        """On the loop: run an ``async def`` hook as a task of its own, in a fresh context
        (not the context of the call or stream that ended what it watches)."""
        try:
            coroutine = fn(arg)
        except Exception as exc:
            failed(fn, what, exc)
            _settle(done)
            return
        if not inspect.iscoroutine(coroutine):  # an async __call__ that was not one after all
            _settle(done)
            return
        task = self._loop.create_task(_guard(coroutine, fn, what), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(functools.partial(_settle, done))

    async def drain(self, timeout: float) -> None:
        """On the loop: wait until every hook fired (and every hook those fire) returned,
        for at most ``timeout`` seconds; then log the ones abandoned, once."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning(
                    "%d disconnect hook(s) still running after %s s; the provider stops "
                    "without waiting for them",
                    len(pending),
                    timeout,
                )
                return
            await asyncio.wait([asyncio.wrap_future(f) for f in pending], timeout=left)


async def _guard(coroutine: Coroutine[Any, Any, object], fn: object, what: str) -> None:
    try:
        await coroutine
    except Exception as exc:
        failed(fn, what, exc)


def failed(fn: object, what: str, exc: BaseException) -> None:
    """Log what a hook raised: with its traceback at most once per :data:`LOG_WINDOW`
    seconds per function (saying how many failures were logged at DEBUG since the
    last), at DEBUG in between."""
    key = name(fn)
    now = _now()
    with _windows_lock:
        window = _windows.get(key)
        if window is None and len(_windows) >= _LOGGED_MAX:
            for old in [k for k, w in _windows.items() if now - w[0] >= LOG_WINDOW]:
                del _windows[old]
            if len(_windows) >= _LOGGED_MAX:  # still full: the others share one window
                key = "(other hooks)"
                window = _windows.get(key)
        if window is None or now - window[0] >= LOG_WINDOW:
            suppressed = int(window[1]) if window is not None else 0
            _windows[key] = [now, 0]
        else:
            window[1] += 1
            suppressed = -1
    if suppressed < 0:
        logger.debug("%s raised: %r", what, exc)
        return
    since = (
        f"; {suppressed} more failure(s) of it were logged at DEBUG in the last {LOG_WINDOW:g} s"
        if suppressed
        else ""
    )
    logger.error(
        "%s raised (swallowed%s; more failures of %s within %g s are logged at DEBUG)",
        what,
        since,
        key,
        LOG_WINDOW,
        exc_info=exc,
    )
