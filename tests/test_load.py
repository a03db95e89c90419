"""Many calls multiplexed on one stream: every result belongs to its own call."""

from __future__ import annotations

import asyncio

import pytest
from conftest import run
from helpers import checked_threads
from services import Echo

import backchannel

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


def test_eight_threads_times_a_thousand_calls_on_one_sync_client(
    server: backchannel.Server,
) -> None:
    with backchannel.Client(server.address, timeout=10) as client:
        echo = client.reference(Echo)

        def worker(thread: int) -> None:  # a failed call or wrong result fails the test
            for i in range(1000):
                got = echo.add(thread * 1_000_000, i)
                assert got == thread * 1_000_000 + i, f"thread {thread} call {i} got {got}"

        with checked_threads(30) as start:
            for t in range(8):
                start(worker, t)
    assert server._core.session_count <= 1


def test_a_thousand_concurrent_tasks_on_one_async_client(server: backchannel.Server) -> None:
    async def body() -> None:
        async with backchannel.AsyncClient(server.address, timeout=10) as client:
            echo = client.reference(Echo)

            async def one(i: int) -> None:
                payload = {"task": i, "data": [i, str(i), bytes([i % 256])]}
                assert await echo.echo(payload) == payload
                assert await echo.add(i, i) == 2 * i

            await asyncio.gather(*(one(i) for i in range(1000)))
            assert server._core.session_count == 1

    run(body())
