"""The Multicast frame: one call to many callback instances of a consumer's stream.

First the sans-I/O protocol, frame by frame: the negotiation (a consumer says it takes
them in its Hello; one that does not, an older one, gets single Calls), the expansion into
one Call per target, and every hostile case, each answered as the Calls it stands for would
be. Then the session (a huge target list is acted on in slices), and last, end to end over
real gRPC on 127.0.0.1: ``backchannel.gather`` to many listeners on several consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import SERVICES, Link, feed, kinds
from test_session import ClockLoop, Peer, run, turns

import backchannel
from backchannel import Argument
from backchannel.errors import CallbackGone, LocalProtocolError
from backchannel.transport.receiver import RECEIVE_SLICE, many_frames, parse_frame
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec, slices
from backchannel.wire.protocol import (
    CallReceived,
    Connection,
    PeerMistake,
    ResultReceived,
    Role,
)
from backchannel.wire.slices import Targets

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

# ------------------------------------------------------------------ helpers


def ok(call_id: int) -> pb.Result:
    return pb.Result(id=call_id, value=pb.Value(string_value="done"))


def changed(text: str = "v2", one_way: bool = False, parent: int = 0) -> pb.Call:
    """A callback call of ``changed(text)``, without an id or callback id."""
    arg = pb.Value(string_value=text)
    return pb.Call(method="changed", args=[arg], one_way=one_way, parent_id=parent)


def multicast(call: pb.Call, *targets: tuple[int, int]) -> pb.Frame:
    """A Multicast frame made by hand: (call id, callback id) per target."""
    made = pb.Multicast(call=call)
    for call_id, callback_id in targets:
        made.targets.add(id=call_id, callback_id=callback_id)
    return pb.Frame(multicast=made)


def open_consumer(**kwargs: Any) -> Connection[str]:
    """An open consumer connection (its Hello and the Welcome exchanged)."""
    consumer: Connection[str] = Connection(Role.CONSUMER, "shop", **kwargs)
    consumer.start()
    consumer.take_outbox()
    feed(consumer, pb.Frame(welcome=pb.Welcome(protocol_version=1, services=SERVICES)))
    return consumer


def calls(events: list[Any]) -> list[pb.Call]:
    return [event.call for event in events if type(event) is CallReceived]


def mistakes(events: list[Any]) -> list[str]:
    return [event.message for event in events if type(event) is PeerMistake]


# ------------------------------------------------------------ negotiation


def test_a_consumer_says_in_its_hello_that_it_takes_multicasts_and_the_provider_learns_it() -> None:
    link = Link()
    link.consumer.start()
    [hello] = link.consumer.take_outbox()
    assert hello.hello.accepts_multicast
    assert not link.provider.peer_accepts_multicast
    feed(link.provider, hello)
    assert link.provider.peer_accepts_multicast


def test_an_old_consumer_hello_without_the_field_gets_no_multicast_from_the_provider() -> None:
    provider: Connection[str] = Connection(Role.PROVIDER, "warehouse", SERVICES)
    feed(provider, pb.Frame(hello=pb.Hello(protocol_version=1, application="old")))
    provider.take_outbox()
    assert not provider.peer_accepts_multicast
    with pytest.raises(LocalProtocolError, match="did not say it accepts multicast frames"):
        provider.send_multicast(changed(), [3, 4], ["a", "b"])
    assert provider.take_outbox() == [] and provider.pending_outgoing == 0
    # single Calls still go, as they always did
    provider.send_call(pb.Call(callback_id=3, method="changed"), "a")
    assert kinds(provider.take_outbox()) == ["call"]


def test_a_consumer_made_without_multicast_says_so_and_refuses_one() -> None:
    link = Link()
    link.consumer = Connection(Role.CONSUMER, "shop", accepts_multicast=False)
    link.open()
    assert not link.provider.peer_accepts_multicast
    events = feed(link.consumer, multicast(changed(), (7, 3), (8, 4), (0, 5)))
    assert calls(events) == []
    assert mistakes(events) == [
        "multicast frames were not negotiated: this consumer's hello did not set "
        "accepts_multicast; send it one call per callback"
    ]
    frames = link.consumer.take_outbox()
    assert kinds(frames) == ["fault", "result", "result"]  # id 0 has no Result to get
    assert [frame.result.id for frame in frames[1:]] == [7, 8]
    assert {frame.result.error.code for frame in frames[1:]} == {pb.FAILED_PRECONDITION}
    assert link.consumer.pending_incoming == 0


def test_a_provider_never_takes_a_multicast_it_is_faulted_as_an_unexpected_frame() -> None:
    link = Link()
    link.open()
    events = feed(link.provider, multicast(changed(), (7, 3)))
    assert mistakes(events) == ["unexpected multicast frame after the handshake (provider side)"]
    assert kinds(link.provider.take_outbox()) == ["fault"]
    assert link.provider.pending_incoming == 0


def test_a_multicast_before_the_welcome_is_faulted() -> None:
    consumer: Connection[str] = Connection(Role.CONSUMER, "shop")
    consumer.start()
    consumer.take_outbox()
    events = feed(consumer, multicast(changed(), (7, 3)))
    assert mistakes(events) == ["unexpected multicast frame before the handshake (consumer side)"]
    assert consumer.pending_incoming == 0


# ---------------------------------------------------------------- expansion


def test_a_multicast_is_one_call_per_target_in_order_and_each_is_answered_alone() -> None:
    link = Link()
    link.open()
    call = changed("v2", parent=9)
    call.trace_context["traceparent"] = "00-shared-01"
    first = link.provider.send_multicast(call, [3, 4, 3], ["a", "b", "c"])
    [frame] = link.provider.take_outbox()
    assert kinds([frame]) == ["multicast"]
    assert [(t.id, t.callback_id) for t in frame.multicast.targets] == [
        (first, 3),
        (first + 1, 4),
        (first + 2, 3),
    ]
    assert link.provider.pending_outgoing == 3
    received = calls(feed(link.consumer, frame))
    assert [(c.id, c.callback_id) for c in received] == [(first, 3), (first + 1, 4), (first + 2, 3)]
    for each in received:  # each exactly the Call that would have come alone
        expected = changed("v2", parent=9)
        expected.id, expected.callback_id = each.id, each.callback_id
        expected.trace_context["traceparent"] = "00-shared-01"
        assert each == expected
    assert link.consumer.pending_incoming == 3
    # answered out of order, one by one: each Result goes back to its own token
    for call_id, token in [(first + 1, "b"), (first + 2, "c"), (first, "a")]:
        link.consumer.send_result(ok(call_id))
        assert link.to_provider() == [ResultReceived(ok(call_id), token)]
    assert link.provider.pending_outgoing == 0 and link.consumer.pending_incoming == 0


def test_ids_follow_on_from_single_calls_and_single_calls_after_it_follow_on_too() -> None:
    link = Link()
    link.open()
    before = link.provider.send_call(pb.Call(callback_id=3, method="changed"), "x")
    first = link.provider.send_multicast(changed(), [3, 4], ["a", "b"])
    after = link.provider.send_call(pb.Call(callback_id=3, method="changed"), "y")
    assert (before, first, after) == (1, 2, 4)


def test_single_calls_and_a_multicast_to_one_listener_arrive_in_the_order_sent() -> None:
    link = Link()
    link.open()
    link.provider.send_call(pb.Call(callback_id=3, method="a"), "a")
    link.provider.send_multicast(pb.Call(method="b"), [4, 3], ["b4", "b3"])
    link.provider.send_call(pb.Call(callback_id=3, method="c"), "c")
    events = link.to_consumer()
    assert [(c.callback_id, c.method) for c in calls(events)] == [
        (3, "a"),
        (4, "b"),
        (3, "b"),
        (3, "c"),
    ]
    assert [c.id for c in calls(events)] == [1, 2, 3, 4]


def test_a_targets_own_trace_context_replaces_the_calls() -> None:
    link = Link()
    link.open()
    call = changed()
    call.trace_context["traceparent"] = "shared"
    traces = [{"traceparent": "mine"}, {}]
    link.provider.send_multicast(call, [3, 4], ["a", "b"], traces)
    first, second = calls(link.to_consumer())
    assert dict(first.trace_context) == {"traceparent": "mine"}
    assert dict(second.trace_context) == {"traceparent": "shared"}  # none of its own


def test_a_one_way_multicast_holds_slots_until_each_call_is_done_and_wants_no_result() -> None:
    link = Link()
    link.open()
    first = link.provider.send_multicast(changed(one_way=True), [3, 4], ["a", "b"])
    assert link.provider.pending_outgoing == 0  # no Result awaited
    assert len(calls(link.to_consumer())) == 2
    assert link.consumer.running_one_way == 2
    link.consumer.one_way_done(first)
    link.consumer.one_way_done(first + 1)
    assert link.consumer.running_one_way == 0


def test_a_multicast_of_no_targets_is_a_local_error_and_from_a_peer_a_fault() -> None:
    link = Link()
    link.open()
    with pytest.raises(LocalProtocolError, match="at least one target"):
        link.provider.send_multicast(changed(), [], [])
    events = feed(link.consumer, multicast(changed()))
    assert mistakes(events) == [
        "a multicast with no targets: give it at least one (call id, callback id)"
    ]
    assert kinds(link.consumer.take_outbox()) == ["fault"]


# ------------------------------------------- hostile targets: as the single Calls would be


def test_duplicate_ids_in_one_multicast_are_faulted_and_the_first_still_runs() -> None:
    consumer = open_consumer()
    events = feed(consumer, multicast(changed(), (7, 3), (7, 4), (8, 5)))
    assert [(c.id, c.callback_id) for c in calls(events)] == [(7, 3), (8, 5)]
    assert mistakes(events) == ["duplicate call id 7: a call with this id is still running"]
    [fault] = consumer.take_outbox()
    assert fault.fault.call_id == 7
    consumer.send_result(ok(7))  # the first one is still answerable
    assert consumer.pending_incoming == 1


def test_a_target_with_the_id_of_a_running_call_is_faulted_as_that_call_would_be() -> None:
    consumer = open_consumer()
    feed(consumer, pb.Frame(call=pb.Call(id=7, callback_id=3, method="changed")))
    events = feed(consumer, multicast(changed(), (7, 4), (8, 4)))
    assert [c.id for c in calls(events)] == [8]
    assert mistakes(events) == ["duplicate call id 7: a call with this id is still running"]


def test_a_target_with_id_zero_is_faulted_and_the_others_run() -> None:
    consumer = open_consumer()
    events = feed(consumer, multicast(changed(), (0, 3), (8, 4)))
    assert [c.id for c in calls(events)] == [8]
    assert mistakes(events) == ["call id 0 is not allowed: give every call a non-zero id"]


def test_targets_past_the_in_flight_limit_are_each_refused_with_resource_exhausted() -> None:
    consumer = open_consumer(max_calls_in_flight=2)
    feed(consumer, pb.Frame(call=pb.Call(id=1, callback_id=3, method="changed")))
    events = feed(consumer, multicast(changed(), (2, 3), (3, 4), (4, 5)))
    assert [c.id for c in calls(events)] == [2]
    frames = consumer.take_outbox()
    assert kinds(frames) == ["result", "result"]
    assert [(f.result.id, f.result.error.code) for f in frames] == [
        (3, pb.RESOURCE_EXHAUSTED),
        (4, pb.RESOURCE_EXHAUSTED),
    ]
    assert "this side runs at most 2 at once" in frames[0].result.error.message
    # a slot frees: the next target is taken again
    consumer.send_result(ok(1))
    assert [c.id for c in calls(feed(consumer, multicast(changed(), (5, 3))))] == [5]


def test_one_way_targets_past_the_in_flight_limit_wait_for_a_slot_in_order() -> None:
    consumer = open_consumer(max_calls_in_flight=1)
    events = feed(consumer, multicast(changed(one_way=True), (2, 3), (3, 4), (4, 3)))
    assert [c.id for c in calls(events)] == [2]
    assert consumer.take_outbox() == []  # the others wait: not refused
    consumer.one_way_done(2)
    waited = consumer.next_one_way()
    assert waited is not None and (waited.id, waited.callback_id) == (3, 4)
    assert waited.method == "changed" and waited.one_way


def test_after_go_away_every_target_gets_a_shutting_down_result() -> None:
    consumer = open_consumer()
    consumer.send_go_away("leaving")
    consumer.take_outbox()
    events = feed(consumer, multicast(changed(), (2, 3), (3, 4)))
    assert calls(events) == []
    frames = consumer.take_outbox()
    assert [(f.result.id, f.result.error.code) for f in frames] == [
        (2, pb.UNAVAILABLE),
        (3, pb.UNAVAILABLE),
    ]


def test_a_target_of_an_unknown_callback_id_is_a_call_like_any_the_dispatcher_refuses() -> None:
    # the consumer's dispatcher answers it NOT_FOUND, as a lone Call (see the end-to-end test)
    consumer = open_consumer()
    [call] = calls(feed(consumer, multicast(changed(), (2, 999))))
    assert call.callback_id == 999


def test_a_cancel_and_a_result_work_per_target_id() -> None:
    link = Link()
    link.open()
    first = link.provider.send_multicast(changed(), [3, 4], ["a", "b"])
    link.to_consumer()
    link.provider.send_cancel(first, "deadline")
    events = link.to_consumer()
    assert [type(e).__name__ for e in events] == ["CancelReceived"]
    assert link.consumer.pending_incoming == 1
    link.consumer.send_result(ok(first + 1))
    assert link.to_provider() == [ResultReceived(ok(first + 1), "b")]


def test_connection_lost_hands_back_every_targets_token() -> None:
    link = Link()
    link.open()
    link.provider.send_multicast(changed(), [3, 4, 5], ["a", "b", "c"])
    tokens, _ = link.provider.connection_lost(ConnectionError("gone"))
    assert tokens == ["a", "b", "c"]


# --------------------------------------------------- a huge target list: bounded slices


def test_a_huge_multicast_is_cut_into_slices_of_at_most_the_slice_size() -> None:
    frame = multicast(changed(), *[(n, 3) for n in range(1, 1235)])
    pieces = list(slices.slices([frame], 500))
    assert [[(p.start, p.stop) for p in piece] for piece in pieces] == [  # type: ignore[union-attr]
        [(0, 500)],
        [(500, 1000)],
        [(1000, 1234)],
    ]
    assert many_frames(frame, weigh_targets=False) is None  # a provider refuses it whole
    assert many_frames(multicast(changed(), (1, 3)), weigh_targets=True) is None


def test_a_batch_of_small_multicasts_is_weighed_by_its_targets() -> None:
    small = [multicast(changed(), *[(n * 100 + k, 3) for k in range(1, 101)]) for n in range(8)]
    batch = pb.Frame(batch=pb.Batch(frames=small))
    pieces = many_frames(batch, weigh_targets=True)
    assert pieces is not None
    sizes = [slices.weight([f for f in piece if type(f) is pb.Frame]) for piece in pieces]
    assert all(size <= RECEIVE_SLICE for size in sizes) and sum(sizes) == 808


def test_the_slices_of_a_multicast_give_what_the_whole_gives() -> None:
    targets = [(n, n % 7 + 1) for n in range(1, 1235)]
    whole, sliced = open_consumer(max_calls_in_flight=1000), open_consumer(max_calls_in_flight=1000)
    frame = multicast(changed(), *targets)
    expected = feed(whole, frame)
    got: list[Any] = []
    for piece in many_frames(frame, weigh_targets=True) or []:
        got += sliced.receive_batch(piece)
    assert got == expected
    assert len(calls(got)) == 1000  # the rest refused past the limit, each with a Result
    assert whole.take_outbox() == sliced.take_outbox()


def test_slices_of_a_refused_multicast_are_refused_without_work_per_target() -> None:
    link = Link()
    link.open()
    frame = multicast(changed(), *[(n, 3) for n in range(1, 2000)])
    piece = [Targets(frame.multicast, 0, 500)]
    events = link.provider.receive_batch(piece)
    assert len(events) == 1 and len(link.provider.take_outbox()) == 1


def test_a_huge_multicast_is_acted_on_in_slices_waiting_while_its_results_are_unread() -> None:
    run(_a_huge_multicast_is_acted_on_in_slices_waiting_while_its_results_are_unread)


async def _a_huge_multicast_is_acted_on_in_slices_waiting_while_its_results_are_unread(
    loop: ClockLoop,
) -> None:
    from backchannel.settings import Limits
    from backchannel.wire import frames as wire

    null = codec.NULL.SerializeToString()
    first_slice = sum(len(wire.result_frame(wire.value_result(n, null))) for n in range(1, 501))
    limit = first_slice * 6 // 10  # one slice's results are over it, two slices' over twice
    peer = Peer(limits=Limits(max_message_size=1024, max_queued_bytes=limit, max_write_stall=5))
    await peer.open()
    assert peer.connection.peer_accepts_multicast  # the session's Hello said so
    peer.gate = loop.create_future()
    peer.connection.send_multicast(pb.Call(method="changed"), [5] * 1234, ["t"] * 1234)
    [data] = peer.connection.take_encoded()
    peer.inbox.put_nowait(parse_frame(data))
    await turns(lambda: not peer.session._writable.is_set(), "over the limit")
    for _ in range(50):
        await asyncio.sleep(0)
    # the reader waits for the peer to read before it acts on the next slice: had it
    # taken the whole Multicast at once, the results would be over twice the limit
    assert peer.session.cause is None and peer.session.ending is None
    assert len(peer.session._running) + len(peer.results) <= RECEIVE_SLICE
    assert peer.gate is not None
    peer.gate.set_result(None)
    await turns(lambda: len(peer.results) == 1234, "every target answered", bound=2000)
    assert [result.id for result in peer.results] == list(range(1, 1235))
    await peer.close()


# ------------------------------------------------------- end to end, over real gRPC


@backchannel.interface("test.Hub")
class Hub:
    """A provider that calls back every listener it holds at once."""

    @backchannel.method(arguments=[Argument(index=0)])
    def addListener(self, listener: Any) -> None: ...
    def count(self) -> int: ...


class HubImpl:
    def __init__(self) -> None:
        self.listeners: list[Any] = []

    async def addListener(self, listener: Any) -> None:
        self.listeners.append(listener)

    async def count(self) -> int:
        return len(self.listeners)


class Echo:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[object] = []

    async def changed(self, msg: object) -> str:
        self.seen.append(msg)
        return f"{self.name}:{msg}"


class Raising(Echo):
    async def changed(self, msg: object) -> str:
        raise ValueError(f"{self.name} refuses {msg}")


@contextlib.asynccontextmanager
async def hub(
    consumers: int, per_consumer: int, **server: Any
) -> AsyncIterator[tuple[HubImpl, list[backchannel.AsyncClient], list[list[Echo]]]]:
    impl = HubImpl()
    async with backchannel.AsyncServer("127.0.0.1:0", **server) as provider:
        provider.export(Hub, impl)
        clients: list[backchannel.AsyncClient] = []
        echoes: list[list[Echo]] = []
        try:
            for c in range(consumers):
                client = backchannel.AsyncClient(provider.address, timeout=10)
                await client.__aenter__()
                clients.append(client)
                mine = [Echo(f"{c}.{n}") for n in range(per_consumer)]
                echoes.append(mine)
                for echo in mine:
                    await client.reference(Hub).addListener(echo)
            yield impl, clients, echoes
        finally:
            for client in clients:
                await client.__aexit__(None, None, None)


def sessions(impl: HubImpl) -> set[Any]:
    return {proxy._table.session for proxy in impl.listeners}


def test_gather_to_many_listeners_on_several_consumers_sends_one_frame_per_stream() -> None:
    async def body() -> None:
        async with hub(3, 40) as (impl, _, echoes):
            shared = {"price": 7}
            outcomes = await backchannel.gather(p.changed(shared) for p in impl.listeners)
            assert outcomes == [f"{e.name}:{shared}" for mine in echoes for e in mine]
            assert sorted(s.multicast_frames for s in sessions(impl)) == [1, 1, 1]
            # every listener got its own decoded copy, as from a lone Call
            assert all(e.seen == [shared] for mine in echoes for e in mine)
            # a second round: one more frame a stream, each call answered on its own id
            again = await backchannel.gather(p.changed(2) for p in impl.listeners)
            assert again == [f"{e.name}:2" for mine in echoes for e in mine]
            assert sorted(s.multicast_frames for s in sessions(impl)) == [2, 2, 2]
            assert all(s.connection.pending_outgoing == 0 for s in sessions(impl))

    asyncio.run(asyncio.wait_for(body(), 30))


def test_calls_that_differ_go_as_single_calls_and_runs_of_equal_ones_as_multicasts() -> None:
    async def body() -> None:
        async with hub(1, 6) as (impl, _, echoes):
            a, b = "a", "b"
            args = [a, a, a, b, b, "c"]  # "c" alone: a single Call
            outcomes = await backchannel.gather(
                p.changed(arg) for p, arg in zip(impl.listeners, args, strict=True)
            )
            assert outcomes == [f"0.{n}:{arg}" for n, arg in enumerate(args)]
            [session] = sessions(impl)
            assert session.multicast_frames == 2
            distinct = await backchannel.gather(
                p.changed(str(n)) for n, p in enumerate(impl.listeners)
            )
            assert distinct == [f"0.{n}:{n}" for n in range(6)]
            assert session.multicast_frames == 2  # no run of equal arguments: single Calls
            assert echoes[0][0].seen == ["a", "0"]

    asyncio.run(asyncio.wait_for(body(), 30))


def test_one_listener_raising_or_gone_does_not_touch_the_others() -> None:
    async def body() -> None:
        async with hub(2, 3) as (impl, clients, _echoes):
            raising = Raising("bad")
            await clients[0].reference(Hub).addListener(raising)
            gone = impl.listeners[1]
            gone.release()  # ended on the provider's side: CallbackGone at once
            outcomes = await backchannel.gather(p.changed("m") for p in impl.listeners)
            assert isinstance(outcomes[1], CallbackGone)
            assert isinstance(outcomes[6], ValueError) and "bad refuses m" in str(outcomes[6])
            fine = [o for n, o in enumerate(outcomes) if n not in (1, 6)]
            assert fine == ["0.0:m", "0.2:m", "1.0:m", "1.1:m", "1.2:m"]
            # a consumer that goes away: its listeners' calls fail, the others' do not
            await clients[1].__aexit__(None, None, None)
            clients.remove(clients[1])
            await asyncio.wait_for(
                asyncio.gather(*(impl.listeners[3]._table.session.closed.wait(),)), 5
            )
            later = await backchannel.gather(p.changed("n") for p in impl.listeners)
            assert [type(o).__name__ for o in later] == [
                "str",
                "CallbackGone",
                "str",
                "CallbackGone",
                "CallbackGone",
                "CallbackGone",
                "ValueError",
            ]
            assert later[0] == "0.0:n" and later[2] == "0.2:n"

    asyncio.run(asyncio.wait_for(body(), 30))


def test_an_unknown_callback_id_in_a_multicast_is_answered_per_id() -> None:
    async def body() -> None:
        async with hub(1, 2) as (impl, _clients, _):
            [session] = sessions(impl)
            live = [proxy.callback_id for proxy in impl.listeners]
            call = pb.Call(method="changed", args=[pb.Value(string_value="x")])
            futures = session.start_multicast(
                call, [(live[0], "one", None), (424242, "ghost", None)], 5.0
            )
            first, ghost = await asyncio.gather(*futures)
            assert first.value.string_value == "0.0:x"
            assert ghost.error.code == pb.NOT_FOUND
            assert "callback 424242 is not exported on this stream" in ghost.error.message

    asyncio.run(asyncio.wait_for(body(), 30))


def test_an_old_consumer_gets_single_calls_from_gather() -> None:
    async def body() -> None:
        async with hub(1, 3) as (impl, _, _echoes):
            [session] = sessions(impl)
            session.connection.peer_accepts_multicast = False  # as an old consumer's Hello
            outcomes = await backchannel.gather(p.changed("x") for p in impl.listeners)
            assert outcomes == ["0.0:x", "0.1:x", "0.2:x"]
            assert session.multicast_frames == 0

    asyncio.run(asyncio.wait_for(body(), 30))


def test_an_old_consumer_over_grpc_gets_single_calls() -> None:
    """A raw consumer whose Hello has no accepts_multicast: gather sends it Calls."""
    from conftest import RawStream

    async def body() -> None:
        impl = HubImpl()
        async with backchannel.AsyncServer("127.0.0.1:0") as provider:
            provider.export(Hub, impl)
            raw = RawStream(provider.address)
            try:
                await raw.hello()
                for n, callback_id in enumerate((11, 12, 13), start=1):
                    ref = pb.Value(callback_value=pb.CallbackRef(id=callback_id))
                    await raw.send(
                        pb.Frame(
                            call=pb.Call(id=n, service="test.Hub", method="addListener", args=[ref])
                        )
                    )
                    assert (await raw.recv()).result.id == n
                pending = backchannel.gather(p.changed("x") for p in impl.listeners)
                gathering = asyncio.ensure_future(pending)
                received = [await raw.recv() for _ in range(3)]
                assert kinds(received) == ["call", "call", "call"]
                assert [f.call.callback_id for f in received] == [11, 12, 13]
                for frame in received:
                    value = pb.Value(string_value=f"got {frame.call.callback_id}")
                    await raw.send(pb.Frame(result=pb.Result(id=frame.call.id, value=value)))
                assert await gathering == ["got 11", "got 12", "got 13"]
            finally:
                await raw.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_targets_beyond_the_consumers_in_flight_limit_wait_and_are_sent_as_single_calls() -> None:
    async def body() -> None:
        async with hub(1, 6) as (impl, _clients, _echoes):
            [session] = sessions(impl)
            session._peer_max_calls = 4  # as a consumer that runs 4 at once would say
            outcomes = await backchannel.gather(p.changed("x") for p in impl.listeners)
            assert outcomes == [f"0.{n}:x" for n in range(6)]
            assert session.multicast_frames == 1  # 4 in it; 2 waited as single Calls

    asyncio.run(asyncio.wait_for(body(), 30))


def test_a_multicast_target_times_out_alone_and_is_cancelled_on_the_consumer() -> None:
    release = asyncio.Event()

    class Slow(Echo):
        async def changed(self, msg: object) -> str:
            await release.wait()
            return "late"

    async def body() -> None:
        async with hub(1, 2, callback_timeout=0.5) as (impl, clients, _echoes):
            slow = Slow("slow")
            await clients[0].reference(Hub).addListener(slow)
            outcomes = await backchannel.gather(p.changed("x") for p in impl.listeners)
            assert outcomes[:2] == ["0.0:x", "0.1:x"]
            assert type(outcomes[2]).__name__ == "DeadlineExceeded"
            [session] = sessions(impl)
            assert session.multicast_frames == 1 and session.connection.pending_outgoing == 0
            release.set()

    asyncio.run(asyncio.wait_for(body(), 30))


# ------------------------------------------------ a Multicast that does not parse


def unreadable_multicast(*ids: int, one_way: bool = False) -> bytes:
    """A Multicast frame whose call does not parse (its method is not UTF-8)."""
    from backchannel.wire import frames as wire

    call = pb.Call(method="changed", one_way=one_way).SerializeToString()
    call = call.replace(b"changed", b"\xffhanged")
    targets = pb.Multicast()
    for call_id in ids:
        targets.targets.add(id=call_id, callback_id=3)
    return wire.multicast_frame(call, targets.SerializeToString())


def test_a_multicast_that_does_not_parse_gets_an_error_result_per_target() -> None:
    run(_a_multicast_that_does_not_parse_gets_an_error_result_per_target)


async def _a_multicast_that_does_not_parse_gets_an_error_result_per_target(
    loop: ClockLoop,
) -> None:
    peer = Peer()
    await peer.open()
    first = peer.connection.send_multicast(changed(), [3, 4], ["a", "b"])
    peer.connection.take_encoded()  # not delivered: its ids stand for the unreadable one
    frame = parse_frame(unreadable_multicast(first, first + 1))
    assert type(frame).__name__ == "Unparseable" and frame.targets == (first, first + 1)  # type: ignore[union-attr]
    peer.inbox.put_nowait(frame)
    await turns(lambda: len(peer.results) == 2, "both targets answered")
    assert [(r.id, r.error.code) for r in peer.results] == [
        (first, pb.INVALID_ARGUMENT),
        (first + 1, pb.INVALID_ARGUMENT),
    ]
    assert "a multicast could not be read" in peer.results[0].error.message
    await peer.close()


def test_an_unparseable_multicast_answers_at_most_a_slice_of_targets_and_none_one_way() -> None:
    frame = parse_frame(unreadable_multicast(*range(1, 5000)))
    assert len(frame.targets) == RECEIVE_SLICE  # type: ignore[union-attr]
    one_way = parse_frame(unreadable_multicast(1, 2, one_way=True))
    consumer = open_consumer()
    events = consumer.receive_unparseable(
        one_way.size,
        one_way.reason,
        0,
        one_way.one_way,
        0,
        one_way.targets,  # type: ignore[union-attr]
    )
    assert len(mistakes(events)) == 1
    assert kinds(consumer.take_outbox()) == ["fault"]  # one-way: no Results to send


def test_with_tracing_each_target_has_its_own_client_span_and_the_consumers_span_its_child() -> (
    None
):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from backchannel import telemetry

    exporter = InMemorySpanExporter()
    all_ended = threading.Event()  # the six spans of changed() ended, whichever loop ended them

    class Counting(SimpleSpanProcessor):
        ended = 0

        def on_end(self, span: Any) -> None:
            super().on_end(span)
            if "changed" in span.name:
                self.ended += 1
                if self.ended >= 6:
                    all_ended.set()

    tracing = TracerProvider()
    tracing.add_span_processor(Counting(exporter))
    telemetry.configure(tracer_provider=tracing)

    async def body() -> None:
        async with hub(1, 3) as (impl, _clients, _echoes):
            exporter.clear()
            outcomes = await backchannel.gather(p.changed("t") for p in impl.listeners)
            assert outcomes == ["0.0:t", "0.1:t", "0.2:t"]
            [session] = sessions(impl)
            assert session.multicast_frames == 1
            # the consumer's server spans end on its own loop: wait off this one
            assert await asyncio.to_thread(all_ended.wait, 10), "the six spans did not end"

    try:
        asyncio.run(asyncio.wait_for(body(), 30))
    finally:
        telemetry.configure()
    spans = [s for s in exporter.get_finished_spans() if "changed" in s.name]
    clients = [s for s in spans if s.kind is SpanKind.CLIENT]
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(clients) == 3 and len(servers) == 3
    client_ids = {s.context.span_id for s in clients}
    assert len(client_ids) == 3
    parents = [s.parent.span_id for s in servers if s.parent is not None]
    assert sorted(parents) == sorted(client_ids)  # each server span the child of its own


# ------------------------------------------------- what one multicast may stand for


def hostile(one_way: bool = False) -> tuple[pb.Frame, int]:
    """The review's amplification: a frame under 4 MiB whose ~3.9 MB call goes to 1,000
    targets (1,000 calls of 3.9 MB from one message), and its call's size."""
    call = pb.Call(method="changed", args=[pb.Value(bytes_value=b"x" * 3_900_000)])
    call.one_way = one_way
    frame = multicast(call, *[(n, 3) for n in range(1, 1001)])
    assert frame.ByteSize() < 4 * 1024 * 1024
    return frame, call.ByteSize()


