"""Deadlines: one timer per timeout value expires due calls, in order, and only those."""

from __future__ import annotations

import asyncio

from backchannel.deadlines import Deadlines


def run(coroutine: object) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 5))  # type: ignore[arg-type]


def test_due_targets_expire_in_order_and_cancelled_ones_never() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        expired: list[str] = []
        done = asyncio.Event()

        def expire(target: str) -> None:
            expired.append(target)
            if target == "last":
                done.set()

        deadlines = Deadlines(loop, expire)
        deadlines.add("a", 0.02)
        finished = deadlines.add("b", 0.02)
        deadlines.add("c", 0.02)
        deadlines.add("quick", 0.01)  # another timeout value: its own queue and timer
        deadlines.add("last", 0.05)
        finished.cancel()
        await asyncio.wait_for(done.wait(), 2)
        assert expired == ["quick", "a", "c", "last"]

    run(body())


def test_nothing_expires_early() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        expired: list[float] = []
        done = asyncio.Event()
        deadlines = Deadlines(loop, lambda _: (expired.append(loop.time()), done.set()))
        start = loop.time()
        deadlines.add("x", 0.05)
        await asyncio.wait_for(done.wait(), 2)
        assert expired[0] - start >= 0.05 - 0.002

    run(body())


def test_finished_entries_do_not_pile_up_behind_a_long_call() -> None:
    async def body() -> None:
        deadlines = Deadlines(asyncio.get_running_loop(), lambda _: None)
        deadlines.add("long", 60)  # stays at the head, unfinished
        for n in range(20_000):
            deadlines.add(n, 60).cancel()
        queue = deadlines._queues[60]
        assert len(queue) <= 4097
        assert queue[0].target == "long"
        deadlines.close()
        assert not deadlines._timers

    run(body())


def test_close_stops_every_timer() -> None:
    async def body() -> None:
        expired: list[str] = []
        deadlines = Deadlines(asyncio.get_running_loop(), expired.append)
        deadlines.add("a", 0.01)
        deadlines.close()
        later = Deadlines(asyncio.get_running_loop(), expired.append)
        done = asyncio.Event()
        later.add("b", 0.03)
        asyncio.get_running_loop().call_later(0.06, done.set)
        await asyncio.wait_for(done.wait(), 2)
        assert expired == ["b"]

    run(body())
