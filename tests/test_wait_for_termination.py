"""``wait_for_termination(timeout)`` on both servers, as grpc's: True when it timed out."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import run
from helpers import CheckedThread
from services import Echo, EchoImpl

import backchannel

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


def test_sync_wait_times_out_with_true_while_the_server_runs() -> None:
    with backchannel.Server("127.0.0.1:0") as server:
        began = time.monotonic()
        assert server.wait_for_termination(timeout=0.2) is True
        assert 0.15 < time.monotonic() - began < 2


def test_sync_wait_returns_false_when_another_thread_stops_the_server() -> None:
    server = backchannel.Server("127.0.0.1:0")
    server.export(Echo, EchoImpl())
    server.start()
    waiting = threading.Event()
    outcome: list[bool] = []

    def wait() -> None:
        waiting.set()
        outcome.append(server.wait_for_termination(timeout=10))

    waiter = CheckedThread(wait)
    waiter.start()
    assert waiting.wait(5)
    server.stop()
    waiter.check(5)
    assert outcome == [False]


def test_sync_wait_on_a_server_not_running_returns_false_at_once() -> None:
    server = backchannel.Server("127.0.0.1:0")
    assert server.wait_for_termination() is False  # never started: nothing to wait for
    server.start()
    server.stop()
    assert server.wait_for_termination() is False


def test_async_wait_times_out_with_true_and_returns_false_when_stopped() -> None:
    async def body() -> None:
        server = backchannel.AsyncServer("127.0.0.1:0")
        assert await server.wait_for_termination() is False  # not started
        async with server:
            assert await server.wait_for_termination(0.1) is True
            waiter = asyncio.ensure_future(server.wait_for_termination(10))
            await asyncio.sleep(0)  # one loop turn: the waiter starts waiting (not a delay)
            assert not waiter.done()
            await server.stop()
            assert await asyncio.wait_for(waiter, 5) is False

    run(body())
