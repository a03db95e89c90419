"""Overload from a peer that misbehaves: calls never answered, streams never read.

Nothing is lost silently and no memory grows without bound; other streams go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RawStream, run
from helpers import CheckedThread
from services import Echo, EchoImpl

import backchannel
from backchannel import Argument, Limits, Method
from backchannel.v1 import envelope_pb2 as pb

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

# ------------------------------------------------------------------ expiry cascade

#: callbacks the provider pushes at once to a consumer that never answers
FLOOD = 5000
#: the slow consumer's in-flight limit, as it states in its hello
SLOTS = 10


@backchannel.interface("test.Flood")
class Flood:
    """A listener, and a burst of callback calls to it."""

    def subscribe(self, listener: Any) -> None: ...
    def flood(self, count: int) -> list[float]: ...


class FloodImpl:
    def __init__(self) -> None:
        self.listener: Any = None

    def subscribe(self, listener: Any) -> None:
        self.listener = listener

    async def flood(self, count: int) -> list[float]:
        """Push ``count`` callback calls in one loop turn; [seconds the burst took to
        make, how many failed with DeadlineExceeded]."""
        started = time.monotonic()
        calls = [self.listener.changed(i) for i in range(count)]
        made = time.monotonic() - started
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        expired = sum(isinstance(outcome, backchannel.DeadlineExceeded) for outcome in outcomes)
        return [made, float(expired)]


FLOOD_METHODS = [Method("subscribe", arguments=[Argument(index=0, callback=True)])]


def test_callbacks_that_expire_waiting_for_a_slot_are_never_sent() -> None:
    """A consumer states 10 in-flight slots and never answers: 5,000 callbacks pushed at
    once expire, and only a few are ever sent (each sent one holds its slot until it
    expires; one that waited until little of its time was left is not sent), while
    another consumer's 1 s calls all succeed."""
    with backchannel.Server(callback_timeout=1.0) as server:
        server.export(Flood, FloodImpl(), methods=FLOOD_METHODS)
        server.export(Echo, EchoImpl())

        async def body() -> None:
            stream = RawStream(server.address)
            hello = pb.Hello(protocol_version=1, application="silent", max_calls_in_flight=SLOTS)
            await stream.send(pb.Frame(hello=hello))
            assert (await stream.recv()).WhichOneof("kind") == "welcome"
            listener = pb.Value(callback_value=pb.CallbackRef(id=1))
            await stream.send(
                pb.Frame(
                    call=pb.Call(id=1, service="test.Flood", method="subscribe", args=[listener])
                )
            )
            assert (await stream.recv()).result.id == 1
            count = pb.Value(int_value=FLOOD)
            await stream.send(
                pb.Frame(call=pb.Call(id=2, service="test.Flood", method="flood", args=[count]))
            )
            done = asyncio.Event()

            async def well_behaved() -> int:
                answered = 0
                async with backchannel.AsyncClient(server.address, timeout=1.0) as client:
                    echo = client.reference(Echo)
                    while not done.is_set():
                        assert await echo.add(answered, 1) == answered + 1  # within 1 s
                        answered += 1
                return answered

            other = asyncio.create_task(well_behaved())
            calls = cancels = 0
            while True:  # what the provider sends the silent consumer, until flood returns
                frame = await stream.recv(timeout=10)
                kind = frame.WhichOneof("kind")
                if kind == "call":
                    calls += 1
                elif kind == "cancel":
                    cancels += 1
                elif kind == "result" and frame.result.id == 2:
                    break
            done.set()
            assert await other > 0
            made, expired = frame.result.value.list_value.items
            assert expired.double_value == FLOOD  # every call failed, none was lost
            # each slot takes a call at most once per tenth of the timeout (1 s), and only
            # while calls made in the burst still have more than that left
            bound = SLOTS * (1 + int(made.double_value / 0.1) + 1)
            assert calls <= bound, f"{calls} of {FLOOD} expired callbacks were sent"
            assert cancels == calls  # a Cancel for each call sent, none for the others
            await stream.close()

        run(body())


