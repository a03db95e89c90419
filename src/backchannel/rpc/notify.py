"""Event notify: Dubbo's ``oninvoke`` / ``onreturn`` / ``onthrow`` around a consumer's calls.

One job: check a method's hooks against their signatures when the reference is made, and
wrap the method's call with them, for the sync :class:`~backchannel.Client` and for the
:class:`~backchannel.AsyncClient`. ``async_=True`` (Dubbo's ``async="true"``) makes the
call return a future at once; it is orthogonal to the hooks. The semantics are Dubbo's
FutureFilter:

- ``oninvoke(*args)`` runs on the caller before the call is sent; if it raises,
  ``onthrow`` gets that exception and the call still proceeds;
- ``onreturn(result)`` or ``onreturn(result, *args)`` (by the hook's own signature) runs
  on success only; if it raises, ``onthrow`` gets that exception and the caller's result
  is unaffected;
- ``onthrow(exc)`` or ``onthrow(exc, *args)`` runs on any failure (the provider's
  exception, a timeout, a lost stream, a cancelled call); if it raises, that is logged
  and swallowed.

Where hooks run: the sync client runs them in the calling thread for ``async_=False``
and in a small thread pool of the client's own for ``async_=True``; the asyncio client
awaits ``async def`` hooks in the call's own task and runs plain hooks in that pool.
Never on the stream's reader, so a slow hook delays only its own call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from backchannel.errors import CallCancelled
from backchannel.rpc.interface import Method, MethodSpec
from backchannel.transport import observe
from backchannel.transport.handoff import run_in_pool
from backchannel.transport.pools import CountedPool

logger = logging.getLogger("backchannel")

Hook = Callable[..., Any]
#: exceptions the hooks see; KeyboardInterrupt and SystemExit pass through untouched
_FAILURES = (Exception, asyncio.CancelledError)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """``onreturn`` or ``onthrow``, with the shape its signature asks for."""

    function: Hook
    #: True: ``(value, *args)``; False: ``(value)`` alone
    with_args: bool
    #: True for an ``async def`` hook
    coroutine: bool

    def arguments(self, value: object, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (value, *args) if self.with_args else (value,)


@dataclass(frozen=True, slots=True)
class MethodHooks:
    """A method's notify settings, checked against its parameters."""

    #: ``Service.method``, for messages and logs
    qualname: str
    #: True: the call returns a future at once
    async_: bool
    oninvoke: Hook | None
    oninvoke_coroutine: bool
    onreturn: _Outcome | None
    onthrow: _Outcome | None

    @property
    def coroutines(self) -> list[str]:
        """The names of the hooks that are ``async def``."""
        found = [("oninvoke", self.oninvoke_coroutine)]
        found += [(kind, o is not None and o.coroutine) for kind, o in self._outcomes()]
        return [kind for kind, is_coroutine in found if is_coroutine]

    def _outcomes(self) -> list[tuple[str, _Outcome | None]]:
        return [("onreturn", self.onreturn), ("onthrow", self.onthrow)]


def method_hooks(method: MethodSpec, settings: Method) -> MethodHooks | None:
    """Check ``settings``' hooks against ``method``; None when it has neither hooks nor async_.

    Raises TypeError naming the method and the hook when a hook is not callable or cannot
    take the arguments it will be given.
    """
    if settings.oninvoke is None and settings.onreturn is None and settings.onthrow is None:
        if not settings.async_:
            return None
        return MethodHooks(method.qualname, True, None, False, None, None)
    counts = _argument_counts(method)
    oninvoke = settings.oninvoke
    if oninvoke is not None:
        signature = _signature(method, "oninvoke", oninvoke)
        if signature is not None:
            for count in counts:
                _check_binds(method, "oninvoke", oninvoke, signature, count, "the call's arguments")
    return MethodHooks(
        method.qualname,
        settings.async_,
        oninvoke,
        oninvoke is not None and _is_coroutine(oninvoke),
        _outcome(method, "onreturn", settings.onreturn, counts),
        _outcome(method, "onthrow", settings.onthrow, counts),
    )


def _argument_counts(method: MethodSpec) -> list[int]:
    """How many positional arguments a call of ``method`` may carry (ends of the range)."""
    most = len(method.parameters)
    counts = sorted({method.required, most})
    return [*counts, most + 1] if method.variadic else counts


