"""A sync Client's close is bounded: it never waits for ever on a stuck loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from services import Echo, EchoImpl

import backchannel
from backchannel.transport import portal

pytestmark = pytest.mark.usefixtures("transport")


@pytest.fixture(scope="module")
def address(transport: str) -> Iterator[str]:
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Echo, EchoImpl())
        yield server.address


def test_close_returns_when_the_loop_is_stuck(
    address: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop held by a callback that never returns (as one deadlocked on a lock is: a
    second Ctrl-C can leave a Future's lock taken, and the loop then blocks setting
    that Future's result) made close() wait for ever; it now gives up after
    CLOSE_WAIT for the streams' closing and as long for the loop, and says so."""
    monkeypatch.setattr(portal, "CLOSE_WAIT", 0.3)
    # no call, so no stream: one left open when the loop is let go would outlive the test
    # (and count in the process's stream gauges, which test_telemetry reads)
    client = backchannel.Client(address)
    release = threading.Event()
    client._portal.loop.call_soon_threadsafe(release.wait, 30)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="backchannel.transport.portal"):
            client.close()
        took = time.monotonic() - started
    finally:
        release.set()
        client._portal._thread.join(5)
    assert took < 3, f"close() took {took:.1f}s"
    assert "closing took over 0.3s; left running" in caplog.text


def test_close_is_prompt_when_nothing_is_stuck(address: str) -> None:
    client = backchannel.Client(address)
    assert client.reference(Echo).echo("up") == "up"
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 2
