"""Many calls multiplexed on one stream: every result belongs to its own call."""

from __future__ import annotations

import asyncio
import threading

from conftest import run
from services import Echo

import backchannel


def test_eight_threads_times_a_thousand_calls_on_one_sync_client(
    server: backchannel.Server,
) -> None:
    failures: list[str] = []
    with backchannel.Client(server.address, timeout=10) as client:
        echo = client.reference(Echo)

        def worker(thread: int) -> None:
            for i in range(1000):
                got = echo.add(thread * 1_000_000, i)
                if got != thread * 1_000_000 + i:
                    failures.append(f"thread {thread} call {i} got {got}")
                    return

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
    assert failures == []
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
