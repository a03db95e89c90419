"""rpc/turns.py: the lock a listener's calls take turns on behaves as asyncio.Lock (FIFO,
a cancelled waiter passes its turn on) and takes a free lock without a coroutine."""

from __future__ import annotations

import asyncio

import pytest

from backchannel.rpc.turns import Turns


def test_take_locks_a_free_lock_and_refuses_a_held_one() -> None:
    turns = Turns()
    assert turns.take()
    assert turns.locked()
    assert not turns.take()
    turns.release()
    assert not turns.locked()
    with pytest.raises(RuntimeError, match="not locked"):
        turns.release()


def test_waiters_get_their_turns_in_arrival_order_and_take_does_not_jump_the_queue() -> None:
    async def body() -> None:
        turns = Turns()
        order: list[int] = []
        assert turns.take()

        async def wait(n: int) -> None:
            await turns.acquire()
            order.append(n)
            turns.release()

        waiting = [asyncio.ensure_future(wait(n)) for n in range(3)]
        await asyncio.sleep(0)  # each is queued now
        turns.release()
        assert not turns.take()  # the first waiter was woken: it goes first
        await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert order == [0, 1, 2]
        assert turns.take()

    asyncio.run(body())


def test_a_waiter_cancelled_after_it_was_woken_passes_the_turn_on() -> None:
    async def body() -> None:
        turns = Turns()
        assert turns.take()
        first = asyncio.ensure_future(turns.acquire())
        second = asyncio.ensure_future(turns.acquire())
        await asyncio.sleep(0)
        turns.release()  # wakes the first ...
        first.cancel()  # ... which is cancelled before it runs
        assert await asyncio.wait_for(second, 5)
        assert first.cancelled()
        assert turns.locked()
        turns.release()
        assert turns.take()

    asyncio.run(body())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def body() -> None:
        turns = Turns()
        assert turns.take()
        waiter = asyncio.ensure_future(turns.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        turns.release()
        assert turns.take()  # nobody left waiting

    asyncio.run(body())
