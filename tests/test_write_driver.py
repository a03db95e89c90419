"""The session's task-free driver of gRPC writes (session._Driven), as a pure unit."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from backchannel.transport.writer import _Driven


async def _drive(coroutine: Any) -> tuple[_Driven | None, asyncio.Future[BaseException | None]]:
    """Run the coroutine's first step here, as the writer does, then hand it over."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[BaseException | None] = loop.create_future()
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        ended.set_result(None)
        return None, ended
    driven = _Driven(loop, contextvars.Context(), coroutine, waiting_on, ended.set_result)
    return driven, ended


def test_a_write_that_waits_on_futures_and_a_bare_yield_ends_once_with_none() -> None:
    asyncio.run(_a_write_that_waits_on_futures_and_a_bare_yield_ends_once_with_none())


async def _a_write_that_waits_on_futures_and_a_bare_yield_ends_once_with_none() -> None:
    first, second = asyncio.Future[None](), asyncio.Future[None]()
    steps: list[str] = []

    async def write() -> None:
        await first
        steps.append("first")
        await asyncio.sleep(0)  # a bare yield
        steps.append("yielded")
        await second
        steps.append("second")

    _, ended = await _drive(write())
    first.set_result(None)
    await asyncio.sleep(0)  # one loop turn, not a delay: the done-callback's step runs
    assert steps == ["first"] and not ended.done()
    second.set_result(None)
    assert await asyncio.wait_for(ended, 1) is None
    assert steps == ["first", "yielded", "second"]


def test_a_failing_write_hands_its_exception_over() -> None:
    asyncio.run(_a_failing_write_hands_its_exception_over())


async def _a_failing_write_hands_its_exception_over() -> None:
    gate = asyncio.Future[None]()

    async def write() -> None:
        await gate
        raise ConnectionResetError("peer gone")

    _, ended = await _drive(write())
    gate.set_result(None)
    error = await asyncio.wait_for(ended, 1)
    assert isinstance(error, ConnectionResetError) and str(error) == "peer gone"


def test_cancel_ends_the_write_with_cancelled_error_and_runs_its_cleanup() -> None:
    asyncio.run(_cancel_ends_the_write_with_cancelled_error_and_runs_its_cleanup())


async def _cancel_ends_the_write_with_cancelled_error_and_runs_its_cleanup() -> None:
    gate = asyncio.Future[None]()
    cleaned = []

    async def write() -> None:
        try:
            await gate
        finally:
            cleaned.append(True)

    driven, ended = await _drive(write())
    assert driven is not None
    driven.cancel()
    assert isinstance(await asyncio.wait_for(ended, 1), asyncio.CancelledError)
    assert cleaned == [True] and gate.cancelled()


def test_a_write_that_yields_something_not_a_future_fails_clearly() -> None:
    asyncio.run(_a_write_that_yields_something_not_a_future_fails_clearly())


async def _a_write_that_yields_something_not_a_future_fails_clearly() -> None:
    class Odd:
        def __await__(self) -> Any:
            yield "not a future"

    async def write() -> None:
        await Odd()

    driven, ended = await _drive(write())
    error = await asyncio.wait_for(ended, 1)
    assert isinstance(error, RuntimeError) and "not a future" in str(error)
    assert driven is not None
    driven.cancel()  # the session may still cancel it as its write: nothing to cancel


def test_a_write_that_waits_on_two_futures_in_turn_ends_after_both() -> None:
    asyncio.run(_a_write_that_waits_on_two_futures_in_turn_ends_after_both())


async def _a_write_that_waits_on_two_futures_in_turn_ends_after_both() -> None:
    first, second = asyncio.Future[None](), asyncio.Future[None]()
    steps: list[str] = []

    async def write() -> None:
        await first
        steps.append("first")
        await second  # not done yet: the write waits on it in turn
        steps.append("second")

    _, ended = await _drive(write())
    first.set_result(None)
    for _ in range(5):
        await asyncio.sleep(0)
    assert steps == ["first"] and not ended.done()
    second.set_result(None)
    assert await asyncio.wait_for(ended, 1) is None
    assert steps == ["first", "second"]
    # the futures it waited on are left as an await leaves them: futures, not "blocking"
    assert asyncio.isfuture(first) and asyncio.isfuture(second)
    assert asyncio.wrap_future(first) is first


def test_cancel_at_a_bare_yield_does_not_fail_and_the_write_goes_on() -> None:
    asyncio.run(_cancel_at_a_bare_yield_does_not_fail_and_the_write_goes_on())


async def _cancel_at_a_bare_yield_does_not_fail_and_the_write_goes_on() -> None:
    steps: list[str] = []

    async def write() -> None:
        await asyncio.sleep(0)
        steps.append("resumed")

    driven, ended = await _drive(write())
    assert driven is not None
    driven.cancel()  # it waits on no future: there is nothing to cancel
    assert await asyncio.wait_for(ended, 1) is None
    assert steps == ["resumed"]
