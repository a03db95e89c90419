"""The Session (the writer, the outgoing-call table, reading) against a hand-driven peer.

A consumer ``Session`` runs on an event loop whose clock the test sets; its peer is a
provider protocol ``Connection`` the test drives frame by frame: what the session writes
is parsed and fed to the peer as it is written, and what the peer queues reaches the
session's reader when the test delivers it. No gRPC, no threads, no sleeps: every wait is
a bounded number of loop turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import pytest
from helpers import SERVICES, make_call

from backchannel.errors import (
    DeadlineExceeded,
    LocalProtocolError,
    MessageTooLarge,
    StreamBroken,
    Unauthenticated,
)
from backchannel.settings import Limits
from backchannel.transport.grpcio.status import translate as _translate
from backchannel.transport.outgoing import Outgoing
from backchannel.transport.receiver import SplitBatch, parse_frame
from backchannel.transport.seam import EOF, Code
from backchannel.transport.session import CURRENT_CALL, Deferred, Session
from backchannel.transport.writer import coalesce, serialize
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec
from backchannel.wire import frames as wire
from backchannel.wire.protocol import (
    CallReceived,
    CancelReceived,
    Connection,
    Role,
    State,
    Unparseable,
)


class ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose time moves only when the test moves it."""

    now = 1000.0

    def time(self) -> float:
        return self.now


def run(test: Callable[[ClockLoop], Coroutine[Any, Any, None]]) -> None:
    loop = ClockLoop()
    try:
        loop.run_until_complete(test(loop))
    finally:
        loop.close()


async def turns(condition: Callable[[], object], what: str, bound: int = 200) -> None:
    """Let the loop run until ``condition`` holds, at most ``bound`` turns."""
    for _ in range(bound):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not within {bound} loop turns: {what}")


class Served:
    """The session's dispatcher: incoming calls run ``handler``."""

    def __init__(self, handler: Callable[[pb.Call], Coroutine[Any, Any, pb.Value]]) -> None:
        self.handler = handler
        self.ended_with: list[BaseException] = []

    async def dispatch(self, call: pb.Call) -> pb.Value:
        return await self.handler(call)

    def released(self, callback_id: int) -> None:
        pass

    def ended(self, cause: BaseException) -> None:
        self.ended_with.append(cause)


async def _null(call: pb.Call) -> pb.Value:
    return codec.NULL


class Peer:
    """A provider at the other end of a consumer session, driven by the test."""

    def __init__(
        self,
        max_calls_in_flight: int = 0,
        handler: Callable[[pb.Call], Coroutine[Any, Any, pb.Value]] = _null,
        send_tracebacks: bool = False,
        limits: Limits | None = None,
    ) -> None:
        self.connection: Connection[str] = Connection(
            Role.PROVIDER,
            application="warehouse",
            services=SERVICES,
            max_calls_in_flight=max_calls_in_flight,
        )
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.calls: list[pb.Call] = []
        self.cancels: list[tuple[int, str]] = []
        self.results: list[pb.Result] = []
        self.gate: asyncio.Future[None] | None = None  # while set, writes wait on it
        self.fail_writes: BaseException | None = None
        self.served = Served(handler)
        self.session = Session(
            Connection(Role.CONSUMER, application="shop"),
            self.write,
            lambda session: self.served,
            codec.ErrorTypes(),
            peer="peer:1",
            limits=limits or Limits(),
            # the default (no tracebacks) unless asked: the consumer's side leaves it out
            **({"send_tracebacks": True} if send_tracebacks else {}),
        )
        self.reader: asyncio.Task[None] | None = None
        self.futures: list[asyncio.Future[Any]] = []
        self.messages: list[int] = []  # the frames of each message written, in order

    def start(self, method: str, timeout: float | None = None, parent: int = 0) -> Any:
        """Make a call from the session; its future."""
        future = self.session.start_call(make_call(method), timeout, parent)
        self.futures.append(future)
        return future

    async def write(self, message: bytes) -> None:
        if self.fail_writes is not None:
            raise self.fail_writes
        if self.gate is not None:
            await self.gate
        frame = parse_frame(message)
        assert type(frame) is pb.Frame
        self.messages.append(len(frame.batch.frames) if frame.HasField("batch") else 1)
        for event in self.connection.receive(frame):
            if type(event) is CallReceived:
                self.calls.append(event.call)
            elif type(event) is CancelReceived:
                self.cancels.append((event.call_id, event.reason))
        frames = list(frame.batch.frames) if frame.HasField("batch") else [frame]
        self.results += [each.result for each in frames if each.HasField("result")]

    def deliver(self) -> None:
        """Send the session what the peer queued."""
        for data in self.connection.take_encoded():
            self.inbox.put_nowait(parse_frame(data))

    async def read(self) -> Any:
        """The session's read: what the peer delivered; an exception put there is raised."""
        item = await self.inbox.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def open(self) -> None:
        self.session.connection.start()
        self.session.flush()
        self.reader = asyncio.get_running_loop().create_task(self.session.run(self.read))
        await turns(lambda: self.connection.state is State.OPEN, "the hello written")
        self.deliver()
        await asyncio.wait_for(self.session.handshake, 5)

    def answer(self, call_id: int) -> None:
        self.connection.send_result(pb.Result(id=call_id, value=codec.NULL))
        self.deliver()

    async def close(self) -> None:
        self.session.lost(StreamBroken("the test is over"))
        for future in self.futures:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: its failure is no news
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


# ------------------------------------------------------------ the outgoing-call table


def test_a_call_that_waited_until_a_tenth_of_its_timeout_is_left_is_failed_not_sent() -> None:
    run(_a_call_that_waited_until_a_tenth_of_its_timeout_is_left_is_failed_not_sent)


async def _a_call_that_waited_until_a_tenth_of_its_timeout_is_left_is_failed_not_sent(
    loop: ClockLoop,
) -> None:
    peer = Peer(max_calls_in_flight=1)
    await peer.open()
    first = peer.start("first", None)
    late = peer.start("late", 10.0)  # waits for the one slot
    cancelled = peer.start("cancelled", None)
    after = peer.start("after", None)
    await turns(lambda: len(peer.calls) == 1, "the first call sent")
    cancelled.cancel()  # while it waits: skipped, and the next one still goes
    loop.now += 9.0  # exactly a tenth of the late call's 10 s left
    peer.answer(peer.calls[0].id)
    await turns(lambda: first.done() and len(peer.calls) == 2, "the slot freed")
    assert [each.method for each in peer.calls] == ["first", "after"]
    with pytest.raises(DeadlineExceeded) as caught:
        late.result()
    assert str(caught.value) == (
        "test.Echo.late was not sent: it waited for one of the 1 calls the peer runs at once "
        "(max_calls_in_flight) until less than a tenth of its 10.0 s timeout was left"
    )
    assert not after.done()
    await peer.close()


def test_a_call_that_waited_with_more_than_a_tenth_of_its_timeout_left_is_sent() -> None:
    run(_a_call_that_waited_with_more_than_a_tenth_of_its_timeout_left_is_sent)


async def _a_call_that_waited_with_more_than_a_tenth_of_its_timeout_left_is_sent(
    loop: ClockLoop,
) -> None:
    peer = Peer(max_calls_in_flight=1)
    await peer.open()
    peer.start("first", None)
    waited = peer.start("waited", 10.0)
    await turns(lambda: len(peer.calls) == 1, "the first call sent")
    loop.now += 8.5  # 1.5 s of 10 left
    peer.answer(peer.calls[0].id)
    await turns(lambda: len(peer.calls) == 2, "the waiting call sent")
    assert peer.calls[1].method == "waited" and not waited.done()
    peer.answer(peer.calls[1].id)
    assert await asyncio.wait_for(waited, 5) == pb.Result(id=peer.calls[1].id, value=codec.NULL)
    await peer.close()


def test_an_expired_call_is_cancelled_at_the_peer_and_frees_its_slot() -> None:
    run(_an_expired_call_is_cancelled_at_the_peer_and_frees_its_slot)


async def _an_expired_call_is_cancelled_at_the_peer_and_frees_its_slot(loop: ClockLoop) -> None:
    peer = Peer(max_calls_in_flight=1)
    await peer.open()
    slow = peer.start("slow", 0.5)
    waiting = peer.start("waiting", None)
    await turns(lambda: len(peer.calls) == 1, "the slow call sent")
    loop.now += 0.6
    await turns(lambda: slow.done() and len(peer.calls) == 2, "the slow call expired")
    with pytest.raises(DeadlineExceeded) as caught:
        slow.result()
    assert str(caught.value) == "test.Echo.slow did not finish within 0.5 s"
    assert peer.cancels == [(peer.calls[0].id, "deadline of 0.5 s exceeded")]
    assert peer.calls[1].method == "waiting" and not waiting.done()
    assert not peer.session.awaits(peer.calls[0].id) and peer.session.awaits(peer.calls[1].id)
    await peer.close()


class CountingFuture(asyncio.Future[Any]):
    """A future that counts how often anything asks whether it is done."""

    asked = 0
    budget = 1 << 62

    def done(self) -> bool:
        CountingFuture.asked += 1
        assert CountingFuture.asked <= CountingFuture.budget, "waiting calls scanned too often"
        return super().done()


class CountingLoop(ClockLoop):
    def create_future(self) -> asyncio.Future[Any]:
        return CountingFuture(loop=self)


def test_the_waiting_queue_drops_finished_calls_and_keeps_the_live_ones_in_order() -> None:
    loop = CountingLoop()
    try:
        loop.run_until_complete(
            _the_waiting_queue_drops_finished_calls_and_keeps_the_live_ones_in_order(loop)
        )
    finally:
        loop.close()