def _signature(method: MethodSpec, kind: str, hook: object) -> inspect.Signature | None:
    if not callable(hook):
        raise TypeError(
            f"{method.qualname}: {kind} must be a callable (a function or a bound method), "
            f"got {hook!r}"
        )
    try:
        return inspect.signature(hook)
    except (TypeError, ValueError):  # some builtins have none: trust them
        return None


def _check_binds(
    method: MethodSpec,
    kind: str,
    hook: Hook,
    signature: inspect.Signature,
    count: int,
    what: str,
) -> None:
    try:
        signature.bind(*([None] * count))
    except TypeError as exc:
        name = getattr(hook, "__qualname__", repr(hook))
        raise TypeError(
            f"{method.qualname}: {kind} hook {name}{signature} cannot take {what} "
            f"({count} positional argument{'s' if count != 1 else ''}): {exc}"
        ) from None


def _outcome(
    method: MethodSpec, kind: str, hook: Hook | None, counts: list[int]
) -> _Outcome | None:
    if hook is None:
        return None
    signature = _signature(method, kind, hook)
    coroutine = _is_coroutine(hook)
    if signature is None:
        return _Outcome(hook, True, coroutine)
    parameters = signature.parameters.values()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    value = "the result" if kind == "onreturn" else "the exception"
    if len(positional) == 1 and not variadic:
        _check_binds(method, kind, hook, signature, 1, value)
        return _Outcome(hook, False, coroutine)
    for count in counts:
        _check_binds(method, kind, hook, signature, 1 + count, f"{value} and the call's arguments")
    return _Outcome(hook, True, coroutine)


