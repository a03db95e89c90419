"""Faults with real processes: a provider killed and restarted on the same address."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import run
from helpers import Provider, consumer_process, wait_until
from notifier import NOTIFIER_METHODS, Notifier, NotifierImpl, SyncRecorder
from services import Echo, EchoImpl

import backchannel
from backchannel import Method

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


def sent(client: backchannel.Client, method: str) -> int:
    """How many calls of ``method`` the client has sent on its stream and awaits."""
    session = client._core._session
    if session is None:
        return 0
    return sum(1 for outgoing in list(session._sent.values()) if outgoing.call.method == method)


def wait_sent(client: backchannel.Client, method: str, count: int) -> None:
    """Wait until ``count`` calls of ``method`` are on the stream, then make a round trip
    behind them: its answer means the provider has read them (one stream, in order)."""
    wait_until(lambda: sent(client, method) == count, 5, f"{count} {method} calls sent")
    assert client.reference(Echo).add(0, 0) == 0


@pytest.fixture
def provider() -> Iterator[Provider]:
    provider = Provider()
    provider.start()
    yield provider
    provider.kill()


def test_in_flight_calls_fail_at_once_and_new_calls_reconnect(provider: Provider) -> None:
    with backchannel.Client(provider.address, timeout=10) as client:
        echo = client.reference(Echo)
        assert echo.add(1, 2) == 3
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(echo.wait, 30)
            wait_sent(client, "wait", 1)  # the slow call is running on the provider now
            assert echo.add(2, 2) == 4
            provider.kill()
            started = time.monotonic()
            with pytest.raises(backchannel.StreamBroken):
                in_flight.result(5)
            assert time.monotonic() - started < 2  # noticed at once, not at a timeout
        with pytest.raises(backchannel.TransportError):
            echo.add(3, 3)  # nobody listens: a clear connection error
        provider.start()
        assert echo.add(4, 4) == 8  # the same client reconnects for new calls


def test_only_methods_declared_idempotent_are_sent_again(provider: Provider) -> None:
    with backchannel.Client(provider.address, timeout=15) as client:
        plain = client.reference(Echo)
        retried = client.reference(Echo, methods=[Method("wait", retries=20)])
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            once = pool.submit(plain.wait, 0.5)
            again = pool.submit(retried.wait, 0.5)
            wait_sent(client, "wait", 2)  # both are running on the provider now
            provider.kill()
            provider.start()
            with pytest.raises(backchannel.StreamBroken):
                once.result(10)
            assert again.result(15) == "done"  # re-sent on a new stream


def test_resubscribe_keeps_a_listener_receiving_after_a_provider_restart(
    provider: Provider,
) -> None:
    with backchannel.Client(provider.address, timeout=10) as client:
        kept = client.reference(Notifier, methods=[Method("addListener", resubscribe=True)])
        plain = client.reference(Notifier)
        faithful, forgotten = SyncRecorder(), SyncRecorder()
        kept.addListener("faithful", faithful)
        plain.addListener("forgotten", forgotten)
        assert faithful.wait_for(3) and forgotten.wait_for(3)  # "init" and ticks
        provider.kill()
        before = len(faithful.received)
        provider.start()
        assert faithful.wait_for(before + 3, timeout=10)  # replayed: "init" again, ticks
        assert "init" in faithful.received[before:]
        assert client.callback_count == 1  # only the resubscribed listener is exported
        frozen = len(forgotten.received)
        assert faithful.wait_for(len(faithful.received) + 2)
        assert len(forgotten.received) == frozen  # Dubbo's behaviour, without resubscribe


def test_a_removed_listener_is_not_resubscribed(provider: Provider) -> None:
    with backchannel.Client(provider.address, timeout=10) as client:
        notifier = client.reference(Notifier, methods=[Method("addListener", resubscribe=True)])
        listener = SyncRecorder()
        notifier.addListener("k", listener)
        notifier.removeListener("k", listener)
        provider.kill()
        provider.start()
        assert client.reference(Echo).add(1, 1) == 2  # reconnected
        assert client.callback_count == 0


def test_keepalive_notices_a_frozen_provider(provider: Provider) -> None:
    keepalive = backchannel.Keepalive(time=0.5, timeout=0.5)
    with backchannel.Client(provider.address, timeout=60, keepalive=keepalive) as client:
        echo = client.reference(Echo)
        assert echo.add(1, 1) == 2
        assert provider.process is not None
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(echo.wait, 30)
            wait_sent(client, "wait", 1)  # the slow call is running on the provider now
            assert echo.add(2, 2) == 4
            provider.process.send_signal(signal.SIGSTOP)  # alive, connected, silent
            try:
                started = time.monotonic()
                with pytest.raises(backchannel.StreamBroken):
                    in_flight.result(10)
                # Keepalive(0.5, 0.5): a ping after 0.5 s of silence, no answer 0.5 s later
                assert time.monotonic() - started < 2  # not the call's 60 s timeout
            finally:
                provider.process.send_signal(signal.SIGCONT)


def test_keepalive_notices_a_frozen_consumer() -> None:
    impl = NotifierImpl()
    keepalive = backchannel.Keepalive(time=0.5, timeout=0.5)
    with backchannel.Server(keepalive=keepalive) as server:
        server.export(Notifier, impl, methods=NOTIFIER_METHODS)
        with consumer_process(server.address, 1) as consumer:
            (proxy,) = impl.listeners.values()
            consumer.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            assert proxy.wait_ended(5)  # the frozen consumer's callbacks end
            assert time.monotonic() - started < 2
            with pytest.raises(backchannel.CallbackGone):
                proxy.changed("anyone?")


class HeldRecorder(SyncRecorder):
    """A listener that, once ``hold`` is set, blocks in its next "init" until released."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.holding = threading.Event()
        self.release = threading.Event()

    def changed(self, msg: str) -> Any:
        reply = super().changed(msg)
        if msg == "init" and self.hold:
            self.holding.set()
            self.release.wait(10)
        return reply