async def _the_waiting_queue_drops_finished_calls_and_keeps_the_live_ones_in_order(
    loop: ClockLoop,
) -> None:
    peer = Peer(max_calls_in_flight=1)
    await peer.open()
    peer.start("first")
    await turns(lambda: len(peer.calls) == 1, "the first call sent")
    # a peer that never frees its slot: 5,000 callers wait, then 20,000 give up waiting
    live = [peer.start(f"m{number}") for number in range(5000)]
    CountingFuture.asked, CountingFuture.budget = 0, 100_000  # 4 looks a call, amortized
    largest = 0
    for number in range(20_000):
        future = peer.session.start_call(make_call(f"gone{number}"), None)
        future.cancel()
        largest = max(largest, len(peer.session._waiting))
    # compacted once the queue holds twice its live calls (the one being added is live)
    assert largest <= 2 * (len(live) + 1)
    CountingFuture.budget = 1 << 62
    # the live ones are sent in the order they were made, the cancelled never
    for sent in range(2, 5):
        peer.answer(peer.calls[-1].id)
        await turns(lambda: len(peer.calls) == sent, "the next live call sent")  # noqa: B023
    assert [each.method for each in peer.calls] == ["first", "m0", "m1", "m2"]
    assert not any(future.done() for future in live[3:])
    await peer.close()


# ------------------------------------------------------------------- the writer


def test_a_failed_write_fails_every_pending_call_with_the_transport_error() -> None:
    run(_a_failed_write_fails_every_pending_call_with_the_transport_error)


async def _a_failed_write_fails_every_pending_call_with_the_transport_error(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    await peer.open()
    sent = peer.start("sent", None)
    await turns(lambda: len(peer.calls) == 1, "the call sent")
    peer.fail_writes = ConnectionResetError("reset by peer")
    failed = peer.start("failed", None)
    expected = "the stream to peer:1 broke: ConnectionResetError: reset by peer"
    for future in (sent, failed):
        await turns(future.done, "the call failed")
        with pytest.raises(StreamBroken) as caught:
            future.result()
        assert str(caught.value) == expected
    assert peer.session.cause is not None and str(peer.session.cause) == expected
    assert peer.served.ended_with == [peer.session.cause]
    await peer.close()


# ------------------------------------------------------------- serving the peer's calls


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_an_exception_that_cannot_be_sent_is_answered_with_an_encode_error() -> None:
    run(_an_exception_that_cannot_be_sent_is_answered_with_an_encode_error)


async def _an_exception_that_cannot_be_sent_is_answered_with_an_encode_error(
    loop: ClockLoop,
) -> None:
    async def raising(call: pb.Call) -> pb.Value:
        raise Unprintable()

    peer = Peer(handler=raising)
    await peer.open()
    call_id = peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.deliver()
    await turns(lambda: peer.results, "the callback answered")
    [result] = peer.results
    assert result.id == call_id
    assert result.error.type == "backchannel.EncodeError"
    assert result.error.message == (
        "callback 5.changed raised Unprintable, which could not be sent: RuntimeError: no text"
    )
    await peer.close()


def test_a_session_that_sends_tracebacks_sends_the_raised_ones() -> None:
    run(_a_session_that_sends_tracebacks_sends_the_raised_ones)


async def _a_session_that_sends_tracebacks_sends_the_raised_ones(loop: ClockLoop) -> None:
    async def raising(call: pb.Call) -> pb.Value:
        raise ValueError("bad value")

    peer = Peer(handler=raising, send_tracebacks=True)
    await peer.open()
    peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.deliver()
    await turns(lambda: peer.results, "the callback answered")
    [result] = peer.results
    assert result.error.type == "ValueError" and result.error.message == "bad value"
    assert "ValueError: bad value" in result.error.traceback
    assert 'raise ValueError("bad value")' in result.error.traceback
    await peer.close()


def test_a_session_sends_no_traceback_unless_asked() -> None:
    run(_a_session_sends_no_traceback_unless_asked)


async def _a_session_sends_no_traceback_unless_asked(loop: ClockLoop) -> None:
    async def raising(call: pb.Call) -> pb.Value:
        raise ValueError("bad value")

    peer = Peer(handler=raising)  # as the consumer's side makes it: no send_tracebacks
    await peer.open()
    peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.deliver()
    await turns(lambda: peer.results, "the callback answered")
    [result] = peer.results
    assert result.error.type == "ValueError" and result.error.message == "bad value"
    assert result.error.traceback == ""
    await peer.close()


def test_wait_idle_waits_for_running_calls_and_for_their_results_to_be_written() -> None:
    run(_wait_idle_waits_for_running_calls_and_for_their_results_to_be_written)


async def _wait_idle_waits_for_running_calls_and_for_their_results_to_be_written(
    loop: ClockLoop,
) -> None:
    release: asyncio.Future[None] = loop.create_future()

    async def waiting(call: pb.Call) -> pb.Value:
        if call.method == "slow":
            await release
        return codec.NULL

    peer = Peer(handler=waiting)
    await peer.open()
    peer.gate = loop.create_future()  # the peer reads nothing for now
    peer.connection.send_call(pb.Call(callback_id=5, method="slow"), "token")
    peer.connection.send_call(pb.Call(callback_id=5, method="quick"), "token")
    peer.deliver()
    idle = loop.create_task(peer.session.wait_idle())
    await turns(lambda: len(peer.session._running) == 1, "the slow call running")
    release.set_result(None)
    await turns(lambda: not peer.session._running, "the slow call done")
    for _ in range(20):
        await asyncio.sleep(0)
    assert not idle.done(), "idle while the results are not written yet"
    peer.gate.set_result(None)
    await asyncio.wait_for(idle, 5)
    assert sorted(result.id for result in peer.results) == [1, 2]
    await peer.close()


def test_wait_idle_returns_when_the_stream_ends_under_a_running_call() -> None:
    run(_wait_idle_returns_when_the_stream_ends_under_a_running_call)


async def _wait_idle_returns_when_the_stream_ends_under_a_running_call(loop: ClockLoop) -> None:
    never: asyncio.Future[None] = loop.create_future()

    async def waiting(call: pb.Call) -> pb.Value:
        await never
        return codec.NULL

    peer = Peer(handler=waiting)
    await peer.open()
    peer.connection.send_call(pb.Call(callback_id=5, method="slow"), "token")
    peer.deliver()
    await turns(lambda: len(peer.session._running) == 1, "the call running")
    idle = loop.create_task(peer.session.wait_idle())
    await asyncio.sleep(0)
    peer.session.lost(StreamBroken("gone"))
    await asyncio.wait_for(idle, 5)  # returns: neither hangs nor raises CancelledError
    assert idle.result() is None
    await peer.close()


def test_calls_that_await_one_shared_future_all_run_to_their_result() -> None:
    run(_calls_that_await_one_shared_future_all_run_to_their_result)


async def _calls_that_await_one_shared_future_all_run_to_their_result(loop: ClockLoop) -> None:
    ready: asyncio.Future[pb.Value] = loop.create_future()  # e.g. a resource loaded once

    async def shared(call: pb.Call) -> pb.Value:
        return await ready

    peer = Peer(handler=shared)
    await peer.open()
    for _ in range(3):  # each started eagerly, each then handed to a task of its own
        peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.deliver()
    await turns(lambda: len(peer.session._running) == 3, "all three waiting")
    ready.set_result(pb.Value(string_value="loaded"))
    await turns(lambda: len(peer.results) == 3, "all three answered")
    assert [(result.id, result.WhichOneof("outcome")) for result in peer.results] == [
        (1, "value"),
        (2, "value"),
        (3, "value"),
    ]
    assert all(result.value.string_value == "loaded" for result in peer.results)
    await peer.close()


# ------------------------------------------------------------------ the call tree


def test_ancestors_follow_the_chain_of_calls_each_made_during_the_other() -> None:
    run(_ancestors_follow_the_chain_of_calls_each_made_during_the_other)


async def _ancestors_follow_the_chain_of_calls_each_made_during_the_other(
    loop: ClockLoop,
) -> None:
    made: dict[str, asyncio.Future[Any]] = {}
    release: asyncio.Future[None] = loop.create_future()

    async def calling(call: pb.Call) -> pb.Value:
        # the consumer's callback calls the provider back, during the callback
        made[call.method] = peer.start(f"during-{call.method}", None, parent=call.id)
        await release
        return codec.NULL

    peer = Peer(handler=calling)
    await peer.open()
    session = peer.session
    # ids on both sides: spend the peer's call id 1 on an unrelated callback first
    unrelated = peer.connection.send_call(pb.Call(callback_id=5, method="unrelated"), "t")
    peer.deliver()
    await turns(lambda: "unrelated" in made, "the unrelated callback running")
    other = peer.connection.send_call(pb.Call(callback_id=5, method="other"), "t")
    peer.deliver()
    await turns(lambda: "other" in made, "the other callback running")
    root = peer.start("root")
    await turns(lambda: len(peer.calls) == 3, "the root call sent")
    root_id = peer.calls[2].id
    # during root, the provider calls back X; during X the consumer calls; during that Y
    x = peer.connection.send_call(pb.Call(callback_id=5, method="x", parent_id=root_id), "t")
    peer.deliver()
    await turns(lambda: "x" in made and len(peer.calls) == 4, "x running")
    during_x = peer.calls[3].id
    y = peer.connection.send_call(pb.Call(callback_id=5, method="y", parent_id=during_x), "t")
    peer.deliver()
    await turns(lambda: "y" in made and len(peer.calls) == 5, "y running")
    during_y = peer.calls[4].id
    assert (unrelated, other, x, y) == (1, 2, 3, 4)
    assert session.ancestors(during_y) == {y, x}
    assert session.ancestors(during_x) == {x}
    assert session.ancestors(root_id) == set()
    assert session.ancestors(peer.calls[0].id) == {unrelated}
    assert session.ancestors(peer.calls[1].id) == {other}  # not on to outgoing call 1's
    assert session.ancestors(999) == set()
    assert not root.done()
    await peer.close()


def test_a_discarded_session_ends_quietly_without_its_dispatcher() -> None:
    run(_a_discarded_session_ends_quietly_without_its_dispatcher)


async def _a_discarded_session_ends_quietly_without_its_dispatcher(loop: ClockLoop) -> None:
    peer = Peer()  # its handshake never finishes: given up, the session is discarded
    peer.session.discard()
    peer.session.lost(StreamBroken("the handshake was given up"))
    assert peer.session.closed.is_set()
    assert peer.served.ended_with == []  # the dropped dispatcher hears nothing
    with pytest.raises(StreamBroken, match="^the handshake was given up$"):
        peer.session.handshake.result()


# ------------------------------------------------------------------ back-pressure

BIG = pb.Value(string_value="x" * 1000)  # a result of about 1 KB
SMALL_QUEUE = Limits(max_message_size=1024, max_queued_bytes=4096, max_write_stall=5.0)


async def _big(call: pb.Call) -> pb.Value:
    return BIG


async def _unread_peer(loop: ClockLoop, calls: int) -> Peer:
    """A session whose peer sends ``calls`` callbacks, each in its own message, and reads
    nothing: the results pile up past max_queued_bytes."""
    peer = Peer(handler=_big, limits=SMALL_QUEUE)
    await peer.open()
    peer.gate = loop.create_future()
    for _ in range(calls):
        peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.deliver()
    await turns(lambda: not peer.session._writable.is_set(), "over the limit")
    return peer


def test_past_max_queued_bytes_the_session_stops_reading_and_holds_new_calls() -> None:
    run(_past_max_queued_bytes_the_session_stops_reading_and_holds_new_calls)


async def _past_max_queued_bytes_the_session_stops_reading_and_holds_new_calls(
    loop: ClockLoop,
) -> None:
    peer = await _unread_peer(loop, 10)
    for _ in range(20):
        await asyncio.sleep(0)
    # one result is being written, four queued (over 4096 bytes): the rest is not read
    unread = peer.inbox.qsize()
    assert unread == 10 - 6
    held = peer.start("held")
    loop.now += 4.9  # under max_write_stall: the stream goes on
    for _ in range(20):
        await asyncio.sleep(0)
    assert peer.inbox.qsize() == unread and peer.session.cause is None
    assert peer.gate is not None
    peer.gate.set_result(None)  # the peer reads again: so does the session
    await turns(lambda: len(peer.results) == 10, "every callback answered")
    await turns(lambda: len(peer.calls) == 1, "the held call sent")
    assert peer.calls[0].method == "held" and not held.done()
    loop.now += 60.0  # the stall timer was dropped when the queue drained
    for _ in range(20):
        await asyncio.sleep(0)
    assert peer.session.cause is None and peer.session.ending is None
    await peer.close()


def test_a_peer_that_stays_unread_past_max_write_stall_is_ended() -> None:
    run(_a_peer_that_stays_unread_past_max_write_stall_is_ended)


async def _a_peer_that_stays_unread_past_max_write_stall_is_ended(loop: ClockLoop) -> None:
    peer = await _unread_peer(loop, 10)
    pending = peer.start("pending")
    loop.now += 5.0
    await turns(lambda: peer.session.cause is not None, "the stream ended")
    why = (
        "peer:1 read nothing of what was queued for it for 5.0 s (max_write_stall) while "
        "over the limit of 4096 bytes (max_queued_bytes); the stream is ended"
    )
    assert peer.session.ending == (Code.RESOURCE_EXHAUSTED, why)
    with pytest.raises(StreamBroken, match=f"^{re.escape(why)}$"):
        await asyncio.wait_for(pending, 5)
    await turns(lambda: peer.reader is not None and peer.reader.done(), "the reader ended")
    assert peer.session.closed.is_set()
    await peer.close()


def test_results_piling_up_past_twice_max_queued_bytes_end_the_stream() -> None:
    run(_results_piling_up_past_twice_max_queued_bytes_end_the_stream)


async def _results_piling_up_past_twice_max_queued_bytes_end_the_stream(
    loop: ClockLoop,
) -> None:
    release: asyncio.Future[None] = loop.create_future()

    async def held(call: pb.Call) -> pb.Value:
        await release
        return BIG

    peer = Peer(handler=held, limits=SMALL_QUEUE)
    await peer.open()
    peer.gate = loop.create_future()
    for _ in range(12):  # all read and running: nothing is queued yet
        peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.deliver()
    await turns(lambda: len(peer.session._running) == 12, "all running")
    release.set_result(None)  # eleven results queue (one is written): about 11,000 bytes
    await turns(lambda: peer.session.cause is not None, "the stream ended")
    assert peer.session.ending is not None
    code, why = peer.session.ending
    assert code is Code.RESOURCE_EXHAUSTED
    found = re.fullmatch(
        r"peer:1 did not read what was sent to it: (\d+) bytes queued for it, over twice "
        r"the limit of 4096 bytes \(max_queued_bytes\); the stream is ended",
        why,
    )
    assert found is not None, why
    assert 8192 < int(found.group(1)) <= 8192 + 1100  # ended by the result that passed it
    # the reader, waiting for a frame the peer may never send, is stopped, and returns
    await turns(lambda: peer.reader is not None and peer.reader.done(), "the reader ended")
    assert peer.reader is not None and not peer.reader.cancelled()
    await peer.close()


def test_a_peer_flooding_faults_is_ended_past_max_faults_refilled_by_the_minute() -> None:
    run(_a_peer_flooding_faults_is_ended_past_max_faults_refilled_by_the_minute)


async def _a_peer_flooding_faults_is_ended_past_max_faults_refilled_by_the_minute(
    loop: ClockLoop,
) -> None:
    peer = Peer(limits=Limits(max_faults=3))
    await peer.open()

    async def faults(count: int) -> None:
        for _ in range(count):
            peer.inbox.put_nowait(pb.Frame(fault=pb.Fault(message="you erred")))
        await turns(lambda: peer.inbox.empty(), "the faults read")
        for _ in range(5):
            await asyncio.sleep(0)

    await faults(3)  # max_faults at once
    assert peer.session.cause is None
    loop.now += 19.9  # not yet one more: 3 a minute
    await faults(1)
    assert peer.session.cause is not None  # 3 + 0.995 refilled, less 4
    why = (
        "peer:1 sent more than 3 Faults (max_faults at once, or more than 3 a minute after "
        "that); the stream is ended"
    )
    assert peer.session.ending == (Code.RESOURCE_EXHAUSTED, why)
    # the reader that ended it returns: the provider ends the RPC with that status
    await turns(lambda: peer.reader is not None and peer.reader.done(), "the reader ended")
    assert peer.reader is not None and not peer.reader.cancelled()
    await peer.close()


def test_faults_are_refilled_at_max_faults_a_minute_up_to_max_faults() -> None:
    run(_faults_are_refilled_at_max_faults_a_minute_up_to_max_faults)


async def _faults_are_refilled_at_max_faults_a_minute_up_to_max_faults(loop: ClockLoop) -> None:
    peer = Peer(limits=Limits(max_faults=3))
    await peer.open()

    async def faults(count: int) -> None:
        for _ in range(count):
            peer.inbox.put_nowait(pb.Frame(fault=pb.Fault(message="you erred")))
        await turns(lambda: peer.inbox.empty(), "the faults read")
        for _ in range(5):
            await asyncio.sleep(0)

    await faults(3)
    loop.now += 20.0  # one refilled
    await faults(1)
    assert peer.session.cause is None
    loop.now += 3600.0  # refilled, but never past max_faults
    await faults(3)
    assert peer.session.cause is None
    await faults(1)
    assert peer.session.ending is not None
    await peer.close()


# --------------------------------------------------------------- pure pieces


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    metadata = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, metadata, metadata, details=details, debug_error_string="")


