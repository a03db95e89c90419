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
from services import Echo

import backchannel
from backchannel.settings import Limits

SCRIPT = Path(__file__).with_name("provider_process.py")
#: how long after the kill every pending call must have failed (loopback: a reset is seen
#: in milliseconds; the bound leaves room for a loaded CI machine)
PROMPTLY = 2.0


class ProviderProcess:
    """``provider_process.py`` in a subprocess: its address, and a way to kill it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, text=True, cwd=SCRIPT.parent
        )
        assert self.process.stdout is not None
        self.address = self.process.stdout.readline().strip()
        assert self.address.startswith("127.0.0.1:"), self.address

    def kill(self) -> float:
        """SIGKILL, reaped; returns when it happened (time.monotonic())."""
        self.process.kill()
        self.process.wait(5)
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
        calls = [asyncio.ensure_future(echo.wait(30)) for _ in range(in_flight + queued)]
        session = client._session
        assert session is not None
        deadline = time.monotonic() + 5
        while session.connection.pending_outgoing < in_flight:  # all sent that may be
            assert time.monotonic() < deadline, "the calls were never sent"
            await asyncio.sleep(0.01)
        assert not any(call.done() for call in calls)
        killed = await asyncio.to_thread(provider.kill)
        _done, pending = await asyncio.wait(calls, timeout=PROMPTLY)
        assert not pending, f"{len(pending)} calls still hang {PROMPTLY} s after the kill"
        assert time.monotonic() - killed < PROMPTLY
        for call in calls:
            assert isinstance(call.exception(), backchannel.StreamBroken), call.exception()
        assert client.callback_count == 0
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
            deadline = time.monotonic() + 5
            while client._core._session is None or (
                client._core._session.connection.pending_outgoing < 8
            ):
                assert time.monotonic() < deadline, "the calls were never sent"
                time.sleep(0.01)
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
