"""Faults with real processes: a provider killed and restarted on the same address."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from notifier import Notifier, SyncRecorder
from services import Echo

import backchannel
from backchannel import Method

SCRIPT = Path(__file__).with_name("restartable_provider.py")


class Provider:
    """A provider process that can be killed and started again on the same port."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{probe.getsockname()[1]}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), self.address],
            stdout=subprocess.PIPE,
            text=True,
            cwd=SCRIPT.parent,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)


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
            assert echo.add(2, 2) == 4  # the slow call is surely running now
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
            assert plain.add(0, 0) == 0  # both are running on the provider now
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
            assert echo.add(2, 2) == 4
            provider.process.send_signal(signal.SIGSTOP)  # alive, connected, silent
            try:
                started = time.monotonic()
                with pytest.raises(backchannel.StreamBroken):
                    in_flight.result(10)
                assert time.monotonic() - started < 5  # not the call's 60 s timeout
            finally:
                provider.process.send_signal(signal.SIGCONT)


def test_keepalive_notices_a_frozen_consumer() -> None:
    from notifier import NOTIFIER_METHODS, NotifierImpl

    impl = NotifierImpl()
    keepalive = backchannel.Keepalive(time=0.5, timeout=0.5)
    with backchannel.Server(keepalive=keepalive) as server:
        server.export(Notifier, impl, methods=NOTIFIER_METHODS)
        script = Path(__file__).with_name("consumer_process.py")
        consumer = subprocess.Popen(
            [sys.executable, str(script), server.address, "1"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=script.parent,
        )
        try:
            assert consumer.stdout is not None and consumer.stdout.readline().strip() == "ready"
            (proxy,) = impl.listeners.values()
            consumer.send_signal(signal.SIGSTOP)
            assert proxy.wait_ended(5)  # the frozen consumer's callbacks end
            with pytest.raises(backchannel.CallbackGone):
                proxy.changed("anyone?")
        finally:
            consumer.kill()
            consumer.wait(5)