def test_calls_that_expire_waiting_for_a_slot_do_not_pile_up() -> None:
    """The provider runs one call at a time and one never ends: rounds of calls expire
    while they wait for its slot, and the queue of waiting calls does not keep them."""
    with backchannel.Server(limits=Limits(max_calls_in_flight=1)) as server:
        server.export(Echo, EchoImpl())

        async def body() -> None:
            async with backchannel.AsyncClient(server.address) as client:
                quick = client.reference(Echo, timeout=0.05)
                assert await quick.add(1, 1) == 2
                session = client._session
                assert session is not None
                # runs first (tasks start in order): the one slot is taken before the rest
                hold = asyncio.create_task(client.reference(Echo, timeout=30).wait(20))
                for _round in range(5):
                    outcomes = await asyncio.gather(
                        *(quick.add(i, 1) for i in range(2000)), return_exceptions=True
                    )
                    assert all(isinstance(o, backchannel.DeadlineExceeded) for o in outcomes)
                assert not hold.done()  # the slot was held throughout
                # main kept all 10,000 expired calls queued
                queued = len(session._waiting)
                assert queued <= 4096, f"{queued} calls queued"
                hold.cancel()

        run(body())


# ------------------------------------------------------- a consumer that never reads

SILENT_CONSUMER = Path(__file__).with_name("silent_consumer.py")
#: calls the silent consumer sends, and the size of each one's result
CALLS, RESULT_SIZE = 2000, 100_000
MiB = 1024 * 1024