def test_a_replay_that_fails_is_tried_again_until_it_succeeds(provider: Provider) -> None:
    with backchannel.Client(provider.address, timeout=10) as client:
        notifier = client.reference(Notifier, methods=[Method("addListener", resubscribe=True)])
        listener = HeldRecorder()
        notifier.addListener("k", listener)
        assert listener.wait_for(2)
        listener.hold = True
        provider.kill()
        provider.start()  # restart 1: the replay starts and is held in the listener's init
        assert listener.holding.wait(10), "no replay after the first restart"
        provider.kill()  # killed during the replay: it fails with StreamBroken
        listener.hold = False
        listener.release.set()
        before = len(listener.received)
        provider.start()  # restart 2: the failed replay is tried again
        assert listener.wait_for(before + 3, timeout=10), "the listener stopped receiving"
        assert "init" in listener.received[before:]
        assert client.callback_count == 1


def test_retries_stop_after_the_declared_number(
    provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    with backchannel.Client(provider.address, timeout=5) as client:
        echo = client.reference(Echo, methods=[Method("add", retries=2)])
        assert echo.add(1, 1) == 2
        provider.kill()
        caplog.set_level(logging.INFO, "backchannel")
        started = time.monotonic()
        with pytest.raises(backchannel.StreamBroken):
            echo.add(2, 2)
        assert time.monotonic() - started < 3  # three quick attempts, not the timeout
    retries = [r.getMessage() for r in caplog.records if "add() failed" in r.getMessage()]
    assert len(retries) == 2, retries  # the first attempt and two retries: three in all
    assert retries[-1].endswith("retry 2 of 2")


def test_a_short_client_keepalive_is_welcome_at_a_default_server() -> None:
    """A default server pings every 10 s; a client pinging every 0.5 s is not sent away
    (gRPC's GOAWAY too_many_pings, which used to end its stream after about 2 s)."""
    with backchannel.Server() as server:
        server.export(Echo, EchoImpl())

        async def body() -> None:
            keepalive = backchannel.Keepalive(time=0.5, timeout=0.5)
            async with backchannel.AsyncClient(server.address, keepalive=keepalive) as client:
                echo = client.reference(Echo)
                assert await echo.add(1, 1) == 2
                session = client._session
                assert session is not None
                with pytest.raises(TimeoutError):  # idle, pinging: the stream stays up
                    await asyncio.wait_for(session.closed.wait(), 3.5)
                assert await echo.add(2, 2) == 4
                assert client._session is session

        run(body())
    with pytest.raises(ValueError, match="MIN_KEEPALIVE_TIME"):
        backchannel.Keepalive(time=0.01)


def test_after_a_graceful_stop_callbacks_end_and_the_client_goes_on_with_a_new_provider() -> None:
    """Client takes one address: "elsewhere" is a new provider on that address (a load
    balancer or a restarted process); the same client carries on there."""
    first_impl = NotifierImpl(greet=False)
    server = backchannel.Server()
    server.export(Notifier, first_impl, methods=NOTIFIER_METHODS)
    server.start()
    address = server.address
    with backchannel.Client(address, timeout=10) as client:
        kept = client.reference(Notifier, methods=[Method("addListener", resubscribe=True)])
        listener = SyncRecorder()
        kept.addListener("k", listener)
        proxy = first_impl.listeners["k"]
        assert proxy.changed("before") == "ok before"
        server.stop(grace=2)
        assert proxy.wait_ended(2)
        with pytest.raises(backchannel.CallbackGone):
            proxy.changed("after the stop")  # at once, no hang
        second_impl = NotifierImpl(greet=False)
        with backchannel.Server(address) as second:
            second.export(Notifier, second_impl, methods=NOTIFIER_METHODS)
            wait_until(lambda: "k" in second_impl.listeners, 10, "resubscribed in the background")
            assert second_impl.listeners["k"].changed("elsewhere") == "ok elsewhere"
            assert listener.received == ["before", "elsewhere"]


class SlowFirstNotifier(NotifierImpl):
    """Its first addListener hangs until cancelled (the provider not ready yet)."""

    def __init__(self) -> None:
        super().__init__(greet=False)
        self.attempts = 0

    async def addListener(self, key: str, listener: Any) -> None:  # type: ignore[override]
        self.attempts += 1
        if self.attempts == 1:
            await asyncio.sleep(30)  # cancelled when the consumer gives up on it
        self.listeners[key] = listener


def test_a_replay_that_times_out_is_tried_again() -> None:
    first = backchannel.Server()
    first.export(Notifier, NotifierImpl(greet=False), methods=NOTIFIER_METHODS)
    first.start()
    address = first.address
    with backchannel.Client(address, timeout=0.5) as client:
        kept = client.reference(Notifier, methods=[Method("addListener", resubscribe=True)])
        listener = SyncRecorder()
        kept.addListener("k", listener)
        first.stop()
        slow = SlowFirstNotifier()
        with backchannel.Server(address) as second:
            second.export(Notifier, slow, methods=NOTIFIER_METHODS)
            # the first replay times out; then again
            wait_until(lambda: "k" in slow.listeners, 10, "resubscribed after a timed-out replay")
            assert slow.attempts == 2
            assert slow.listeners["k"].changed("again") == "ok again"
            assert listener.received == ["again"]


def test_backoff_doubles_from_50_ms_to_2_s_with_jitter_and_resets_after_a_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from backchannel.cluster import backoff as client_module

    now = 100.0
    jitter: list[tuple[float, float]] = []
    factor = 1.0

    def uniform(low: float, high: float) -> float:
        jitter.append((low, high))
        return factor

    monkeypatch.setattr(client_module.time, "monotonic", lambda: now)
    monkeypatch.setattr(client_module.random, "uniform", uniform)
    backoff = client_module.Backoff()
    assert backoff.wait() == 0  # the first attempt does not wait
    delays = []
    for _ in range(8):
        backoff.failed()
        delays.append(round(backoff.wait(), 6))
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert set(jitter) == {(0.5, 1.0)}  # a half to all of the delay
    factor = 0.5
    backoff.failed()
    assert backoff.wait() == pytest.approx(1.0)  # 2 s at half jitter
    now += 0.4
    assert backoff.wait() == pytest.approx(0.6)  # time spent counts
    backoff.succeeded()
    assert backoff.wait() == 0
    factor = 1.0
    backoff.failed()
    assert backoff.wait() == pytest.approx(0.05)  # from the first delay again