def unbound_arguments(
    method: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """The arguments of a call that did not fit ``method``, in a shape onthrow can take.

    One per parameter: the positional ones first, then keywords by name, None for a
    parameter given neither; extra positional arguments are dropped unless the method
    takes ``*args``. (``onthrow(exc, *args)`` was checked against the method's
    parameters, so the arguments as passed might not fit it.)
    """
    names = method.parameters
    if method.variadic and len(args) >= len(names):
        return args
    given = list(args[: len(names)])
    given += [kwargs.get(name) for name in names[len(given) :]]
    return tuple(given)


def _is_coroutine(hook: object) -> bool:
    """True for an ``async def`` function or method, or an object with an async __call__
    (its class's own or inherited; also when the class is a descriptor, as class-based
    decorators are)."""
    if inspect.iscoroutinefunction(hook):
        return True
    return inspect.iscoroutinefunction(type(hook).__call__)


class HookPool:
    """The threads hooks run in when they may not run on the caller: created on first use.

    It warns once when hooks start to queue for a thread (slow hooks then delay the hooks
    of every later call)."""

    def __init__(self, max_workers: int, name: str = "backchannel-notify") -> None:
        self._max_workers = max_workers
        self._name = name
        self._pool: CountedPool | None = None
        self._lock = threading.Lock()
        self._closed = False

    def executor(self) -> CountedPool | None:
        """The pool, or None once shut down (hooks then run inline)."""
        with self._lock:
            if self._pool is None and not self._closed:
                size = self._max_workers
                self._pool = CountedPool(
                    size,
                    self._name,
                    f"the event-notify hook pool is exhausted: all {size} threads "
                    f"(max_workers={size}) run hooks and more hooks now queue, so they run "
                    "late; make oninvoke/onreturn/onthrow quick, or raise max_workers= on "
                    "the Client or AsyncClient (logged once)",
                )
            return self._pool

    def run(self, work: Callable[[], None]) -> None:
        """Run ``work`` in the pool; inline when the pool is shut down (the client closed)."""
        pool = self.executor()
        try:
            if pool is not None:
                pool.submit(work)
                return
        except RuntimeError:  # shut down between the check and the submit
            pass
        work()

    def shutdown(self) -> None:
        """Let running and queued hooks finish in the background; start no new threads."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)


# --- the sync client ------------------------------------------------------------------------


def _run_sync(hooks: MethodHooks, kind: str, function: Hook, args: tuple[Any, ...]) -> None:
    result = function(*args)
    if inspect.isawaitable(result):  # an async hook the reference-time check missed
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(
            f"{hooks.qualname}: {kind} returned an awaitable; the sync Client cannot await "
            "hooks: use a plain function, or AsyncClient"
        )


def _throw_sync(hooks: MethodHooks, exc: BaseException, args: tuple[Any, ...]) -> None:
    """Give ``exc`` to onthrow; log what onthrow raises (or exc itself when there is none)."""
    onthrow = hooks.onthrow
    if onthrow is None:
        return
    try:
        _run_sync(hooks, "onthrow", onthrow.function, onthrow.arguments(exc, args))
    except Exception:
        logger.exception("the onthrow hook of %s() raised; ignored", hooks.qualname)


def _hook_failed_sync(hooks: MethodHooks, kind: str, exc: Exception, args: tuple[Any, ...]) -> None:
    if hooks.onthrow is None:
        logger.error("the %s hook of %s() raised", kind, hooks.qualname, exc_info=exc)
    _throw_sync(hooks, exc, args)


def _invoke_sync(hooks: MethodHooks, args: tuple[Any, ...]) -> None:
    if hooks.oninvoke is not None:
        try:
            _run_sync(hooks, "oninvoke", hooks.oninvoke, args)
        except Exception as exc:
            _hook_failed_sync(hooks, "oninvoke", exc, args)


def _return_sync(hooks: MethodHooks, result: object, args: tuple[Any, ...]) -> None:
    onreturn = hooks.onreturn
    if onreturn is not None:
        try:
            _run_sync(hooks, "onreturn", onreturn.function, onreturn.arguments(result, args))
        except Exception as exc:
            _hook_failed_sync(hooks, "onreturn", exc, args)


def check_sync(hooks: MethodHooks) -> None:
    """Refuse ``async def`` hooks on the sync client, when the reference is made."""
    if hooks.coroutines:
        raise TypeError(
            f"{hooks.qualname}: the sync Client cannot await the async def hook(s) "
            f"{', '.join(hooks.coroutines)}; use plain functions, or AsyncClient"
        )


def wrap_sync(
    hooks: MethodHooks,
    method: MethodSpec,
    blocking: Callable[[tuple[Any, ...]], Any],
    start: Callable[[tuple[Any, ...]], concurrent.futures.Future[Any]],
    pool: HookPool,
) -> Callable[..., Any]:
    """The sync client's proxy method: hooks around ``blocking`` (async_=False), or
    around ``start``'s future (async_=True, returning a future resolved after the hooks).

    ``blocking`` and ``start`` take the bound positional arguments and are called in the
    caller's thread.
    """
    check_sync(hooks)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = method.bind(args, kwargs)
        except Exception as exc:
            fitted = unbound_arguments(method, args, kwargs)
            if hooks.async_:
                return _failed_future(hooks, exc, fitted, pool)
            _throw_sync(hooks, exc, fitted)
            raise
        _invoke_sync(hooks, bound)
        if hooks.async_:
            return _start_sync(hooks, bound, start, pool)
        try:
            result = blocking(bound)
        except _FAILURES as exc:
            _throw_sync(hooks, exc, bound)
            raise
        _return_sync(hooks, result, bound)
        return result

    if observe.AVAILABLE:  # OpenTelemetry: the hooks run inside the call's span
        return observe.hooks_sync(method.service, method.name, call)
    return call


def _failed_future(
    hooks: MethodHooks, exc: Exception, args: tuple[Any, ...], pool: HookPool
) -> concurrent.futures.Future[Any]:
    outer: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def finish() -> None:
        _throw_sync(hooks, exc, args)
        _settle(outer, exc, None)

    pool.run(observe.carry(finish) if observe.AVAILABLE else finish)
    return outer


def _start_sync(
    hooks: MethodHooks,
    args: tuple[Any, ...],
    start: Callable[[tuple[Any, ...]], concurrent.futures.Future[Any]],
    pool: HookPool,
) -> concurrent.futures.Future[Any]:
    try:
        inner = start(args)
    except Exception as exc:  # the client is closed
        return _failed_future(hooks, exc, args, pool)
    outer: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def finish(done: concurrent.futures.Future[Any]) -> None:
        failure: BaseException | None
        if done.cancelled():
            failure = CallCancelled(f"{hooks.qualname}() was cancelled")
        else:
            failure = done.exception()
        if failure is not None:
            _throw_sync(hooks, failure, args)
            _settle(outer, failure, None)
            return
        result = done.result()
        _return_sync(hooks, result, args)
        _settle(outer, None, result)

    def cancelled(future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            inner.cancel()  # the caller gave up: so does the call (onthrow sees it)

    outer.add_done_callback(cancelled)
    if observe.AVAILABLE:  # OpenTelemetry: the hooks run inside the call's span
        finish = observe.carry(finish)
    # the inner future completes on the client's loop thread: hooks go to the pool
    inner.add_done_callback(lambda done: pool.run(functools.partial(finish, done)))
    return outer


def _settle(
    future: concurrent.futures.Future[Any], failure: BaseException | None, result: object
) -> None:
    try:
        if failure is not None:
            future.set_exception(failure)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:  # the caller cancelled it
        pass


# --- the asyncio client ---------------------------------------------------------------------


async def _run_async(
    hooks: MethodHooks, function: Hook, coroutine: bool, args: tuple[Any, ...], pool: HookPool
) -> None:
    if coroutine:
        result = function(*args)
    else:
        executor = pool.executor()
        call: Callable[[], Any] = functools.partial(function, *args)
        if observe.AVAILABLE:  # OpenTelemetry: the hook runs inside the call's span
            call = observe.carry(call)
        # once the pool is shut down (the client closed), hooks run inline, as in HookPool.run
        result = call() if executor is None else await run_in_pool(executor, call)
    if inspect.isawaitable(result):
        await result


async def _throw_async(
    hooks: MethodHooks, exc: BaseException, args: tuple[Any, ...], pool: HookPool
) -> None:
    onthrow = hooks.onthrow
    if onthrow is None:
        return
    try:
        arguments = onthrow.arguments(exc, args)
        await _run_async(hooks, onthrow.function, onthrow.coroutine, arguments, pool)
    except Exception:
        logger.exception("the onthrow hook of %s() raised; ignored", hooks.qualname)


async def _hook_failed_async(
    hooks: MethodHooks, kind: str, exc: Exception, args: tuple[Any, ...], pool: HookPool
) -> None:
    if hooks.onthrow is None:
        logger.error("the %s hook of %s() raised", kind, hooks.qualname, exc_info=exc)
    await _throw_async(hooks, exc, args, pool)


def wrap_async(
    hooks: MethodHooks,
    method: MethodSpec,
    invoke: Callable[[tuple[Any, ...]], Coroutine[Any, Any, Any]],
    pool: HookPool,
) -> Callable[..., Any]:
    """The asyncio client's proxy method: a coroutine with the hooks around ``invoke``
    (async_=False), or a Task already running it (async_=True).

    ``invoke`` takes the bound positional arguments and returns the call's coroutine.
    """

    async def run(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            bound = method.bind(args, kwargs)
        except Exception as exc:
            await _throw_async(hooks, exc, unbound_arguments(method, args, kwargs), pool)
            raise
        if hooks.oninvoke is not None:
            try:
                await _run_async(hooks, hooks.oninvoke, hooks.oninvoke_coroutine, bound, pool)
            except Exception as exc:
                await _hook_failed_async(hooks, "oninvoke", exc, bound, pool)
        try:
            result = await invoke(bound)
        except _FAILURES as exc:
            await _throw_async(hooks, exc, bound, pool)
            raise
        onreturn = hooks.onreturn
        if onreturn is not None:
            try:
                arguments = onreturn.arguments(result, bound)
                await _run_async(hooks, onreturn.function, onreturn.coroutine, arguments, pool)
            except Exception as exc:
                await _hook_failed_async(hooks, "onreturn", exc, bound, pool)
        return result

    if observe.AVAILABLE:  # OpenTelemetry: the hooks run inside the call's span
        run = observe.hooks_async(method.service, method.name, run)

    def call(*args: Any, **kwargs: Any) -> Any:
        if not hooks.async_:
            return run(args, kwargs)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{hooks.qualname}() has async_=True on an AsyncClient: call it from a "
                "running event loop (it returns a Task)"
            ) from None
        return loop.create_task(run(args, kwargs), name=f"backchannel {hooks.qualname}()")

    return call
