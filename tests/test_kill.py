"""A provider process killed (SIGKILL) with many calls in flight: every call fails at once.

The provider runs in a process of its own (``provider_process.py``, which prints its
address); the consumers are in this process. ``test_reconnect.py`` covers one call in
flight and reconnecting afterwards; these cover many calls at once, calls still waiting
for a slot behind the in-flight limit, and both client flavours.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run
from helpers import Provider, read_line, wait_until
from notifier import AsyncRecorder, Notifier
from services import Echo, EchoImpl

import backchannel
from backchannel.settings import Limits

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

#: how long after the kill every pending call must have failed (loopback: a reset is seen
#: in milliseconds; the bound leaves room for a loaded CI machine)
PROMPTLY = 2.0


class ProviderProcess:
    """``restartable_provider.py`` (Echo, and a Notifier that pushes to its listeners)
    in a subprocess: its address, and a way to kill it."""

    def __init__(self) -> None:
        self._provider = Provider()
        self._provider.start()
        self.address = self._provider.address

    def kill(self) -> float:
        """SIGKILL, reaped; returns when it happened (time.monotonic())."""
        self._provider.kill()
        return time.monotonic()


@pytest.fixture
def provider() -> Iterator[ProviderProcess]:
    provider = ProviderProcess()
    yield provider
    provider.kill()


def test_async_consumer_many_calls_in_flight_and_queued_all_fail_promptly(
    provider: ProviderProcess,
) -> None:
    in_flight, queued = 8, 24

    async def body() -> None:
        limits = Limits(max_calls_in_flight=in_flight)  # the rest wait for a slot
        client = backchannel.AsyncClient(provider.address, timeout=30, limits=limits)
        echo = client.reference(Echo)
        assert await echo.add(1, 2) == 3  # the stream is open
        listener = AsyncRecorder()
        await client.reference(Notifier).addListener("k", listener)
        assert client.callback_count == 1
        calls = [asyncio.ensure_future(echo.wait(30)) for _ in range(in_flight + queued)]
        session = client._session
        assert session is not None
        await asyncio.to_thread(  # all sent that may be (no event says so)
            wait_until,
            lambda: session.connection.pending_outgoing >= in_flight,
            5,
            "the calls sent",
        )
        assert not any(call.done() for call in calls)
        killed = await asyncio.to_thread(provider.kill)
        _done, pending = await asyncio.wait(calls, timeout=PROMPTLY)
        assert not pending, f"{len(pending)} calls still hang {PROMPTLY} s after the kill"
        assert time.monotonic() - killed < PROMPTLY
        for call in calls:
            assert isinstance(call.exception(), backchannel.StreamBroken), call.exception()
        assert client.callback_count == 0  # the listener's callback ended with the stream
        started = time.monotonic()
        await asyncio.wait_for(client.close(), PROMPTLY)  # closing does not hang either
        assert time.monotonic() - started < PROMPTLY

    run(body())


def test_sync_consumer_calls_from_many_threads_all_fail_promptly(
    provider: ProviderProcess,
) -> None:
    with backchannel.Client(provider.address, timeout=30) as client:
        echo = client.reference(Echo)
        assert echo.add(1, 2) == 3
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(echo.wait, 30) for _ in range(8)]
            # the sync client hands each call to its loop in order: once a later call is
            # answered, the provider has received all eight and is running them
            wait_until(
                lambda: (
                    client._core._session is not None
                    and client._core._session.connection.pending_outgoing >= 8
                ),
                5,
                "the 8 calls sent",
            )
            assert echo.add(2, 2) == 4
            killed = provider.kill()
            _done, pending = concurrent.futures.wait(calls, timeout=PROMPTLY)
            assert not pending, f"{len(pending)} calls still hang {PROMPTLY} s after the kill"
            assert time.monotonic() - killed < PROMPTLY
            for call in calls:
                with pytest.raises(backchannel.StreamBroken):
                    call.result(0)
        started = time.monotonic()
    assert time.monotonic() - started < PROMPTLY  # close() did not hang


CONSUMER = """
import sys
import backchannel
from services import Echo

client = backchannel.Client(sys.argv[1], timeout=60)
echo = client.reference(Echo)
assert echo.add(1, 2) == 3
print("calling", flush=True)
echo.wait(30)
"""


def test_a_killed_consumers_running_calls_are_cancelled_on_the_provider() -> None:
    impl = EchoImpl()
    with backchannel.Server() as server:
        server.export(Echo, impl)
        consumer = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, server.address],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent,
        )
        try:
            assert read_line(consumer, 15, "the consumer") == "calling"
            assert impl.started.wait(5)  # its async def wait(30) is running on the provider
            consumer.kill()
            consumer.wait(5)
            killed = time.monotonic()
            assert impl.cancelled.wait(PROMPTLY), "the dead consumer's call still runs"
            assert time.monotonic() - killed < PROMPTLY
        finally:
            consumer.kill()
            consumer.wait(5)
        wait_until(lambda: not server._core.session_count, PROMPTLY, "the dead stream closed")