def rss() -> int:
    """This process's resident memory, in bytes (the provider runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def start_silent(address: str, method: str, count: int) -> subprocess.Popen[str]:
    """A silent consumer calling ``method`` ``count`` times, each for a 100 kB result."""
    arguments = [address, method.rsplit(".", 1)[0], method.rsplit(".", 1)[1], count, RESULT_SIZE]
    return subprocess.Popen(
        [sys.executable, str(SILENT_CONSUMER), *map(str, arguments)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=SILENT_CONSUMER.parent,
    )


def read_to_the_end(silent: subprocess.Popen[str]) -> str:
    """Let a silent consumer read its stream to the end; the status line it prints."""
    assert silent.stdin is not None
    silent.stdin.write("read\n")
    silent.stdin.flush()
    out, _ = silent.communicate(timeout=30)
    return out.splitlines()[-1]


class LogEvent(logging.Handler):
    """Set once a backchannel log line containing ``text`` is emitted (by any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.lines.append(message)
            self.seen.set()


@contextlib.contextmanager
def watching(text: str) -> Iterator[LogEvent]:
    handler = LogEvent(text)
    logger = logging.getLogger("backchannel")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_consumer_that_never_reads_is_held_back_and_memory_stays_bounded() -> None:
    """A consumer sends 2,000 calls with 100 kB results (200 MB) and reads nothing: the
    provider stops reading from it once 32 MiB (the default max_queued_bytes) wait to be
    written, its RSS grows by less than 100 MiB (main: every result queued, 200 MB and
    more), another consumer's calls go on meanwhile, and once the silent one reads, it
    gets every result: nothing was lost."""
    with backchannel.Server() as server, watching("reads slower than it asks") as held:
        server.export(Echo, EchoImpl())
        with backchannel.Client(server.address, timeout=5) as other:
            echo = other.reference(Echo)
            assert echo.add(1, 1) == 2
            before = rss()
            silent = start_silent(server.address, "test.Echo.big", CALLS)
            lines: list[str] = []
            sent = threading.Event()

            def follow() -> None:  # the child's lines: "sent" once gRPC took its calls
                assert silent.stdout is not None
                for line in silent.stdout:
                    lines.append(line.strip())
                    sent.set()

            follower = CheckedThread(follow)
            follower.start()
            try:
                # held back (a log line), or (main) every call sent and every result queued
                held.seen.wait(20) or sent.wait(1)
                peak = 0
                for i in range(200):  # the other consumer goes on, and memory stays put
                    assert echo.add(i, 1) == i + 1
                    peak = max(peak, rss())
                assert peak - before < 100 * MiB, f"RSS grew by {(peak - before) // MiB} MiB"
                assert len(held.lines) == 1  # held back, and logged once
                assert silent.stdin is not None
                silent.stdin.write("read\n")
                silent.stdin.flush()
                silent.wait(30)
                follower.check(5)
            finally:
                silent.kill()
                silent.wait(5)
    assert lines == ["sent", f"results {CALLS}", "status OK"]  # once it reads: none lost


@backchannel.interface("test.Gated")
class Gated:
    """Results that are all ready at once, when the test opens the gate."""

    def blob(self, size: int) -> bytes: ...


class GatedImpl:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.gate: asyncio.Event | None = None
        self.waiting = 0
        self.changed = threading.Condition()

    async def blob(self, size: int) -> bytes:
        if self.gate is None:
            self.loop, self.gate = asyncio.get_running_loop(), asyncio.Event()
        with self.changed:
            self.waiting += 1
            self.changed.notify_all()
        await self.gate.wait()
        return b"x" * size

    def wait_for(self, count: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.waiting >= count, 10)

    def open(self) -> None:
        assert self.loop is not None and self.gate is not None
        self.loop.call_soon_threadsafe(self.gate.set)


def test_a_consumer_that_never_reads_while_results_pile_up_gets_resource_exhausted() -> None:
    """600 calls of a silent consumer are running when their 100 kB results (60 MB) all
    come at once: past twice max_queued_bytes (8 MiB here) the provider ends that stream
    with RESOURCE_EXHAUSTED naming the limit, logged once; another consumer goes on."""
    impl = GatedImpl()
    limits = Limits(max_queued_bytes=8 * MiB)
    with backchannel.Server(limits=limits) as server, watching("did not read") as ended:
        server.export(Gated, impl)
        server.export(Echo, EchoImpl())
        with backchannel.Client(server.address, timeout=5) as other:
            echo = other.reference(Echo)
            silent = start_silent(server.address, "test.Gated.blob", 600)
            try:
                assert impl.wait_for(600), "the provider did not start the 600 calls"
                before = rss()
                impl.open()
                assert ended.seen.wait(10), "the provider did not end the stream"
                assert [echo.add(i, 1) for i in range(100)] == [i + 1 for i in range(100)]
                assert rss() - before < 64 * MiB
                status = read_to_the_end(silent)
            finally:
                silent.kill()
                silent.wait(5)
    assert len(ended.lines) == 1
    assert status.startswith("status RESOURCE_EXHAUSTED"), status
    assert "over twice the limit of 8388608 bytes (max_queued_bytes)" in status


def test_a_consumer_that_stays_unread_past_max_write_stall_is_ended() -> None:
    """Held back and then never read again: after max_write_stall seconds over the limit
    (0.5 s here) the provider ends the stream with RESOURCE_EXHAUSTED naming the stall, so
    a peer that stopped reading for good (or two peers each waiting for the other to read)
    is not kept for ever; another consumer goes on."""
    limits = Limits(max_queued_bytes=4 * MiB, max_write_stall=0.5)
    with (
        backchannel.Server(limits=limits) as server,
        watching("reads slower than it asks") as held,
        watching("max_write_stall") as ended,
    ):
        server.export(Echo, EchoImpl())
        with backchannel.Client(server.address, timeout=5) as other:
            echo = other.reference(Echo)
            silent = start_silent(server.address, "test.Echo.big", CALLS)
            try:
                assert held.seen.wait(20), "the provider never held the silent stream back"
                assert ended.seen.wait(5), "the held stream was not ended after the stall"
                assert [echo.add(i, 1) for i in range(50)] == [i + 1 for i in range(50)]
                status = read_to_the_end(silent)
            finally:
                silent.kill()
                silent.wait(5)
    assert len(ended.lines) == 1
    assert status.startswith("status RESOURCE_EXHAUSTED"), status
    assert "for 0.5 s (max_write_stall)" in status
