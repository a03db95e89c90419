"""Bulk data does not hold up other consumers: a big result is encoded, and big arguments
are decoded, off the provider's event loop, so other streams' small calls keep being
answered meanwhile.

The result is a dict whose encoding waits, halfway through, until another consumer's
small calls have been answered: on the provider's loop that can never happen (the loop
that would answer them is the one encoding), so the wait runs out; off the loop it is
over after a few calls. No timing is measured: the test is about what happens first.

A listener's big result is decoded off the provider's loop too: how long one callback
holds that loop is measured in CPU time of the loop's thread (the issue's 50 ms bound),
which the other processes of a busy machine do not inflate as they do wall time. A big
result, on either side, is decoded by a thread other than the one waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import checked_threads, read_line
from services import TABLES_METHODS, Echo, EchoImpl, TableListener, Tables, TablesImpl

import backchannel
from backchannel.wire import codec

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

#: more items than BULK_ITEMS, so an ``async def`` method's result counts as bulk too
ENTRIES = 4096
#: small calls of the other consumer that must be answered during the encoding
SMALL_CALLS = 3
#: how long the encoding waits for them before giving up (a bound, never reached when
#: they are answered)
PATIENCE = 5.0


class GatedDict(dict[str, int]):
    """A dict that, while being encoded, waits for ``answered`` halfway through."""

    def __init__(self, answered: threading.Event) -> None:
        super().__init__((f"key-{i}", i) for i in range(ENTRIES))
        self.encoding = threading.Event()
        self._answered = answered
        self.waited_for: bool | None = None  # whether the small calls came in time

    def items(self) -> Iterator[tuple[str, int]]:  # type: ignore[override]
        for n, item in enumerate(super().items()):
            if n == ENTRIES // 2 and self.waited_for is None:
                self.encoding.set()
                self.waited_for = self._answered.wait(PATIENCE)
            yield item


@backchannel.interface("test.Bulk")
class Bulk:
    def table(self) -> dict[str, int]: ...
    def add(self, a: int, b: int) -> int: ...
    def size(self, value: dict[str, int]) -> int: ...
    def echo(self, value: dict[str, int]) -> dict[str, int]: ...


class SyncBulk:
    def __init__(self, result: GatedDict) -> None:
        self.result = result

    def table(self) -> dict[str, int]:
        return self.result

    def add(self, a: int, b: int) -> int:
        return a + b

    def size(self, value: dict[str, int]) -> int:
        return len(value)

    def echo(self, value: dict[str, int]) -> dict[str, int]:
        return value


class AsyncBulk(SyncBulk):
    async def table(self) -> dict[str, int]:  # type: ignore[override]
        return self.result

    async def size(self, value: dict[str, int]) -> int:  # type: ignore[override]
        return len(value)


@pytest.mark.parametrize("kind", [SyncBulk, AsyncBulk], ids=["def", "async def"])
def test_another_consumers_calls_are_answered_while_a_big_result_is_encoded(
    kind: type[SyncBulk],
) -> None:
    answered = threading.Event()
    result = GatedDict(answered)
    stop = threading.Event()
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Bulk, kind(result))
        with (
            backchannel.Client(server.address, timeout=30) as bulk_client,
            backchannel.Client(server.address, timeout=30) as other_client,
        ):
            other = other_client.reference(Bulk)
            assert other.add(1, 1) == 2  # its stream is up before the bulk call starts

            def small_calls() -> None:
                during = 0
                for i in range(100_000):
                    if stop.is_set():
                        return
                    encoding = result.encoding.is_set()
                    assert other.add(i, 1) == i + 1
                    during += encoding  # sent after the encoding had started
                    if during >= SMALL_CALLS:
                        answered.set()
                        return

            with checked_threads(30) as start:
                start(small_calls)
                try:
                    table = bulk_client.reference(Bulk).table()
                finally:
                    stop.set()
    assert table == dict(result)
    assert result.waited_for, (
        f"{SMALL_CALLS} small calls of another consumer were not answered within "
        f"{PATIENCE} s while the provider encoded a big result: its loop was blocked"
    )


@pytest.mark.parametrize(
    ("kind", "entries", "where"),
    [
        (SyncBulk, 10, "pool"),
        (SyncBulk, 20_000, "pool"),
        (AsyncBulk, 10, "loop"),  # a small call keeps the fast path: no thread hop
        (AsyncBulk, 20_000, "pool"),
    ],
    ids=["def small", "def big", "async def small", "async def big"],
)
def test_arguments_are_decoded_off_the_loop_for_def_methods_and_bulk_data(
    kind: type[SyncBulk], entries: int, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    decode_args = codec.decode_args

    def spy(values: object, place: str, *args: object) -> list[object]:
        if place == "test.Bulk.size()":
            threads.append(threading.current_thread().name)
        return decode_args(values, place, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "decode_args", spy)
    value = {f"key-{i}": i for i in range(entries)}
    with (
        backchannel.Server("127.0.0.1:0") as server,
        backchannel.Client(server.address) as client,
    ):
        server.export(Bulk, kind(GatedDict(threading.Event())))
        assert client.reference(Bulk).size(value) == entries
    assert len(threads) == 1
    in_pool = threads[0].startswith("backchannel-provider")
    assert in_pool == (where == "pool"), f"decoded in thread {threads[0]!r}"


@pytest.mark.parametrize(
    ("entries", "where"), [(10, "loop"), (20_000, "pool")], ids=["small", "big"]
)
def test_a_consumer_decodes_a_bulk_result_off_its_loop(
    entries: int, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    decode = codec.decode

    def spy(value: object, place: str, *args: object) -> object:
        if place == "the result of test.Bulk.echo()":
            threads.append(threading.current_thread().name)
        return decode(value, place, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "decode", spy)
    value = {f"key-{i}": i for i in range(entries)}
    with (
        backchannel.Server("127.0.0.1:0") as server,
        backchannel.Client(server.address) as client,
    ):
        server.export(Bulk, SyncBulk(GatedDict(threading.Event())))
        assert client.reference(Bulk).echo(value) == value
    assert len(threads) == 1
    in_pool = threads[0].startswith("backchannel-callback")
    assert in_pool == (where == "pool"), f"decoded in thread {threads[0]!r}"


# ------------------------------------------- a listener's big result, on the provider

#: the issue's answer: a map of about 2.4 MB on the wire
TABLE_ENTRIES = 105_000
#: calls to the listener while the provider's loop is watched
PULLS = 8
#: the issue's bound on how long the provider's loop may be held up by one of them
STALL_BOUND = 0.050


@contextlib.contextmanager
def table_listener_process(address: str, entries: int) -> Iterator[None]:
    """A consumer in a process of its own (``table_listener_process.py``) that has added
    a listener answering with a table of ``entries`` entries; killed on the way out."""
    script = Path(__file__).with_name("table_listener_process.py")
    command = [sys.executable, str(script), address, str(entries)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=script.parent)
    try:
        assert read_line(process, 15, "the table listener's process") == "ready"
        yield
    finally:
        process.kill()
        process.wait(5)


def test_a_listeners_big_result_is_decoded_off_the_providers_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the provider's loop does per callback is timed in CPU time of its thread, so
    what the issue bounds (how long the loop is held up, which every other stream waits
    out) is measured without the other processes of a busy machine in it; the other
    consumer's worst round trip and the loop's worst lag (wall time) are printed."""
    assert len(codec.encode(TableListener(TABLE_ENTRIES).table(), "").SerializeToString()) > (
        2_300_000
    )
    loop_thread: list[int] = []
    longest: list[float] = [0.0]
    over: list[float] = []  # the callbacks that took longer than the bound
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:
        if threading.get_ident() not in loop_thread:
            return run(handle)
        start = time.thread_time()
        try:
            return run(handle)
        finally:
            took = time.thread_time() - start
            longest[0] = max(longest[0], took)
            if took >= STALL_BOUND:
                over.append(took)

    monkeypatch.setattr(asyncio.events.Handle, "_run", timed)
    impl = TablesImpl()
    with backchannel.Server("127.0.0.1:0", callback_timeout=30) as server:
        server.export(Tables, impl, methods=TABLES_METHODS)
        loop = server._portal.loop  # type: ignore[union-attr]
        loop.call_soon_threadsafe(lambda: loop_thread.append(threading.get_ident()))
        with (
            table_listener_process(server.address, TABLE_ENTRIES),
            backchannel.Client(server.address, timeout=10) as client,
        ):
            assert impl.added.wait(5)
            echo = client.reference(Tables).echo
            assert echo(0) == 0
            lag = LoopLag(loop)
            stop = threading.Event()
            round_trips: list[float] = []

            def other_consumer() -> None:  # its failed call fails the test
                while not stop.is_set():
                    sent = time.perf_counter()
                    assert echo(1) == 1
                    round_trips.append(time.perf_counter() - sent)

            longest[0] = 0.0
            over.clear()
            try:
                with checked_threads(10) as start:
                    start(other_consumer)
                    try:
                        sizes = [len(impl.listener.table()) for _ in range(PULLS)]
                    finally:
                        stop.set()
            finally:
                lag.stop()
    assert round_trips, "the other consumer made no call while the results came in"
    stall = longest[0]
    print(
        f"provider's loop: longest callback {stall * 1000:.1f} ms of CPU, worst lag "
        f"{lag.worst * 1000:.1f} ms; other consumer: {len(round_trips)} echo() calls, worst "
        f"{max(round_trips) * 1000:.1f} ms"
    )
    assert sizes == [TABLE_ENTRIES] * PULLS
    # decoded on the loop, every one of the PULLS answers holds it 120-135 ms; off it, a
    # callback takes 24-39 ms, and a full GC pass landing in one may add 20 ms: one such
    # outlier, under twice the bound, is not a result decoded there
    assert len(over) <= 1 and stall < 2 * STALL_BOUND, (
        f"callbacks held the provider's loop for {[round(t * 1000) for t in over]} ms of CPU "
        f"while a listener's {TABLE_ENTRIES}-entry results came in: they were decoded there"
    )


