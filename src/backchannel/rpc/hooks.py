"""Running an application's lifetime hooks (a reverse proxy's gone callbacks, a provider's
``on_connect`` and ``on_disconnect``): an ``async def`` one as a task on the provider's
loop, a plain one in the calling thread or, when that is the loop's, on a thread of the
provider's pool. What a hook raises is logged and goes no further.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger("backchannel")

T = TypeVar("T")

#: a hook: called with one argument; ``async def`` ones are awaited on the loop
Hook = Callable[[T], object]

#: the tasks of running ``async def`` hooks (the loop holds tasks weakly)
_tasks: set[asyncio.Task[None]] = set()

#: the hooks (by qualified name) whose failure was logged with its traceback: later
#: failures of the same function are logged at DEBUG, so that a thousand listeners of
#: one consumer going at once with a buggy hook make one traceback, not a thousand
_logged: set[str] = set()
#: at most this many names are remembered (past it, every failure gets its traceback)
_LOGGED_MAX = 1024
_logged_lock = threading.Lock()


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


def fire(
    fn: Hook[T],
    arg: T,
    what: str,
    loop: asyncio.AbstractEventLoop,
    pool: concurrent.futures.Executor,
    *,
    on_loop: bool,
) -> None:
    """Run ``fn(arg)``, thread-safe: ``on_loop`` says the caller runs on ``loop``'s
    thread. An ``async def`` ``fn`` becomes a task on ``loop``; a plain one runs here
    unless here is the loop (it would hold every stream up): then on ``pool``. ``what``
    names the hook in a log line."""
    if is_async(fn):
        if on_loop:
            _start(fn, arg, what, loop)
            return
        try:
            loop.call_soon_threadsafe(_start, fn, arg, what, loop)
        except RuntimeError:  # the loop is closed: nothing can run on it any more
            logger.warning("%s was not run: the provider's event loop is closed", what)
        return
    if not on_loop:
        call(fn, arg, what, loop)
        return
    try:
        pool.submit(call, fn, arg, what, loop)
    except RuntimeError:  # the pool is shut down (the provider stops): run it here
        call(fn, arg, what, loop)


def call(fn: Hook[T], arg: T, what: str, loop: asyncio.AbstractEventLoop) -> None:
    """Call a plain hook in this thread; a coroutine it returns is run on ``loop``."""
    try:
        result = fn(arg)
    except Exception as exc:
        failed(fn, what, exc)
        return
    if inspect.iscoroutine(result):  # a plain function that returned a coroutine
        try:
            asyncio.run_coroutine_threadsafe(_guard(result, fn, what), loop)
        except RuntimeError:
            result.close()
            logger.warning("%s was not run: the provider's event loop is closed", what)


def _start(fn: Hook[T], arg: T, what: str, loop: asyncio.AbstractEventLoop) -> None:
    """On the loop: run an ``async def`` hook as a task of its own, in a fresh context
    (not the context of the call or stream that ended what it watches)."""
    try:
        coroutine = fn(arg)
    except Exception as exc:
        failed(fn, what, exc)
        return
    if not inspect.iscoroutine(coroutine):  # an async __call__ that was not one after all
        return
    task = loop.create_task(_guard(coroutine, fn, what), context=contextvars.Context())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _guard(coroutine: Coroutine[Any, Any, object], fn: object, what: str) -> None:
    try:
        await coroutine
    except Exception as exc:
        failed(fn, what, exc)


def failed(fn: object, what: str, exc: BaseException) -> None:
    """Log what a hook raised: with its traceback the first time that function raises,
    at DEBUG after that."""
    key = name(fn)
    with _logged_lock:
        first = key not in _logged
        if first and len(_logged) < _LOGGED_MAX:
            _logged.add(key)
    if first:
        logger.error(
            "%s raised (swallowed; later failures of %s are logged at DEBUG)",
            what,
            key,
            exc_info=exc,
        )
    else:
        logger.debug("%s raised: %r", what, exc)
