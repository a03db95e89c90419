"""Handing work between threads and a loop: nothing posted is lost, reordered or run twice."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest
from helpers import checked_threads

from backchannel.errors import ChannelClosed
from backchannel.transport.handoff import inbox, post_quietly, run_in_pool


def test_every_post_from_many_threads_runs_once_in_each_threads_order() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        seen: dict[int, list[int]] = {n: [] for n in range(8)}
        total = 8 * 2000
        done = asyncio.Event()
        count = 0

        def record(thread: int, n: int) -> None:
            nonlocal count
            seen[thread].append(n)
            count += 1
            if count == total:
                done.set()

        def poster(thread: int) -> None:
            box = inbox(loop)
            for n in range(2000):
                box.post(record, thread, n)

        with checked_threads(5) as start:  # a poster's error fails the test
            for n in range(8):
                start(poster, n)
            await asyncio.wait_for(done.wait(), 5)
        assert all(numbers == list(range(2000)) for numbers in seen.values())

    asyncio.run(body())


def test_run_in_pool_gives_the_result_or_the_exception() -> None:
    async def body() -> None:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert await run_in_pool(pool, lambda: threading.current_thread().name) != (
                threading.current_thread().name
            )
            with pytest.raises(KeyError, match="nope"):
                await run_in_pool(pool, lambda: {}["nope"])

            def stop() -> None:
                raise StopIteration

            with pytest.raises(RuntimeError, match="StopIteration"):
                await run_in_pool(pool, stop)

    asyncio.run(body())


def test_cancelling_before_the_work_starts_cancels_the_work() -> None:
    async def body() -> None:
        gate = threading.Event()
        ran: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            blocker = run_in_pool(pool, lambda: gate.wait(5))
            queued = run_in_pool(pool, lambda: ran.append("queued"))
            queued.cancel()
            callbacks_ran = asyncio.Event()  # call_soon is FIFO: the done callback ran first
            asyncio.get_running_loop().call_soon(callbacks_ran.set)
            await asyncio.wait_for(callbacks_ran.wait(), 2)
            gate.set()
            assert await blocker is True
        assert ran == []

    asyncio.run(body())


def test_posting_to_a_closed_loop_is_channel_closed() -> None:
    loop = asyncio.new_event_loop()
    box = inbox(loop)
    loop.close()
    with pytest.raises(ChannelClosed):
        box.post(print)


def test_posting_quietly_to_a_closed_loop_does_nothing() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    ran: list[str] = []
    post_quietly(loop, ran.append, "never")
    assert ran == []