def test_stream_errors_become_backchannels_naming_the_peer_and_keeping_the_cause() -> None:
    refused = _rpc_error(grpc.StatusCode.UNAUTHENTICATED, "bad token")
    error = _translate(refused, "peer:1")
    assert type(error) is Unauthenticated
    assert str(error) == "peer:1 refused this consumer: bad token"
    assert error.__cause__ is refused
    broken = _rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset")
    error = _translate(broken, "peer:1")
    assert type(error) is StreamBroken
    assert str(error) == "the stream to peer:1 broke: UNAVAILABLE: connection reset"
    assert error.__cause__ is broken
    other = ConnectionResetError("reset")
    error = _translate(other, "peer:1")
    assert type(error) is StreamBroken
    assert str(error) == "the stream to peer:1 broke: ConnectionResetError: reset"
    assert error.__cause__ is other
    already = StreamBroken("already ours")
    assert _translate(already, "peer:1") is already


def test_a_batch_with_a_bad_frame_is_split_and_the_bad_one_keeps_its_ids() -> None:
    good = pb.Frame(call=pb.Call(id=6, service="test.Echo", method="echo")).SerializeToString()
    bad = pb.Frame(call=pb.Call(id=7, service="test.Echo", method="echo", one_way=True))
    bad_bytes = bad.SerializeToString().replace(b"echo", b"ec\xffo")  # not UTF-8
    reason = "Error parsing message with type 'backchannel.v1.Frame'"
    alone = parse_frame(bad_bytes)
    assert type(alone) is Unparseable
    assert (alone.size, alone.call_id, alone.one_way, alone.result_id) == (
        len(bad_bytes),
        7,
        True,
        0,
    )
    assert reason in alone.reason
    split = parse_frame(wire.batch_frame([good, bad_bytes]))
    assert type(split) is SplitBatch
    first, second = split.frames
    assert first == pb.Frame.FromString(good)
    assert second == alone
    answer = pb.Frame(result=pb.Result(id=9, error=pb.Error(message="oops")))
    answer_bytes = answer.SerializeToString().replace(b"oops", b"oo\xffs")
    unreadable = parse_frame(answer_bytes)
    assert type(unreadable) is Unparseable
    assert (unreadable.size, unreadable.call_id, unreadable.result_id) == (len(answer_bytes), 0, 9)