class LoopLag:
    """The longest a loop took to run a callback due now (wall time), until stopped."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.worst = 0.0
        self._stopped = threading.Event()
        self._future = asyncio.run_coroutine_threadsafe(self._probe(), loop)

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopped.is_set():
            due = loop.time() + 0.001
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - due)

    def stop(self) -> None:
        self._stopped.set()
        self._future.result(5)


@pytest.mark.parametrize(
    ("entries", "where"),
    [(10, "backchannel-server"), (20_000, "backchannel-provider-reentrant")],
    ids=["small", "big"],
)
def test_a_big_listener_result_is_decoded_by_a_thread_that_is_not_waiting_for_it(
    entries: int, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider's only regular thread waits for the listener's answer: a big one is
    decoded on an extra (re-entrant) thread, never queued behind the thread that waits
    for it, where it would wait for ever; a small one on the loop, as before."""
    threads: list[str] = []
    decode = codec.decode

    def spy(value: object, place: str, *args: object) -> object:
        if place.endswith(".table()"):
            threads.append(threading.current_thread().name)
        return decode(value, place, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "decode", spy)
    with (
        backchannel.Server("127.0.0.1:0", max_workers=1, callback_timeout=5) as server,
        backchannel.Client(server.address, timeout=10) as client,
    ):
        server.export(Tables, TablesImpl(), methods=TABLES_METHODS)
        assert client.reference(Tables).pull(TableListener(entries)) == entries
    assert len(threads) == 1
    assert threads[0].startswith(where), f"decoded in thread {threads[0]!r}"


class EchoingListener:
    """A listener whose answer is what the provider echoes back to it: a big result the
    consumer decodes while this listener's thread waits for it."""

    def __init__(self, echo: Callable[[object], Any], entries: int) -> None:
        self.echo = echo
        self.value = {f"entry-{i}": i for i in range(entries)}

    def table(self) -> Any:
        return self.echo(self.value)


def test_a_consumer_decodes_a_big_result_on_a_thread_that_is_not_waiting_for_it() -> None:
    """The client's only thread runs a listener that calls the provider: the big result
    of that call is decoded on an extra (re-entrant) thread, not queued behind the very
    thread that waits for it (which waited until the provider's callback timed out)."""
    with (
        backchannel.Server("127.0.0.1:0", callback_timeout=5) as server,
        backchannel.Client(server.address, timeout=10, max_workers=1) as client,
    ):
        server.export(Tables, TablesImpl(), methods=TABLES_METHODS)
        server.export(Echo, EchoImpl())
        listener = EchoingListener(client.reference(Echo).echo, 20_000)
        assert client.reference(Tables).pull(listener) == 20_000
