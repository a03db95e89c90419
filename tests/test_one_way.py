"""One-way calls past the receiver's in-flight limit: they wait for a slot and run in
order, the sender is held back (the receiver stops reading) rather than cut off, and a
flood stays bounded; with the one-way edge cases of the handshake and of GoAway."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from conftest import RawStream, run

import backchannel
from backchannel import Limits
from backchannel.v1 import envelope_pb2 as pb

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

COUNT = 300
SLOW = 0.002  # seconds each tick takes on the slow side: 300 of them ~0.6 s / 5 at once


@backchannel.interface("oneway.Ticks")
class Ticks:
    @backchannel.method(one_way=True)
    def tick(self, n: int) -> None: ...


@backchannel.interface("oneway.Feed")
class Feed:
    @backchannel.method(arguments=[backchannel.Argument(index=0)])
    def subscribe(self, listener: Ticks) -> None: ...
    def fire(self, count: int) -> None: ...
    @backchannel.method(one_way=True)
    def put(self, n: int) -> None: ...
    def taken(self, count: int) -> list[int]: ...


class FeedImpl:
    """Fires one-way ticks at its listener; takes one-way puts slowly."""

    def __init__(self) -> None:
        self.listener: Any = None
        self.got: list[int] = []
        self.changed = threading.Condition()
        self.running = 0
        self.most_running = 0

    def subscribe(self, listener: Any) -> None:
        self.listener = listener

    def fire(self, count: int) -> None:
        for n in range(count):  # as fast as they can be sent
            self.listener.tick(n)

    def put(self, n: int) -> None:
        with self.changed:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.got.append(n)  # recorded as it starts: the order they were started in
            self.changed.notify_all()
        threading.Event().wait(SLOW)  # a slow provider
        with self.changed:
            self.running -= 1

    def taken(self, count: int) -> list[int]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.got) >= count, 10)
            return list(self.got)


class SlowListener:
    """A slow consumer: records each tick as it starts, then takes a while."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.changed = threading.Condition()

    def tick(self, n: int) -> None:
        with self.changed:
            self.got.append(n)
            self.changed.notify_all()
        threading.Event().wait(SLOW)

    def wait_for(self, count: int, timeout: float = 10) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.got) >= count, timeout)


class AsyncSlowListener(SlowListener):
    async def tick(self, n: int) -> None:  # type: ignore[override]
        with self.changed:
            self.got.append(n)
            self.changed.notify_all()
        await asyncio.sleep(SLOW)


def _no_stream_ended(caplog: pytest.LogCaptureFixture) -> None:
    said = [record.getMessage() for record in caplog.records]
    assert not [line for line in said if "Faults" in line or "fault" in line], said
    assert not [line for line in said if "stream is ended" in line], said


def test_one_way_callbacks_past_a_slow_consumers_limit_all_arrive_none_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "backchannel")
    impl = FeedImpl()
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Feed, impl)
        limits = Limits(max_calls_in_flight=5)
        with backchannel.Client(server.address, limits=limits, timeout=20) as client:
            feed = client.reference(Feed)
            listener = SlowListener()
            feed.subscribe(listener)
            feed.fire(COUNT)  # returns once all are sent: none refused, no stream ended
            assert listener.wait_for(COUNT), f"only {len(listener.got)} of {COUNT} arrived"
            # all of them (the 5 threads take them in turn; order: the asyncio test)
            assert sorted(listener.got) == list(range(COUNT))
            feed.fire(1)  # the stream goes on
            assert listener.wait_for(COUNT + 1)
    _no_stream_ended(caplog)


def test_one_way_callbacks_to_a_slow_asyncio_consumer_run_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    impl = FeedImpl()
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Feed, impl)

        async def body() -> None:
            limits = Limits(max_calls_in_flight=5)
            async with backchannel.AsyncClient(server.address, limits=limits) as client:
                feed: Any = client.reference(Feed)
                listener = AsyncSlowListener()
                await feed.subscribe(listener)
                await feed.fire(COUNT)
                assert await asyncio.to_thread(listener.wait_for, COUNT)
                assert listener.got == list(range(COUNT))  # started on the loop, in order

        run(body())
    _no_stream_ended(caplog)