def test_a_result_decoded_elsewhere_settles_the_call_with_that_outcome() -> None:
    run(_a_result_decoded_elsewhere_settles_the_call_with_that_outcome)


async def _a_result_decoded_elsewhere_settles_the_call_with_that_outcome(loop: ClockLoop) -> None:
    decoded: list[asyncio.Future[Any]] = []

    def decode(result: pb.Result) -> Deferred:  # a bulk value, decoded in a worker thread
        decoded.append(loop.create_future())
        return Deferred(decoded[-1])

    calls = [
        Outgoing(make_call(), loop.create_future(), "test.Echo.echo", None, decode)
        for _ in range(3)
    ]
    for outgoing in calls:
        outgoing.resolve(pb.Result(id=1, value=codec.NULL))
    assert not any(outgoing.future.done() for outgoing in calls)
    decoded[0].set_result(["the", "value"])
    decoded[1].set_exception(ValueError("undecodable"))
    decoded[2].cancel()
    await turns(lambda: all(outgoing.future.done() for outgoing in calls), "all settled")
    assert calls[0].future.result() == ["the", "value"]
    with pytest.raises(ValueError, match="^undecodable$"):
        calls[1].future.result()
    assert calls[2].future.cancelled()


def test_a_one_way_call_is_done_once_sent_and_a_call_over_the_size_limit_is_refused() -> None:
    run(_a_one_way_call_is_done_once_sent_and_a_call_over_the_size_limit_is_refused)


async def _a_one_way_call_is_done_once_sent_and_a_call_over_the_size_limit_is_refused(
    loop: ClockLoop,
) -> None:
    peer = Peer(limits=Limits(max_message_size=1024, max_queued_bytes=4096))
    await peer.open()
    one_way = peer.session.start_call(make_call("notify", one_way=True), None)
    assert one_way.result() == pb.Result(id=1, value=codec.NULL)
    await turns(lambda: len(peer.calls) == 1, "the one-way call sent")
    assert peer.calls[0].one_way and not peer.session.awaits(1)
    at_limit = make_call("big")
    at_limit.json_args = "x" * (1024 - at_limit.ByteSize() - 3)
    assert at_limit.ByteSize() == 1024  # exactly the limit: sent
    peer.futures.append(peer.session.start_call(at_limit, None))
    await turns(lambda: len(peer.calls) == 2, "the call at the limit sent")
    over = make_call("bigger")
    over.json_args = "x" * (1025 - over.ByteSize() - 3)
    assert over.ByteSize() == 1025
    with pytest.raises(MessageTooLarge) as caught:
        peer.session.start_call(over, None)
    assert str(caught.value) == (
        "test.Echo.bigger: the call is 1025 bytes, over the message size limit of 1024 bytes "
        "(max_message_size)"
    )
    await peer.close()


def test_a_batch_bigger_than_a_slice_is_acted_on_whole_in_order() -> None:
    run(_a_batch_bigger_than_a_slice_is_acted_on_whole_in_order)


async def _a_batch_bigger_than_a_slice_is_acted_on_whole_in_order(loop: ClockLoop) -> None:
    peer = Peer()
    await peer.open()
    for _ in range(1234):  # two whole slices of 500 and a part, in one Batch message
        peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.inbox.put_nowait(parse_frame(wire.batch_frame(peer.connection.take_encoded())))
    await turns(lambda: len(peer.results) == 1234, "every call answered", bound=2000)
    assert [result.id for result in peer.results] == list(range(1, 1235))
    assert all(result.value == codec.NULL for result in peer.results)
    await peer.close()


# ----------------------------------------------- back-pressure: the byte-exact bounds


async def _results_released_at_once(
    loop: ClockLoop, counts: dict[str, int]
) -> tuple[Peer, dict[str, asyncio.Future[None]], int]:
    """A session running ``counts[name]`` callbacks for each name, each held until its
    name's future is set, and a peer that reads nothing; the "first" ones are released:
    seven results of one message each pile up at once, one of them is being written.
    Returns the peer, the futures, and the size of one result (one message)."""
    size = len(wire.result_frame(wire.value_result(1, BIG.SerializeToString())))
    released = {name: loop.create_future() for name in counts}

    async def held(call: pb.Call) -> pb.Value:
        await released[call.method]
        return BIG

    limits = Limits(max_message_size=1024, max_queued_bytes=5 * size, max_write_stall=5.0)
    peer = Peer(handler=held, limits=limits)
    await peer.open()
    peer.gate = loop.create_future()
    for name, count in counts.items():
        for _ in range(count):
            peer.connection.send_call(pb.Call(callback_id=5, method=name), "token")
    peer.deliver()
    await turns(lambda: len(peer.session._running) == sum(counts.values()), "all running")
    released["first"].set_result(None)
    await turns(lambda: len(peer.session._running) == sum(counts.values()) - 7, "7 answered")
    for _ in range(20):
        await asyncio.sleep(0)
    return peer, released, size


def test_results_queued_at_once_past_the_limit_hold_calls_and_end_only_past_twice() -> None:
    run(_results_queued_at_once_past_the_limit_hold_calls_and_end_only_past_twice)


async def _results_queued_at_once_past_the_limit_hold_calls_and_end_only_past_twice(
    loop: ClockLoop,
) -> None:
    peer, released, size = await _results_released_at_once(
        loop, {"first": 7, "second": 4, "third": 1}
    )
    # one result is being written; six wait, over the limit of five even after the
    # writer took that one: a call made now waits for the queue to drain
    held = peer.start("held")
    assert not peer.session.awaits(1) and not held.done()
    released["second"].set_result(None)  # ten results queued: twice the limit, not over
    for _ in range(20):
        await asyncio.sleep(0)
    assert peer.session.cause is None and peer.session.ending is None
    released["third"].set_result(None)  # eleven: over twice the limit
    await turns(lambda: peer.session.cause is not None, "the stream ended")
    why = (
        f"peer:1 did not read what was sent to it: {11 * size} bytes queued for it, over "
        f"twice the limit of {5 * size} bytes (max_queued_bytes); the stream is ended"
    )
    assert peer.session.ending == (Code.RESOURCE_EXHAUSTED, why)
    with pytest.raises(StreamBroken, match=f"^{re.escape(why)}$"):
        await asyncio.wait_for(held, 5)
    await peer.close()


def test_calls_read_while_over_the_limit_start_only_once_the_queue_drains() -> None:
    run(_calls_read_while_over_the_limit_start_only_once_the_queue_drains)


async def _calls_read_while_over_the_limit_start_only_once_the_queue_drains(
    loop: ClockLoop,
) -> None:
    peer, _released, _size = await _results_released_at_once(loop, {"first": 7, "late": 0})
    assert not peer.session._writable.is_set()  # six results wait: over the limit
    started: list[int] = []

    async def late(call: pb.Call) -> pb.Value:
        started.append(call.id)
        return codec.NULL

    peer.served.handler = late
    # the reader was already waiting for a frame: the three calls of this one are read
    # while over the limit, and wait; only results of calls already running may queue
    for _ in range(3):
        peer.connection.send_call(pb.Call(callback_id=5, method="late"), "token")
    peer.inbox.put_nowait(parse_frame(wire.batch_frame(peer.connection.take_encoded())))
    await turns(lambda: peer.inbox.empty(), "the batch read")
    for _ in range(20):
        await asyncio.sleep(0)
    assert started == [] and len(peer.results) == 0
    assert peer.gate is not None
    peer.gate.set_result(None)  # the peer reads: the queue drains, the calls start
    await turns(lambda: len(peer.results) == 10, "every call answered")
    assert started == [8, 9, 10]  # in the order they came
    assert [result.id for result in peer.results[7:]] == [8, 9, 10]
    assert peer.session.cause is None and not peer.session._parked
    await peer.close()


def test_a_queue_drained_to_exactly_the_limit_reads_sends_and_stops_the_stall_timer() -> None:
    run(_a_queue_drained_to_exactly_the_limit_reads_sends_and_stops_the_stall_timer)


async def _a_queue_drained_to_exactly_the_limit_reads_sends_and_stops_the_stall_timer(
    loop: ClockLoop,
) -> None:
    peer, _released, _size = await _results_released_at_once(loop, {"first": 7})
    assert not peer.session._writable.is_set()  # six results wait: over the limit
    loop.now += 4.0  # of max_write_stall's 5 s
    first_write, peer.gate = peer.gate, loop.create_future()
    assert first_write is not None
    first_write.set_result(None)  # the peer reads one: the writer takes the next
    await turns(lambda: len(peer.results) == 1, "one result read")
    for _ in range(20):
        await asyncio.sleep(0)
    # five wait: exactly the limit, not over it: calls are sent again, the stall is over
    sent = peer.start("sent")
    assert peer.session.awaits(1) and not sent.done()
    loop.now += 2.0  # past when the stall timer would have ended the stream
    for _ in range(20):
        await asyncio.sleep(0)
    assert peer.session.cause is None and peer.session.ending is None
    await peer.close()


def test_a_call_of_a_big_batch_that_finishes_later_is_answered() -> None:
    run(_a_call_of_a_big_batch_that_finishes_later_is_answered)


