"""Dubbo's ``broadcast`` cluster mode: one call sent to every provider, the first
failure its error, else the last provider's result."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Iterable
from typing import Any

from backchannel.cluster.attempt import CurrentCall, NotSent, invoke_on, left
from backchannel.cluster.consumer import Consumer
from backchannel.cluster.directory import Directory, label
from backchannel.cluster.failover import is_open
from backchannel.cluster.loadbalance import NoProvider
from backchannel.cluster.providers import ProviderLink
from backchannel.cluster.reference import Reference
from backchannel.errors import ChannelClosed, DeadlineExceeded
from backchannel.rpc.interface import MethodSpec
from backchannel.transport.session import Session


async def broadcast(
    consumer: Consumer,
    ref: Reference,
    method: MethodSpec,
    positional: tuple[Any, ...],
    current: CurrentCall,
    directory: Directory,
    deadline: float | None,
) -> Any:
    """Dubbo's ``broadcast``: the call goes to every provider; it raises the first
    failure if any failed, else returns the last provider's result."""
    outcomes = await _outcomes(consumer, ref, method, positional, current, directory, deadline)
    failure = _first_failure(outcomes)
    if failure is None:
        return outcomes[-1]
    # the error's traceback holds this frame: it must not hold every provider's
    # error and attempt (a reference cycle, kept as long as the caller keeps the one)
    outcomes.clear()
    try:  # shared by the calls that waited on one attempt: no traceback to grow
        raise failure.with_traceback(None)
    finally:
        del failure


async def _outcomes(
    consumer: Consumer,
    ref: Reference,
    method: MethodSpec,
    positional: tuple[Any, ...],
    current: CurrentCall,
    directory: Directory,
    deadline: float | None,
) -> list[Any]:
    """Each provider's outcome of a broadcast call: its result, or its error.

    The call goes at once to every provider whose stream is open; for the others it
    waits once on their shared attempts to open one (not a task each: there may be
    thousands, most of them unreachable), and goes to those that opened while time
    is left."""
    if not directory.urls:
        raise NoProvider(f"no provider of {label(ref.key)} in {consumer.where}")
    links = [consumer.link(url.address) for url in directory.urls]
    outcomes: list[Any] = [None] * len(links)
    calls: dict[int, asyncio.Future[Any]] = {}
    try:
        attempts: dict[int, asyncio.Future[Session]] = {}
        for index, link in enumerate(links):
            if is_open(link):
                calls[index] = _call(consumer, link, ref, method, positional, current, deadline)
                continue
            wait = link.backoff_left
            if wait:  # it would fail at once
                outcomes[index] = link.backing_off(wait)
            elif consumer.closed:
                raise ChannelClosed(f"the client for {consumer.where} is closed")
            else:
                attempts[index] = link.attempt()
        if attempts:
            await _all_done(attempts.values(), left(deadline))
        late: DeadlineExceeded | None = None
        for index, attempt in attempts.items():
            if attempt.done() and attempt.cancelled():
                outcomes[index] = ChannelClosed(f"the client for {consumer.where} is closed")
            elif attempt.done() and attempt.exception() is not None:
                outcomes[index] = attempt.exception()
            elif attempt.done() and (deadline is None or deadline > time.monotonic()):
                calls[index] = _call(  # it opened the stream in time
                    consumer, links[index], ref, method, positional, current, deadline
                )
            else:  # no stream yet, or no time left: a call sent now would only expire
                late = late or DeadlineExceeded(
                    f"{method.qualname}() did not finish within its "
                    f"{ref.timeouts[method.name]} s timeout: no stream to some of the "
                    f"{len(links)} providers of {label(ref.key)} yet (broadcast)"
                )
                outcomes[index] = late
        if calls:
            finished = await asyncio.gather(*calls.values(), return_exceptions=True)
            for index, outcome in zip(calls, finished, strict=True):
                outcomes[index] = outcome
    except BaseException:  # cancelled, or the client closed: so do the calls sent
        for call in calls.values():
            if not call.cancel() and not call.cancelled():
                call.exception()  # over already: retrieved, not logged as lost
        raise
    return outcomes


def _call(
    consumer: Consumer,
    link: ProviderLink,
    ref: Reference,
    method: MethodSpec,
    positional: tuple[Any, ...],
    current: CurrentCall,
    deadline: float | None,
) -> asyncio.Future[Any]:
    """One provider's call of a broadcast, with the time left, as a task."""
    return asyncio.ensure_future(
        invoke_on(consumer, link, ref, method, positional, current, deadline, left(deadline))
    )


def _first_failure(outcomes: list[Any]) -> BaseException | None:
    """The first error among a broadcast's outcomes (what a call not sent failed with)."""
    for outcome in outcomes:
        if isinstance(outcome, NotSent):
            return outcome.error
        if isinstance(outcome, BaseException):
            return outcome
    return None


async def _all_done(futures: Iterable[asyncio.Future[Any]], timeout: float | None) -> None:
    """Wait until every one of ``futures`` is done, or ``timeout`` passes: what
    ``asyncio.wait`` does, without copying the caller's context for each future (a
    broadcast waits on a thousand attempts, each call of it: those copies, held while it
    waits, were thousands of objects for the garbage collector to walk)."""
    pending = [future for future in futures if not future.done()]
    if not pending:
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    left = len(pending)

    def one_done(_future: asyncio.Future[Any]) -> None:
        nonlocal left
        left -= 1
        if not left and not waiter.done():
            waiter.set_result(None)

    context = contextvars.Context()  # runs no caller code: an empty context will do
    for future in pending:
        future.add_done_callback(one_done, context=context)
    timer = None if timeout is None else loop.call_later(timeout, _release, waiter)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for future in pending:
            future.remove_done_callback(one_done)


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