class CallingListener(SlowListener):
    """A listener whose every tick calls the provider back and waits for the answer."""

    feed: Any = None

    def tick(self, n: int) -> None:
        self.feed.taken(0)
        super().tick(n)


def test_a_consumer_held_back_by_its_backlog_still_reads_the_results_its_ticks_await(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With more one-way calls waiting than its budget, the consumer stops reading the
    provider; but its listeners wait for results from the provider meanwhile: it must read
    on, or they, and so the backlog, would never end."""
    impl = FeedImpl()
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Feed, impl)
        # 100 ticks never reach twice the budget: none is dropped
        limits = Limits(max_calls_in_flight=2, max_waiting_one_way=50)
        with backchannel.Client(server.address, limits=limits, timeout=5) as client:
            feed = client.reference(Feed)
            listener = CallingListener()
            listener.feed = feed
            feed.subscribe(listener)
            feed.fire(100)
            assert listener.wait_for(100), f"only {len(listener.got)} of 100 arrived"
            assert sorted(listener.got) == list(range(100))
    _no_stream_ended(caplog)


def test_one_way_forward_calls_past_a_slow_providers_limit_all_run_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    impl = FeedImpl()
    limits = Limits(max_calls_in_flight=5)
    with backchannel.Server("127.0.0.1:0", limits=limits) as server:
        server.export(Feed, impl)
        with backchannel.Client(server.address, timeout=20) as client:
            feed = client.reference(Feed)
            for n in range(COUNT):
                feed.put(n)
            # a call that wants a result is not refused for the one-way calls waiting
            got = feed.taken(COUNT)
    assert sorted(got) == list(range(COUNT))
    assert impl.most_running <= 5
    _no_stream_ended(caplog)


def test_a_flood_of_one_way_calls_past_the_budget_is_held_back_and_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that sends one-way calls as fast as it can (batches of 200), never
    reading: past the budget the provider stops reading it (flow control holds its
    writes), at most the budget and one batch wait, nothing is logged per call, and the
    stream and other consumers go on."""
    impl = FeedImpl()
    limits = Limits(max_calls_in_flight=2, max_waiting_one_way=50)
    with backchannel.Server("127.0.0.1:0", limits=limits) as server:
        server.export(Feed, impl)

        async def body() -> None:
            stream = RawStream(server.address)
            await stream.hello()
            [session] = server._core._sessions
            batch = pb.Batch()
            for _ in range(200):
                call = batch.frames.add().call
                call.service, call.method, call.one_way = "oneway.Feed", "put", True
                call.args.add().int_value = 0
            sent = most_waiting = 0

            async def flood() -> None:
                nonlocal sent, most_waiting
                for call_id in range(1, 1_000_000, 200):
                    for offset, frame in enumerate(batch.frames):
                        frame.call.id = call_id + offset
                    await stream.send(pb.Frame(batch=batch))
                    sent += 200
                    most_waiting = max(most_waiting, session.connection.one_way_waiting)

            flooding = asyncio.ensure_future(flood())
            done, _ = await asyncio.wait([flooding], timeout=2)
            assert not done, "the flood was never held back"  # flow control holds it
            assert 50 <= most_waiting <= 50 + 200, most_waiting
            assert sent > 3 * len(impl.got)  # most of it waits in HTTP/2's windows
            # another consumer is served meanwhile
            with backchannel.Client(server.address, timeout=5) as other:
                assert await asyncio.to_thread(other.reference(Feed).taken, 0) is not None
            flooding.cancel()
            assert session.cause is None  # the flooder's stream was never ended
            await stream.close()

        run(body())
    said = [record.getMessage() for record in caplog.records]
    assert len(said) < 20, said  # nothing per call


def test_a_one_way_call_before_the_handshake_gets_a_fault_naming_it() -> None:
    with backchannel.Server("127.0.0.1:0") as server:

        async def body() -> None:
            stream = RawStream(server.address)
            call = pb.Call(id=7, service="oneway.Feed", method="put", one_way=True)
            await stream.send(pb.Frame(call=call))
            frame = await stream.recv()
            assert frame.WhichOneof("kind") == "fault", frame
            assert frame.fault.call_id == 7
            assert "send a hello frame before call 7" in frame.fault.message
            assert "one-way call 7 dropped" in frame.fault.message
            await stream.hello()  # the stream goes on
            await stream.close()

        run(body())
