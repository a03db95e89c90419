"""Per-call timeouts: TimeoutError on the consumer, Cancel observed on the provider."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import run
from services import Echo, EchoImpl

import backchannel

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


def test_default_timeout_is_one_second_like_dubbo() -> None:
    assert backchannel.DEFAULT_TIMEOUT == 1.0


def test_timeout_raises_timeout_error_and_cancels_the_provider_task(
    server: backchannel.Server, echo_impl: EchoImpl
) -> None:
    with backchannel.Client(server.address, timeout=0.2) as client:
        echo = client.reference(Echo)
        started = time.monotonic()
        with pytest.raises(backchannel.DeadlineExceeded) as info:
            echo.wait(30)
        assert time.monotonic() - started < 2
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, backchannel.BackchannelError)
        assert "test.Echo.wait" in str(info.value) and "0.2" in str(info.value)
        assert echo_impl.cancelled.wait(2), "the provider task was not cancelled"
        assert echo.add(1, 2) == 3  # the stream goes on


def test_per_reference_and_per_method_timeouts(server: backchannel.Server) -> None:
    # the client's default (30 s) outlasts the call (5 s): only the reference's or the
    # method's own 0.1 s ends it, within a bound far under both
    with backchannel.Client(server.address, timeout=30) as client:
        per_ref = client.reference(Echo, timeout=0.1)
        started = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            per_ref.wait(5)
        assert time.monotonic() - started < 2
        assert "0.1" in str(info.value)
        per_method = client.reference(Echo, methods=[backchannel.Method("wait", timeout=0.1)])
        started = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            per_method.wait(5)
        assert time.monotonic() - started < 2
        assert "0.1" in str(info.value)
        assert per_method.echo("fast") == "fast"


def test_bad_timeouts_are_rejected_when_the_reference_is_made(client: backchannel.Client) -> None:
    with pytest.raises(ValueError, match="timeout"):
        client.reference(Echo, timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        client.reference(Echo, methods=[backchannel.Method("wait", timeout=0)])


def test_async_timeout_and_cancellation(server: backchannel.Server, echo_impl: EchoImpl) -> None:
    async def body() -> None:
        async with backchannel.AsyncClient(server.address, timeout=0.2) as client:
            echo = client.reference(Echo)
            with pytest.raises(TimeoutError):
                await echo.wait(30)
            assert await asyncio.to_thread(echo_impl.cancelled.wait, 2)
            assert await echo.add(2, 2) == 4

    run(body())


def test_other_calls_finish_while_one_times_out(server: backchannel.Server) -> None:
    async def body() -> None:
        async with backchannel.AsyncClient(server.address, timeout=0.3) as client:
            echo = client.reference(Echo)
            slow = asyncio.ensure_future(echo.wait(30))
            fast = await asyncio.gather(*(echo.add(i, i) for i in range(100)))
            assert fast == [2 * i for i in range(100)]
            with pytest.raises(TimeoutError):
                await slow

    run(body())
