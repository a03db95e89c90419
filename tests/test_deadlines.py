"""Deadlines: one timer per timeout value expires due calls, in order, and only those."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any, cast

from backchannel.transport.deadlines import Deadlines


def run(coroutine: object) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 5))  # type: ignore[arg-type]


class Timer:
    def __init__(self, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args, self.cancelled = when, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The clock and timers Deadlines uses, driven by the test: ``run_timer(at)`` runs the
    earliest pending timer with the clock reading ``at``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> Timer:
        self.timers.append(Timer(when, callback, args))
        return self.timers[-1]

    def run_timer(self, at: float) -> None:
        self.timers.sort(key=lambda timer: timer.when)
        timer = self.timers.pop(0)
        assert not timer.cancelled
        self.now = at
        timer.callback(*timer.args)


def fake_deadlines(expire: Callable[[Any], None]) -> tuple[FakeLoop, Deadlines]:
    loop = FakeLoop()
    return loop, Deadlines(cast(asyncio.AbstractEventLoop, loop), expire)


def test_a_timer_expires_what_is_due_within_a_millisecond_and_rearms_for_the_rest() -> None:
    # the loop may run a timer early (its clock is coarse): a deadline at most 1 ms
    # after the timer's run counts as due; a later one gets the timer at its deadline
    expired: list[str] = []
    loop, deadlines = fake_deadlines(expired.append)
    deadlines.add("a", 1.0)
    loop.now = 0.001
    deadlines.add("b", 1.0)  # due at 1.0 + 1 ms: exactly the slack
    loop.now = 0.002
    deadlines.add("c", 1.0)  # 2 ms after a's
    assert [timer.when for timer in loop.timers] == [1.0]  # one timer for the timeout
    loop.run_timer(at=1.0)
    assert expired == ["a", "b"]
    assert [timer.when for timer in loop.timers] == [1.002]
    loop.run_timer(at=1.002)
    assert expired == ["a", "b", "c"] and loop.timers == []


def test_a_deadline_added_after_close_never_expires() -> None:
    expired: list[str] = []
    loop, deadlines = fake_deadlines(expired.append)
    deadlines.close()
    deadlines.add("late", 1.0)
    loop.run_timer(at=1.0)
    assert expired == []


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


class CountedDeque(collections.deque[Any]):
    """A deque that counts its clear() calls: one per compaction of a deadline queue."""

    cleared = 0

    def clear(self) -> None:
        self.cleared += 1
        super().clear()


def test_a_queue_holds_at_most_twice_its_live_calls_and_adds_stay_cheap() -> None:
    # compacted when it exceeds twice the live entries it kept the last time (at least
    # 4096), so memory follows the live calls and an add costs O(1) amortized
    async def body() -> None:
        deadlines = Deadlines(asyncio.get_running_loop(), lambda _: None)
        for n in range(10_000):
            deadlines.add(n, 60)  # long calls, all unfinished
        queue = deadlines._queues[60] = CountedDeque(deadlines._queues[60])
        longest = 0
        for n in range(30_000):
            deadlines.add(n, 60).cancel()
            longest = max(longest, len(queue))
        assert longest <= 2 * 10_001 + 1  # live: the 10,000 and the one just added
        # each compaction (a pass over the whole queue) follows at least 10,000 adds, so an
        # add costs O(1); compacting at every add once past 4096 would be 30,000 passes
        assert queue.cleared <= 3
        deadlines.close()

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