async def _a_call_of_a_big_batch_that_finishes_later_is_answered(loop: ClockLoop) -> None:
    release: asyncio.Future[None] = loop.create_future()

    async def handler(call: pb.Call) -> pb.Value:
        if call.method == "held":
            await release
        return codec.NULL

    peer = Peer(handler=handler)
    await peer.open()
    for n in range(1234):  # one Batch of two slices and a part; the last call waits
        method = "held" if n == 1233 else "changed"
        peer.connection.send_call(pb.Call(callback_id=5, method=method), "token")
    peer.inbox.put_nowait(parse_frame(wire.batch_frame(peer.connection.take_encoded())))
    await turns(lambda: len(peer.results) == 1233, "the others answered", bound=2000)
    release.set_result(None)  # after the Batch was acted on: its result is written too
    await turns(lambda: len(peer.results) == 1234, "the held call answered")
    assert peer.results[-1].id == 1234
    await peer.close()


def test_a_big_batch_whose_results_are_not_read_waits_between_slices() -> None:
    run(_a_big_batch_whose_results_are_not_read_waits_between_slices)


async def _a_big_batch_whose_results_are_not_read_waits_between_slices(loop: ClockLoop) -> None:
    null = codec.NULL.SerializeToString()
    first_slice = sum(len(wire.result_frame(wire.value_result(n, null))) for n in range(1, 501))
    # one slice's results are over the limit, not over twice it; two slices' would be
    limit = first_slice * 6 // 10
    peer = Peer(limits=Limits(max_message_size=1024, max_queued_bytes=limit, max_write_stall=5))
    await peer.open()
    peer.gate = loop.create_future()
    for _ in range(1234):
        peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.inbox.put_nowait(parse_frame(wire.batch_frame(peer.connection.take_encoded())))
    await turns(lambda: not peer.session._writable.is_set(), "over the limit")
    for _ in range(50):
        await asyncio.sleep(0)
    # the reader waits for the peer to read before it acts on the next slice
    assert peer.session.cause is None and peer.session.ending is None
    assert peer.gate is not None
    peer.gate.set_result(None)
    await turns(lambda: len(peer.results) == 1234, "every call answered", bound=2000)
    assert [result.id for result in peer.results] == list(range(1, 1235))
    assert peer.session.cause is None
    await peer.close()


# ------------------------------------------------- writing: what goes in one message


def test_a_lone_call_is_written_at_once_and_calls_made_together_go_as_one_batch() -> None:
    run(_a_lone_call_is_written_at_once_and_calls_made_together_go_as_one_batch)