def test_a_multicast_standing_for_more_than_its_budget_gets_the_targets_past_it_refused() -> None:
    consumer = open_consumer(max_message_size=4 * 1024 * 1024)
    frame, size = hostile()
    budget = slices.multicast_budget(4 * 1024 * 1024)
    assert budget == 8 * 4 * 1024 * 1024
    events = feed(consumer, frame)
    received = calls(events)
    # the first targets run, as many as the budget holds of a call this size: not 1,000
    assert [c.id for c in received] == list(range(1, budget // size + 1))
    assert sum(c.ByteSize() for c in received) <= budget
    assert all(len(c.args[0].bytes_value) == 3_900_000 for c in received)
    [told] = mistakes(events)  # told once, not once per target
    assert "multicast over budget" in told and "8 x max_message_size" in told
    results = consumer.take_outbox()
    assert kinds(results) == ["result"] * (1000 - len(received))
    assert [f.result.id for f in results] == list(range(len(received) + 1, 1001))
    assert {f.result.error.code for f in results} == {pb.RESOURCE_EXHAUSTED}
    assert f"call {len(received) + 1} refused" in results[0].result.error.message
    assert consumer.pending_incoming == len(received)


def test_the_budget_holds_across_the_slices_of_a_multicast_as_for_the_whole() -> None:
    frame, size = hostile()
    consumer = open_consumer()  # 0: gRPC's default max_message_size, 4 MiB
    pieces = list(slices.slices([frame], RECEIVE_SLICE))
    assert len(pieces) == 2
    events = [event for piece in pieces for event in consumer.receive_batch(piece)]
    allowed = slices.multicast_budget(0) // size
    assert [c.id for c in calls(events)] == list(range(1, allowed + 1))
    results = consumer.take_outbox()
    assert [f.result.id for f in results] == list(range(allowed + 1, 1001))
    assert len(mistakes(events)) == 2  # once per slice


def test_one_way_targets_past_the_budget_are_faulted_once_and_not_run() -> None:
    frame, size = hostile(one_way=True)
    consumer = open_consumer(max_message_size=4 * 1024 * 1024)
    events = feed(consumer, frame)
    allowed = slices.multicast_budget(4 * 1024 * 1024) // size
    assert len(calls(events)) == allowed
    [fault] = consumer.take_outbox()
    assert kinds([fault]) == ["fault"] and fault.fault.call_id == allowed + 1
    assert "multicast over budget" in fault.fault.message


def test_a_small_call_to_many_targets_is_well_within_the_budget() -> None:
    consumer = open_consumer(max_message_size=1024)
    frame = multicast(changed(), *[(n, 3) for n in range(1, 501)])
    assert len(calls(feed(consumer, frame))) == 500
    assert consumer.take_outbox() == []


def test_traced_targets_are_measured_so_no_frame_is_over_the_message_size() -> None:
    from backchannel.transport import multicasting

    link = Link()
    link.open()
    call = changed()
    # trace contexts far bigger than a traceparent: what a tracestate may carry
    traces = [{"traceparent": "00-" + "a" * 400, "tracestate": "k=" + "v" * 200}] * 50
    limit = 4096
    room = limit - call.ByteSize() - multicasting._FRAME_BYTES
    start, sizes = 0, []
    while start < len(traces):
        stop = multicasting._frame_end(start, len(traces), 500, room, traces)
        count = stop - start
        link.provider.send_multicast(call, [3] * count, ["t"] * count, traces[start:stop])
        [frame] = link.provider.take_outbox()
        sizes.append(frame.ByteSize())
        start = stop
    assert len(sizes) > 1 and max(sizes) <= limit
    assert max(sizes) > limit - 700  # filled: no more than one target's room left over


def test_gather_of_a_big_argument_to_many_listeners_goes_in_frames_within_the_budget() -> None:
    async def body() -> None:
        async with hub(1, 70) as (impl, _, echoes):
            big = "x" * 1_000_000
            outcomes = await backchannel.gather(p.changed(big) for p in impl.listeners)
            assert [len(o) for o in outcomes] == [len(f"{e.name}:") + len(big) for e in echoes[0]]
            assert all(o == f"{e.name}:{big}" for o, e in zip(outcomes, echoes[0], strict=True))
            [session] = sessions(impl)
            # 33 targets of a 1 MB call in the budget of 32 MiB: three frames, none refused
            assert session.multicast_frames == 3
            assert all(e.seen == [big] for e in echoes[0])
            assert session.connection.pending_outgoing == 0

    asyncio.run(asyncio.wait_for(body(), 30))