async def _a_lone_call_is_written_at_once_and_calls_made_together_go_as_one_batch(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    await peer.open()
    for _ in range(5):
        await asyncio.sleep(0)
    peer.messages.clear()
    peer.start("one")
    assert [call.method for call in peer.calls] == ["one"]  # written before any loop turn
    peer.start("two")
    peer.start("three")
    await turns(lambda: len(peer.calls) == 3, "all three sent")
    for _ in range(5):
        await asyncio.sleep(0)
    assert peer.messages == [1, 2]  # the first alone; the two made with it, together
    await peer.close()


# ------------------------------------------------------- the outgoing-call table, more


def test_abandoning_a_call_whose_result_arrived_meanwhile_does_nothing() -> None:
    run(_abandoning_a_call_whose_result_arrived_meanwhile_does_nothing)


async def _abandoning_a_call_whose_result_arrived_meanwhile_does_nothing(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    await peer.open()
    future = peer.start("late", 10.0)
    await turns(lambda: len(peer.calls) == 1, "the call sent")
    future.cancel()  # its caller gives up while its result is on the way
    peer.answer(peer.calls[0].id)
    await turns(lambda: not peer.session.awaits(1), "the result read")
    peer.session.abandon(1, "cancelled by the caller")  # as the client then does
    loop.now += 20.0  # past its timeout: nothing fires either
    for _ in range(20):
        await asyncio.sleep(0)
    assert peer.cancels == [] and peer.session.cause is None
    await peer.close()


def test_a_finished_call_is_no_longer_anyones_ancestor() -> None:
    run(_a_finished_call_is_no_longer_anyones_ancestor)


async def _a_finished_call_is_no_longer_anyones_ancestor(loop: ClockLoop) -> None:
    peer = Peer()
    await peer.open()
    future = peer.start("child", None, parent=7)  # made during incoming call 7
    await turns(lambda: len(peer.calls) == 1, "the call sent")
    assert peer.session.ancestors(1) == {7}
    peer.answer(1)
    await turns(future.done, "the call answered")
    assert peer.session.ancestors(1) == set()
    await peer.close()


# ----------------------------------------------------------- the end of the stream


def test_a_write_stuck_when_the_peer_closes_is_given_half_a_second_then_dropped() -> None:
    run(_a_write_stuck_when_the_peer_closes_is_given_half_a_second_then_dropped)


async def _a_write_stuck_when_the_peer_closes_is_given_half_a_second_then_dropped(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    await peer.open()
    gate: asyncio.Future[None] = loop.create_future()
    peer.gate = gate
    stuck = peer.start("stuck")  # its write waits for the peer to read
    peer.inbox.put_nowait(EOF)  # then the peer closes the stream
    await turns(lambda: peer.session.cause is not None, "the end read")
    with pytest.raises(StreamBroken, match="^the peer peer:1 closed the stream$"):
        stuck.result()
    for _ in range(20):
        await asyncio.sleep(0)
    assert peer.reader is not None and not peer.reader.done()  # the write may yet finish
    loop.now += 0.5
    await turns(lambda: peer.reader is not None and peer.reader.done(), "the reader ended")
    assert not peer.reader.cancelled() and peer.reader.exception() is None
    await turns(gate.cancelled, "the write given up")
    await peer.close()


def test_a_call_running_when_the_stream_ends_is_cancelled_saying_so() -> None:
    run(_a_call_running_when_the_stream_ends_is_cancelled_saying_so)


async def _a_call_running_when_the_stream_ends_is_cancelled_saying_so(loop: ClockLoop) -> None:
    seen: list[tuple[str, tuple[Any, ...]]] = []

    async def handler(call: pb.Call) -> pb.Value:
        try:
            await loop.create_future()  # never done
        except asyncio.CancelledError as exc:
            seen.append((call.method, exc.args))
            raise
        return codec.NULL

    peer = Peer(handler=handler)
    await peer.open()
    peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.connection.send_call(pb.Call(callback_id=5, method="notified", one_way=True), "token")
    peer.deliver()
    await turns(lambda: peer.inbox.empty(), "both read")
    for _ in range(10):
        await asyncio.sleep(0)
    peer.session.lost(StreamBroken("gone"))
    await turns(lambda: len(seen) == 2, "both cancelled")
    assert sorted(seen) == [("changed", ("the stream ended",)), ("notified", ("the stream ended",))]
    for _ in range(5):
        await asyncio.sleep(0)
    with pytest.raises(StreamBroken) as caught:  # nothing more is sent on it
        peer.session.start_call(make_call("late"), None)
    assert type(caught.value) is StreamBroken and str(caught.value) == "cannot send call: gone"
    await peer.close()


def test_a_call_whose_awaited_future_is_cancelled_here_is_answered_as_cancelled() -> None:
    run(_a_call_whose_awaited_future_is_cancelled_here_is_answered_as_cancelled)


async def _a_call_whose_awaited_future_is_cancelled_here_is_answered_as_cancelled(
    loop: ClockLoop,
) -> None:
    awaited: asyncio.Future[pb.Value] = loop.create_future()

    async def handler(call: pb.Call) -> pb.Value:
        return await awaited

    peer = Peer(handler=handler)
    await peer.open()
    peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.deliver()
    await turns(lambda: peer.session._running.get(1) is not None, "it waits in a task")
    awaited.cancel()  # cancelled on this side, not by the peer: the peer still waits
    await turns(lambda: len(peer.results) == 1, "answered")
    error = peer.results[0].error
    assert (error.type, error.message) == ("backchannel.CallCancelled", "cancelled by the provider")
    await peer.close()


# ----------------------------------------------------- incoming calls: run eagerly


def test_a_call_sending_a_callback_on_a_stream_that_fails_under_it_gets_the_failure() -> None:
    run(_a_call_sending_a_callback_on_a_stream_that_fails_under_it_gets_the_failure)


async def _a_call_sending_a_callback_on_a_stream_that_fails_under_it_gets_the_failure(
    loop: ClockLoop,
) -> None:
    made: list[asyncio.Future[Any]] = []

    async def handler(call: pb.Call) -> pb.Value:  # its first step sends a call back
        made.append(peer.session.start_call(make_call("back"), None, parent=call.id))
        return codec.NULL

    peer = Peer(handler=handler)
    await peer.open()
    peer.fail_writes = ConnectionResetError("reset by peer")
    peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.deliver()
    await turns(lambda: peer.session.closed.is_set(), "the stream ended")
    assert len(made) == 1
    with pytest.raises(StreamBroken) as caught:
        made[0].result()
    why = "the stream to peer:1 broke: ConnectionResetError: reset by peer"
    assert str(caught.value) == why
    assert [str(cause) for cause in peer.served.ended_with] == [why]
    await peer.close()


def test_a_call_that_waited_still_knows_it_is_the_current_call() -> None:
    run(_a_call_that_waited_still_knows_it_is_the_current_call)


async def _a_call_that_waited_still_knows_it_is_the_current_call(loop: ClockLoop) -> None:
    async def handler(call: pb.Call) -> pb.Value:
        await asyncio.sleep(0)  # on in a task of its own
        current = CURRENT_CALL.get()
        assert current is not None and current[0] is peer.session
        return pb.Value(int_value=current[1])

    peer = Peer(handler=handler)
    await peer.open()
    for _ in range(2):
        peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.deliver()
    await turns(lambda: len(peer.results) == 2, "both answered")
    assert [(result.id, result.value.int_value) for result in peer.results] == [(1, 1), (2, 2)]
    await peer.close()


def test_a_call_is_started_before_the_frames_after_it_in_its_message_are_acted_on() -> None:
    run(_a_call_is_started_before_the_frames_after_it_in_its_message_are_acted_on)


async def _a_call_is_started_before_the_frames_after_it_in_its_message_are_acted_on(
    loop: ClockLoop,
) -> None:
    observed: list[bool] = []

    async def handler(call: pb.Call) -> pb.Value:
        observed.append(mine.done())
        return codec.NULL

    peer = Peer(handler=handler)
    await peer.open()
    mine = peer.start("mine")
    await turns(lambda: len(peer.calls) == 1, "the call sent")
    # the peer's next message: a Call of its own, then the Result of this side's call
    peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.connection.send_result(pb.Result(id=1, value=codec.NULL))
    peer.inbox.put_nowait(parse_frame(wire.batch_frame(peer.connection.take_encoded())))
    await turns(lambda: len(peer.results) == 1 and mine.done(), "both acted on")
    assert observed == [False]
    await peer.close()


def test_a_one_way_call_that_waited_ends_cleanly_and_is_let_go() -> None:
    run(_a_one_way_call_that_waited_ends_cleanly_and_is_let_go)


async def _a_one_way_call_that_waited_ends_cleanly_and_is_let_go(loop: ClockLoop) -> None:
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    done: list[str] = []

    async def handler(call: pb.Call) -> pb.Value:
        await asyncio.sleep(0)  # on in a task of its own
        done.append(call.method)
        return codec.NULL

    peer = Peer(handler=handler)
    await peer.open()
    peer.connection.send_call(pb.Call(callback_id=5, method="notified", one_way=True), "token")
    peer.deliver()
    await turns(lambda: done == ["notified"], "the one-way call ran")
    for _ in range(10):
        await asyncio.sleep(0)
    assert errors == []  # nothing for the loop to log ("Exception in callback ...")
    assert not peer.session._one_way_tasks  # its task is no longer held
    await peer.close()


def test_frames_are_packed_up_to_exactly_the_byte_and_frame_limits() -> None:
    null = codec.NULL.SerializeToString()
    frames = [wire.result_frame(wire.value_result(n, null)) for n in range(1, 8)]
    size = len(frames[0])
    assert all(len(frame) == size for frame in frames)

    def packed(messages: list[bytes]) -> list[list[int]]:
        ids = []
        for message in messages:
            frame = parse_frame(message)
            assert type(frame) is pb.Frame
            inner = list(frame.batch.frames) if frame.HasField("batch") else [frame]
            ids.append([each.result.id for each in inner])
        return ids

    # three frames fill a batch of 3 * size bytes exactly; a fourth starts the next
    assert packed(coalesce(frames[:6], 3 * size)) == [[1, 2, 3], [4, 5, 6]]
    assert packed(coalesce(frames, 3 * size)) == [[1, 2, 3], [4, 5, 6], [7]]
    assert packed(coalesce(frames[:1], 3 * size)) == [[1]]  # a lone frame, as it is
    many = [wire.result_frame(wire.value_result(n, null)) for n in range(1, 34)]
    assert [len(ids) for ids in packed(coalesce(many))] == [32, 1]  # MAX_BATCH_FRAMES


# ------------------------------------------------------------ what the peer sends


def test_a_call_the_peer_cancels_is_cancelled_with_its_reason_and_not_answered() -> None:
    run(_a_call_the_peer_cancels_is_cancelled_with_its_reason_and_not_answered)


async def _a_call_the_peer_cancels_is_cancelled_with_its_reason_and_not_answered(
    loop: ClockLoop,
) -> None:
    seen: list[tuple[Any, ...]] = []

    async def handler(call: pb.Call) -> pb.Value:
        if call.method == "quick":
            return codec.NULL
        try:
            await loop.create_future()  # never done
        except asyncio.CancelledError as exc:
            seen.append(exc.args)
            raise
        return codec.NULL

    peer = Peer(handler=handler)
    await peer.open()
    peer.connection.send_call(pb.Call(callback_id=5, method="quick"), "token")
    peer.connection.send_call(pb.Call(callback_id=5, method="slow"), "token")
    peer.deliver()
    await turns(lambda: len(peer.results) == 1, "the quick one answered")
    peer.gate = loop.create_future()  # what the session writes now crosses the peer's Cancel
    peer.connection.send_call(pb.Call(callback_id=5, method="quick"), "token")
    peer.deliver()
    await turns(lambda: 3 not in peer.session._running, "answered, the answer not read")
    peer.connection.send_cancel(3, "too late")  # it crosses the answer: nothing to cancel
    peer.connection.send_cancel(2, "changed my mind")
    peer.deliver()
    await turns(lambda: len(seen) == 1, "the slow one cancelled")
    assert seen == [("cancelled by the peer: changed my mind",)]
    for _ in range(10):
        await asyncio.sleep(0)
    peer.gate.set_result(None)
    await turns(lambda: len(peer.results) == 2, "the crossing answer read")
    assert [result.id for result in peer.results] == [1, 3]  # none for the cancelled one
    assert peer.session.cause is None
    await peer.close()


def test_a_peer_going_away_is_logged_once_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="backchannel")

    async def body(loop: ClockLoop) -> None:
        peer = Peer()
        await peer.open()
        peer.connection.send_go_away("restarting")
        peer.deliver()
        await turns(lambda: peer.session.connection.peer_going_away, "the GoAway read")
        assert not peer.session.usable
        await peer.close()

    run(body)
    going = [record.getMessage() for record in caplog.records if "going away" in record.msg]
    assert going == ["peer:1 is going away: restarting"]


def test_unparseable_calls_alone_or_in_a_split_batch_are_answered_with_an_error() -> None:
    run(_unparseable_calls_alone_or_in_a_split_batch_are_answered_with_an_error)


async def _unparseable_calls_alone_or_in_a_split_batch_are_answered_with_an_error(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    await peer.open()
    for _ in range(3):
        peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    first, good, bad = peer.connection.take_encoded()
    garbled = first.replace(b"changed", b"chang\xffd")  # not UTF-8: no Frame
    peer.inbox.put_nowait(parse_frame(garbled))  # alone
    split = parse_frame(wire.batch_frame([good, bad.replace(b"changed", b"chang\xffd")]))
    assert type(split) is SplitBatch
    peer.inbox.put_nowait(split)  # in a Batch that does not parse whole
    await turns(lambda: len(peer.results) == 3, "all three answered")
    outcomes = {result.id: result.WhichOneof("outcome") for result in peer.results}
    assert outcomes == {1: "error", 2: "value", 3: "error"}
    unread = parse_frame(garbled)
    assert type(unread) is Unparseable
    assert peer.results[0].error.message == (
        f"call 1 could not be read: a message of {len(garbled)} bytes is not a "
        f"backchannel.v1.Frame ({unread.reason})"
    )
    # a one-way call that cannot be read is not answered; a Result that cannot be read
    # fails the call it answers
    peer.connection.send_call(pb.Call(callback_id=5, method="changed", one_way=True), "token")
    (one_way,) = peer.connection.take_encoded()
    peer.inbox.put_nowait(parse_frame(one_way.replace(b"changed", b"chang\xffd")))
    mine = peer.start("mine")
    await turns(lambda: len(peer.calls) == 1, "the call sent")
    peer.connection.send_result(pb.Result(id=1, error=pb.Error(message="oops")))
    (answer,) = peer.connection.take_encoded()
    peer.inbox.put_nowait(parse_frame(answer.replace(b"oops", b"oo\xffs")))
    await turns(mine.done, "the call failed")
    assert mine.result().error.type == "backchannel.RemoteProtocolError"
    assert len(peer.results) == 3
    assert peer.session.cause is None
    await peer.close()


# ------------------------------------------- the writer: long queues, its own context


def test_more_frames_than_one_piece_are_written_in_order_and_counted_right() -> None:
    run(_more_frames_than_one_piece_are_written_in_order_and_counted_right)


async def _more_frames_than_one_piece_are_written_in_order_and_counted_right(
    loop: ClockLoop,
) -> None:
    # 2,100 calls queue behind a write the peer holds: more than the 2,048 frames the
    # writer packs at a time. The limit is far above what waits, but under what would
    # wait if the frames packed were still counted as queued too
    frame_size = pb.Frame(call=pb.Call(id=1000, service="test.Echo", method="m")).ByteSize()
    limits = Limits(
        max_calls_in_flight=5000, max_message_size=1024, max_queued_bytes=3000 * frame_size
    )
    peer = Peer(limits=limits)
    await peer.open()
    for _ in range(5):
        await asyncio.sleep(0)
    peer.messages.clear()
    first_write = peer.gate = loop.create_future()
    peer.start("first")  # written at once: the peer holds it
    for _ in range(2100):
        peer.start("m")
    second_write = peer.gate = loop.create_future()
    first_write.set_result(None)
    await turns(lambda: len(peer.calls) == 1, "the first call read")
    for _ in range(5):
        await asyncio.sleep(0)
    # the writer packed 2,048 of them and writes the first 32; what is left is under the
    # limit: calls made now are sent, and the stream goes on
    after, held = peer.start("after"), peer.start("held")
    assert peer.session.awaits(2102) and peer.session.awaits(2103)
    assert peer.session.cause is None and peer.session._writable.is_set()
    peer.gate = None
    second_write.set_result(None)
    await turns(lambda: len(peer.calls) == 2103, "every call written", bound=500)
    assert [call.method for call in peer.calls] == ["first", *["m"] * 2100, "after", "held"]
    assert [call.id for call in peer.calls] == list(range(1, 2104))
    # a burst's first Batch holds 32 frames, the others as many as 1024 bytes take (up to
    # MAX_LATER_BATCH_FRAMES)
    assert peer.messages[:2] == [1, 32] and sum(peer.messages) == 2103
    assert 32 < max(peer.messages) <= 256
    assert not after.done() and not held.done()
    await peer.close()


class RecordingPeer(Peer):
    """A peer whose writes record the call the code they run in belongs to (CURRENT_CALL),
    after their first wait: a future (the peer's gate) or, when ``yield_first``, a bare
    yield to the loop, as gRPC's write may do either."""

    yield_first = False

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[object] = []

    async def write(self, message: bytes) -> None:
        if self.yield_first:
            await asyncio.sleep(0)
        await super().write(message)
        self.seen.append(CURRENT_CALL.get(None))


def test_a_write_runs_in_no_callers_context_after_a_future_or_a_bare_yield() -> None:
    run(_a_write_runs_in_no_callers_context_after_a_future_or_a_bare_yield)


async def _a_write_runs_in_no_callers_context_after_a_future_or_a_bare_yield(
    loop: ClockLoop,
) -> None:
    peer = RecordingPeer()
    await peer.open()
    for _ in range(5):
        await asyncio.sleep(0)
    peer.seen.clear()
    CURRENT_CALL.set((peer.session, 7))  # as during incoming call 7: its calls are children
    gate = peer.gate = loop.create_future()
    peer.start("first")  # its write starts here and waits for the peer
    peer.gate = None
    gate.set_result(None)
    await turns(lambda: len(peer.seen) == 1, "the first call written")
    peer.answer(peer.calls[0].id)
    await turns(lambda: peer.futures[0].done(), "the first call answered")
    peer.yield_first = True
    peer.start("second")  # its write yields to the loop first
    await turns(lambda: len(peer.seen) == 2, "the second call written")
    # the writes belong to the stream, not to the call that was running when they began
    assert peer.seen == [None, None]
    assert [call.method for call in peer.calls] == ["first", "second"]
    assert all(call.parent_id == 0 for call in peer.calls)
    await peer.close()


def test_a_write_that_fails_after_waiting_fails_every_pending_call_with_its_error() -> None:
    run(_a_write_that_fails_after_waiting_fails_every_pending_call_with_its_error)


async def _a_write_that_fails_after_waiting_fails_every_pending_call_with_its_error(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    await peer.open()
    gate = peer.gate = loop.create_future()
    written = peer.start("written")  # its write waits for the peer
    queued = peer.start("queued")  # queued behind it
    gate.set_exception(ConnectionResetError("reset by peer"))
    expected = "the stream to peer:1 broke: ConnectionResetError: reset by peer"
    for future in (written, queued):
        await turns(future.done, "the call failed")
        with pytest.raises(StreamBroken) as caught:
            future.result()
        assert str(caught.value) == expected
    assert str(peer.session.cause) == expected and peer.calls == []
    await peer.close()


# ------------------------------------------------------------ the reader's end


def test_a_reader_cancelled_from_outside_fails_pending_calls_and_stops_the_write() -> None:
    run(_a_reader_cancelled_from_outside_fails_pending_calls_and_stops_the_write)


async def _a_reader_cancelled_from_outside_fails_pending_calls_and_stops_the_write(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    await peer.open()
    gate = peer.gate = loop.create_future()
    pending = peer.start("pending")  # its write waits for the peer
    assert peer.reader is not None
    peer.reader.cancel()  # the RPC is being torn down (the client closes, say)
    with pytest.raises(asyncio.CancelledError):
        await peer.reader
    with pytest.raises(StreamBroken) as caught:
        await asyncio.wait_for(pending, 5)
    assert str(caught.value) == "the stream to peer:1 was closed"
    assert str(peer.session.cause) == "the stream to peer:1 was closed"
    assert gate.cancelled()  # the write under way was cancelled with it
    await peer.close()


def test_a_read_that_fails_ends_the_stream_with_its_error_naming_the_peer() -> None:
    run(_a_read_that_fails_ends_the_stream_with_its_error_naming_the_peer)


async def _a_read_that_fails_ends_the_stream_with_its_error_naming_the_peer(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    await peer.open()
    pending = peer.start("pending")
    reset = ConnectionResetError("reset by peer")
    peer.inbox.put_nowait(reset)
    expected = "the stream to peer:1 broke: ConnectionResetError: reset by peer"
    with pytest.raises(StreamBroken) as caught:
        await asyncio.wait_for(pending, 5)
    assert str(caught.value) == expected
    assert peer.reader is not None
    await asyncio.wait_for(peer.reader, 5)  # the reader returns: the stream is over
    cause = peer.session.cause
    assert cause is not None and str(cause) == expected and cause.__cause__ is reset
    assert peer.session.closed.is_set()
    await peer.close()


# ------------------------------------------------------- serving: the call tree, the end


def test_a_finished_incoming_call_no_longer_links_its_calls_to_the_chain_above_it() -> None:
    run(_a_finished_incoming_call_no_longer_links_its_calls_to_the_chain_above_it)


async def _a_finished_incoming_call_no_longer_links_its_calls_to_the_chain_above_it(
    loop: ClockLoop,
) -> None:
    release: asyncio.Future[None] = loop.create_future()

    async def calling(call: pb.Call) -> pb.Value:
        peer.start("during-x", None, parent=call.id)
        await release
        return codec.NULL

    peer = Peer(handler=calling)
    await peer.open()
    peer.start("root", None, parent=7)  # made during incoming call 7
    await turns(lambda: len(peer.calls) == 1, "the root call sent")
    # during root, the provider calls back x; during x the consumer calls again
    x = peer.connection.send_call(pb.Call(callback_id=5, method="x", parent_id=1), "t")
    peer.deliver()
    await turns(lambda: len(peer.calls) == 2, "the call made during x sent")
    assert peer.session.ancestors(2) == {x, 7}
    release.set_result(None)
    await turns(lambda: len(peer.results) == 1, "x answered")
    assert peer.session.ancestors(2) == {x}  # x is over: root's chain is not followed
    await peer.close()


def test_a_call_the_peer_cancelled_ends_as_its_code_ends_and_is_not_answered() -> None:
    run(_a_call_the_peer_cancelled_ends_as_its_code_ends_and_is_not_answered)


async def _a_call_the_peer_cancelled_ends_as_its_code_ends_and_is_not_answered(
    loop: ClockLoop,
) -> None:
    tasks: dict[str, asyncio.Task[Any] | None] = {}

    async def handler(call: pb.Call) -> pb.Value:
        await asyncio.sleep(0)  # from here on in a task of its own
        tasks[call.method] = asyncio.current_task()
        try:
            await loop.create_future()  # never done
        except asyncio.CancelledError:
            if call.method == "stubborn":
                return codec.NULL  # it swallows the cancellation and returns
            raise
        return codec.NULL

    peer = Peer(handler=handler)
    await peer.open()
    obedient = peer.connection.send_call(pb.Call(callback_id=5, method="obedient"), "t")
    stubborn = peer.connection.send_call(pb.Call(callback_id=5, method="stubborn"), "t")
    peer.deliver()
    await turns(lambda: len(tasks) == 2, "both running in tasks")
    peer.connection.send_cancel(obedient, "no")
    peer.connection.send_cancel(stubborn, "no")
    peer.deliver()
    await turns(lambda: all(task is not None and task.done() for task in tasks.values()), "ended")
    first, second = tasks["obedient"], tasks["stubborn"]
    assert first is not None and second is not None
    assert first.cancelled()  # no error of the session's own on the way out
    assert not second.cancelled() and second.exception() is None
    for _ in range(10):
        await asyncio.sleep(0)
    assert peer.results == [] and peer.session.cause is None
    await peer.close()


def test_a_result_of_exactly_the_peers_message_size_is_sent_one_byte_more_is_not() -> None:
    run(_a_result_of_exactly_the_peers_message_size_is_sent_one_byte_more_is_not)


async def _a_result_of_exactly_the_peers_message_size_is_sent_one_byte_more_is_not(
    loop: ClockLoop,
) -> None:
    def value(length: int) -> pb.Value:
        return pb.Value(string_value="x" * length)

    def size(call_id: int, length: int) -> int:
        return len(wire.value_result(call_id, value(length).SerializeToString()))

    exact = next(n for n in range(900, 1024) if size(1, n) == 1024)
    assert size(2, exact + 1) == 1025

    async def sized(call: pb.Call) -> pb.Value:
        return value(exact if call.method == "exact" else exact + 1)

    peer = Peer(handler=sized, limits=Limits(max_message_size=1024))
    await peer.open()
    peer.connection.send_call(pb.Call(callback_id=5, method="exact"), "t")
    peer.connection.send_call(pb.Call(callback_id=5, method="over"), "t")
    peer.deliver()
    await turns(lambda: len(peer.results) == 2, "both answered")
    assert peer.results[0].value == value(exact)
    assert peer.results[1].error.type == "backchannel.MessageTooLarge"
    assert peer.results[1].error.message == (
        "the result of callback 5.over is 1025 bytes, over the message size limit of "
        "1024 bytes (max_message_size)"
    )
    await peer.close()


def test_a_big_batch_that_was_split_is_acted_on_in_slices_too() -> None:
    run(_a_big_batch_that_was_split_is_acted_on_in_slices_too)


async def _a_big_batch_that_was_split_is_acted_on_in_slices_too(loop: ClockLoop) -> None:
    null = codec.NULL.SerializeToString()
    first_slice = sum(len(wire.result_frame(wire.value_result(n, null))) for n in range(1, 501))
    limit = first_slice * 6 // 10  # one slice's results are over it, two slices' over twice
    peer = Peer(limits=Limits(max_message_size=1024, max_queued_bytes=limit, max_write_stall=5))
    await peer.open()
    peer.gate = loop.create_future()
    for _ in range(1234):
        peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    frames = peer.connection.take_encoded()
    frames[-1] = frames[-1].replace(b"changed", b"chang\xffd")  # not UTF-8: no Frame
    split = parse_frame(wire.batch_frame(frames))
    assert type(split) is SplitBatch
    peer.inbox.put_nowait(split)
    await turns(lambda: not peer.session._writable.is_set(), "over the limit")
    for _ in range(50):
        await asyncio.sleep(0)
    # the reader waits for the peer to read before it acts on the next slice
    assert peer.session.cause is None and peer.session.ending is None
    assert peer.gate is not None
    peer.gate.set_result(None)
    await turns(lambda: len(peer.results) == 1234, "every call answered", bound=2000)
    # the unreadable one is answered by the protocol as its slice is taken, before the rest
    ids = [result.id for result in peer.results]
    assert ids == [*range(1, 1001), 1234, *range(1001, 1234)]
    assert peer.results[1000].error.type == "backchannel.RemoteProtocolError"
    assert peer.session.cause is None
    await peer.close()


def test_a_protocol_mistake_of_the_peer_is_logged_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="backchannel"):
        run(_a_protocol_mistake_of_the_peer_is_logged_naming_it)
    assert [record.getMessage() for record in caplog.records] == [
        "protocol mistake by peer:1: result for unknown call id 99 (never sent, answered or "
        "cancelled)"
    ]


async def _a_protocol_mistake_of_the_peer_is_logged_naming_it(loop: ClockLoop) -> None:
    peer = Peer()
    await peer.open()
    peer.inbox.put_nowait(pb.Frame(result=pb.Result(id=99, value=codec.NULL)))
    done = peer.start("after")  # the stream goes on
    await turns(lambda: len(peer.calls) == 1, "the call sent")
    peer.answer(peer.calls[0].id)
    await asyncio.wait_for(done, 5)
    await peer.close()


def test_the_streams_serializer_passes_bytes_through_and_serializes_frames() -> None:
    frame = pb.Frame(result=pb.Result(id=3, value=codec.NULL))
    data = frame.SerializeToString()
    assert serialize(data) is data
    assert serialize(frame) == data


def test_results_queued_up_to_exactly_the_limit_do_not_hold_calls() -> None:
    run(_results_queued_up_to_exactly_the_limit_do_not_hold_calls)


async def _results_queued_up_to_exactly_the_limit_do_not_hold_calls(
    loop: ClockLoop,
) -> None:
    size = len(wire.result_frame(wire.value_result(1, BIG.SerializeToString())))
    released = {name: loop.create_future() for name in ("first", "second")}

    async def held(call: pb.Call) -> pb.Value:
        await released[call.method]
        return BIG

    limits = Limits(max_message_size=1024, max_queued_bytes=6 * size, max_write_stall=5.0)
    peer = Peer(handler=held, limits=limits)
    await peer.open()
    peer.gate = loop.create_future()
    peer.connection.send_call(pb.Call(callback_id=5, method="first"), "token")
    for _ in range(6):
        peer.connection.send_call(pb.Call(callback_id=5, method="second"), "token")
    peer.deliver()
    await turns(lambda: len(peer.session._running) == 7, "all running")
    released["first"].set_result(None)  # its result is being written: the peer holds it
    await turns(lambda: len(peer.session._running) == 6, "the first answered")
    for _ in range(5):
        await asyncio.sleep(0)
    released["second"].set_result(None)  # six results queue behind it: exactly the limit
    await turns(lambda: not peer.session._running, "all answered")
    for _ in range(5):
        await asyncio.sleep(0)
    sent = peer.start("sent")  # not over the limit: sent, not held
    assert peer.session.awaits(1) and not sent.done()
    assert peer.gate is not None
    peer.gate.set_result(None)
    await turns(lambda: len(peer.results) == 7 and len(peer.calls) == 1, "all written")
    assert peer.session.cause is None and peer.session.ending is None
    await peer.close()


def test_what_the_turn_a_write_ends_in_produces_goes_out_with_what_waited_for_it() -> None:
    run(_what_the_turn_a_write_ends_in_produces_goes_out_with_what_waited_for_it)


async def _what_the_turn_a_write_ends_in_produces_goes_out_with_what_waited_for_it(
    loop: ClockLoop,
) -> None:
    release: asyncio.Future[None] = loop.create_future()

    async def held(call: pb.Call) -> pb.Value:
        await release
        return codec.NULL

    peer = Peer(handler=held)
    await peer.open()
    peer.connection.send_call(pb.Call(callback_id=5, method="changed"), "token")
    peer.deliver()
    await turns(lambda: len(peer.session._running) == 1, "the callback running")
    for _ in range(5):
        await asyncio.sleep(0)
    peer.messages.clear()
    gate = peer.gate = loop.create_future()
    peer.start("first")  # written at once: the peer holds it
    peer.gate = None
    gate.set_result(None)  # the write ends at the next turn...
    peer.start("second")  # ...a call made meanwhile waits for it...
    release.set_result(None)  # ...and the callback's result comes in that turn
    await turns(lambda: len(peer.calls) == 2 and len(peer.results) == 1, "all written")
    for _ in range(5):
        await asyncio.sleep(0)
    assert peer.messages == [1, 2]  # the call that waited and the result, together
    await peer.close()


async def _two_held_callbacks(loop: ClockLoop) -> tuple[Peer, dict[str, asyncio.Future[None]]]:
    """An open session running two incoming callbacks, "a" and "b", each held until its
    future in the dict is set; everything written so far is settled and forgotten."""
    released: dict[str, asyncio.Future[None]] = {name: loop.create_future() for name in "ab"}

    async def held(call: pb.Call) -> pb.Value:
        await released[call.method]
        return codec.NULL

    peer = Peer(handler=held)
    await peer.open()
    for name in ("a", "b"):
        peer.connection.send_call(pb.Call(callback_id=5, method=name), "token")
    peer.deliver()
    await turns(lambda: len(peer.session._running) == 2, "both callbacks running")
    for _ in range(5):
        await asyncio.sleep(0)
    peer.messages.clear()
    return peer, released


def test_results_made_while_the_next_write_is_due_go_out_together() -> None:
    run(_results_made_while_the_next_write_is_due_go_out_together)


async def _results_made_while_the_next_write_is_due_go_out_together(loop: ClockLoop) -> None:
    peer, released = await _two_held_callbacks(loop)
    gate = peer.gate = loop.create_future()
    peer.start("first")  # written at once: the peer holds it
    peer.start("queued")  # waits for it

    def meanwhile(_: object) -> None:
        # in the turn the write ends in, after the writer scheduled the next one: a call
        # is made, and both callbacks are released (their results come a turn later)
        released["a"].set_result(None)
        peer.start("mid")
        released["b"].set_result(None)

    gate.add_done_callback(meanwhile)
    peer.gate = None
    gate.set_result(None)
    await turns(lambda: len(peer.calls) == 3 and len(peer.results) == 2, "all written")
    for _ in range(5):
        await asyncio.sleep(0)
    # the two calls that waited go together; so do the two results made in one turn
    assert peer.messages == [1, 2, 2]
    await peer.close()


def test_a_call_made_before_the_handshake_is_refused_as_a_local_protocol_error() -> None:
    run(_a_call_made_before_the_handshake_is_refused_as_a_local_protocol_error)


async def _a_call_made_before_the_handshake_is_refused_as_a_local_protocol_error(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    peer.session.connection.start()  # the Hello is queued; no answer yet
    with pytest.raises(LocalProtocolError) as caught:
        peer.session.start_call(make_call("early"), 5.0)
    assert str(caught.value) == "cannot send a call in state 'awaiting handshake'"
    assert not peer.session.awaits(1)
    await peer.close()


def test_a_session_ended_before_its_reader_started_fails_its_handshake_with_why() -> None:
    run(_a_session_ended_before_its_reader_started_fails_its_handshake_with_why)


async def _a_session_ended_before_its_reader_started_fails_its_handshake_with_why(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    peer.session.connection.start()
    peer.session.flush()
    peer.session.end(grpc.StatusCode.RESOURCE_EXHAUSTED, "no hello in time")
    assert peer.session.ending == (grpc.StatusCode.RESOURCE_EXHAUSTED, "no hello in time")
    with pytest.raises(StreamBroken, match="^no hello in time$"):
        await asyncio.wait_for(peer.session.handshake, 5)
    assert peer.session.closed.is_set()
    await peer.close()


def test_frames_flushed_in_one_turn_go_together_and_so_do_the_results_of_the_next() -> None:
    run(_frames_flushed_in_one_turn_go_together_and_so_do_the_results_of_the_next)


async def _frames_flushed_in_one_turn_go_together_and_so_do_the_results_of_the_next(
    loop: ClockLoop,
) -> None:
    peer, released = await _two_held_callbacks(loop)
    peer.start("p")  # a lone call: written at once
    peer.start("q")  # written at the end of this turn...
    released["a"].set_result(None)  # (its result comes in the next turn)
    peer.start("r")  # ...with this one
    released["b"].set_result(None)  # (and this result, in the next turn too)
    await turns(lambda: len(peer.calls) == 3 and len(peer.results) == 2, "all written")
    for _ in range(5):
        await asyncio.sleep(0)
    assert peer.messages == [1, 2, 2]
    await peer.close()


def test_a_stream_lost_while_the_reader_waits_on_back_pressure_drops_the_write() -> None:
    run(_a_stream_lost_while_the_reader_waits_on_back_pressure_drops_the_write)


async def _a_stream_lost_while_the_reader_waits_on_back_pressure_drops_the_write(
    loop: ClockLoop,
) -> None:
    peer = await _unread_peer(loop, 10)
    gate = peer.gate
    assert gate is not None and peer.reader is not None
    for _ in range(20):
        await asyncio.sleep(0)
    peer.session.lost(StreamBroken("the client is closing"))  # the reader waits to read
    for _ in range(20):
        await asyncio.sleep(0)
    assert not gate.done()  # what is queued is given half a second to be written
    loop.now += 0.5
    await turns(lambda: peer.reader is not None and peer.reader.done(), "the reader ended")
    assert gate.cancelled()  # then the write under way is dropped
    await peer.close()
