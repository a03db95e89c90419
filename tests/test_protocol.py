"""The sans-I/O protocol state machine, driven frame by frame through a fake link."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from helpers import SERVICES, Link, feed, kinds, make_call

from backchannel.errors import LocalProtocolError, StreamBroken
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire.protocol import (
    PROTOCOL_VERSION,
    CallReceived,
    CancelReceived,
    Connection,
    FaultReceived,
    GoAwayReceived,
    HandshakeDone,
    PeerMistake,
    ReleaseReceived,
    ResultReceived,
    Role,
    State,
    Unparseable,
    error_result,
)


def ok(call_id: int, text: str = "done") -> pb.Result:
    return pb.Result(id=call_id, value=pb.Value(string_value=text))


def hello(version: int = PROTOCOL_VERSION) -> pb.Frame:
    return pb.Frame(hello=pb.Hello(protocol_version=version, application="shop"))


def call_frame(call_id: int, one_way: bool = False) -> pb.Frame:
    return pb.Frame(call=pb.Call(id=call_id, service="test.Echo", method="echo", one_way=one_way))


def open_provider(**kwargs: int) -> Connection[str]:
    provider: Connection[str] = Connection(Role.PROVIDER, "warehouse", SERVICES, **kwargs)
    feed(provider, hello())
    provider.take_outbox()
    return provider


def single_fault(connection: Connection[str]) -> pb.Fault:
    frames = connection.take_outbox()
    assert kinds(frames) == ["fault"]
    return frames[0].fault


# ------------------------------------------------------------------ handshake


def test_consumer_start_queues_a_hello_with_the_protocol_version() -> None:
    link = Link()
    link.consumer.start()
    [frame] = link.consumer.take_outbox()
    assert frame.hello.protocol_version == PROTOCOL_VERSION
    assert frame.hello.application == "shop"
    assert link.consumer.state is State.HANDSHAKE


def test_handshake_opens_both_sides_and_the_welcome_carries_the_services() -> None:
    link = Link()
    link.consumer.start()

    provider_events = link.to_provider()
    assert link.provider.state is State.OPEN
    assert provider_events == [HandshakeDone("shop", ())]
    [welcome] = link.provider.take_outbox()
    assert list(welcome.welcome.services) == list(SERVICES)
    assert welcome.welcome.protocol_version == PROTOCOL_VERSION
    assert welcome.welcome.application == "warehouse"

    consumer_events = feed(link.consumer, welcome)
    assert link.consumer.state is State.OPEN
    assert consumer_events == [HandshakeDone("warehouse", SERVICES)]


def test_handshake_tells_each_side_the_peer_limits() -> None:
    consumer: Connection[str] = Connection(
        Role.CONSUMER, max_calls_in_flight=3, max_message_size=5000
    )
    provider: Connection[str] = Connection(
        Role.PROVIDER, max_calls_in_flight=7, max_message_size=9000
    )
    consumer.start()
    assert feed(provider, *consumer.take_outbox()) == [HandshakeDone("", (), 3, 5000)]
    assert feed(consumer, *provider.take_outbox()) == [HandshakeDone("", (), 7, 9000)]


def test_only_the_consumer_starts() -> None:
    provider: Connection[str] = Connection(Role.PROVIDER)
    with pytest.raises(LocalProtocolError) as raised:
        provider.start()
    assert str(raised.value) == "only the consumer sends hello"
    assert provider.take_outbox() == []


def test_send_call_before_the_handshake_is_a_local_error() -> None:
    consumer: Connection[str] = Connection(Role.CONSUMER)
    with pytest.raises(LocalProtocolError) as raised:
        consumer.send_call(make_call(), "token")
    assert str(raised.value) == "cannot send a call in state 'awaiting handshake'"


def test_unsupported_protocol_version_is_faulted_and_the_provider_keeps_waiting() -> None:
    provider: Connection[str] = Connection(Role.PROVIDER)
    events = feed(provider, hello(PROTOCOL_VERSION + 1))
    fault = single_fault(provider)
    assert fault.message == (
        f"unsupported protocol version {PROTOCOL_VERSION + 1}; "
        f"this provider speaks {PROTOCOL_VERSION}"
    )
    assert fault.call_id == 0
    assert events == [PeerMistake(fault.message)]
    assert provider.state is State.HANDSHAKE

    feed(provider, hello())  # a hello it speaks still works
    assert kinds(provider.take_outbox()) == ["welcome"]
    assert provider.state is State.OPEN


def test_a_second_hello_is_faulted() -> None:
    provider = open_provider()
    events = feed(provider, hello())
    message = single_fault(provider).message
    assert message == "unexpected hello frame after the handshake (provider side)"
    assert [type(event) for event in events] == [PeerMistake]
    assert provider.state is State.OPEN


# ----------------------------------------------------------- before handshake


def test_call_before_the_handshake_gets_a_failed_precondition_result() -> None:
    provider: Connection[str] = Connection(Role.PROVIDER)
    events = feed(provider, call_frame(5))
    [frame] = provider.take_outbox()
    assert frame.result.id == 5
    assert frame.result.error.code == pb.FAILED_PRECONDITION
    message = "handshake required: send a hello frame before call 5"
    assert frame.result.error.message == message
    assert frame.result.error.type == "backchannel.RemoteProtocolError"
    assert events == [PeerMistake(message)]
    assert provider.state is State.HANDSHAKE
    assert provider.pending_incoming == 0


def test_one_way_call_before_the_handshake_gets_a_fault_naming_it() -> None:
    provider: Connection[str] = Connection(Role.PROVIDER)
    events = feed(provider, call_frame(5, one_way=True))
    fault = single_fault(provider)  # no Result to answer with: the peer is told by a Fault
    assert fault.call_id == 5
    assert fault.message == (
        "handshake required: send a hello frame before call 5 (one-way call 5 dropped)"
    )
    assert events == [PeerMistake(fault.message)]


def test_a_consumer_refusing_a_call_before_the_welcome_asks_for_the_welcome() -> None:
    consumer: Connection[str] = Connection(Role.CONSUMER)
    consumer.start()
    consumer.take_outbox()
    events = feed(consumer, call_frame(4))
    [frame] = consumer.take_outbox()
    message = "handshake required: send the welcome frame before call 4"
    assert frame.result.id == 4 and frame.result.error.message == message
    assert frame.result.error.code == pb.FAILED_PRECONDITION
    assert events == [PeerMistake(message)]


@pytest.mark.parametrize(
    "frame",
    [
        pb.Frame(result=pb.Result(id=1)),
        pb.Frame(cancel=pb.Cancel(id=1)),
        pb.Frame(release=pb.Release(callback_id=1)),
        pb.Frame(go_away=pb.GoAway()),
        pb.Frame(welcome=pb.Welcome()),
    ],
    ids=lambda frame: frame.WhichOneof("kind"),
)
def test_other_frames_before_the_handshake_are_faulted(frame: pb.Frame) -> None:
    provider: Connection[str] = Connection(Role.PROVIDER)
    events = feed(provider, frame)
    kind = frame.WhichOneof("kind")
    message = single_fault(provider).message
    assert f"unexpected {kind} frame before the handshake (provider side)" == message
    assert events == [PeerMistake(message)]
    assert provider.state is State.HANDSHAKE


def test_consumer_hears_a_fault_before_the_welcome() -> None:
    consumer: Connection[str] = Connection(Role.CONSUMER)
    consumer.start()
    consumer.take_outbox()
    events = feed(consumer, pb.Frame(fault=pb.Fault(message="go away", call_id=0)))
    assert events == [FaultReceived("go away", 0)]
    assert consumer.take_outbox() == []  # a fault is never answered with a fault


def test_a_go_away_before_the_welcome_is_taken_as_a_go_away_not_a_mistake() -> None:
    """A provider that stops while a stream is being authenticated tells it go-away
    before it has read the Hello (rpc/provider.py), so the consumer hears GoAway, then Welcome:
    the stream opens knowing the provider takes no new call, and nothing is faulted."""
    link = Link()
    link.provider.send_go_away("the provider is shutting down")
    link.consumer.start()
    link.to_provider()
    frames = link.provider.take_outbox()
    assert kinds(frames) == ["go_away", "welcome"]
    events = feed(link.consumer, *frames)
    assert events == [
        GoAwayReceived("the provider is shutting down"),
        HandshakeDone("warehouse", SERVICES),
    ]
    assert link.consumer.state is State.OPEN
    assert link.consumer.peer_going_away
    assert link.consumer.take_outbox() == []  # no Fault back: the provider did nothing wrong


def test_a_go_away_alone_before_the_welcome_leaves_the_consumer_waiting_for_it() -> None:
    consumer: Connection[str] = Connection(Role.CONSUMER)
    consumer.start()
    consumer.take_outbox()
    events = feed(consumer, pb.Frame(go_away=pb.GoAway(reason="draining")))
    assert events == [GoAwayReceived("draining")]
    assert not any(isinstance(event, PeerMistake) for event in events)
    assert consumer.take_outbox() == []
    assert consumer.peer_going_away and consumer.state is State.HANDSHAKE


# ------------------------------------------------------------------ calls


def test_call_round_trip_returns_the_result_with_its_token() -> None:
    link = Link()
    link.open()
    call_id = link.consumer.send_call(make_call(), "future-1")
    assert link.consumer.pending_outgoing == 1

    [received] = link.to_provider()
    assert isinstance(received, CallReceived)
    assert received.call.id == call_id
    assert received.call.method == "echo"
    assert link.provider.pending_incoming == 1

    link.provider.send_result(ok(call_id, "pong"))
    assert link.provider.pending_incoming == 0
    [answered] = link.to_consumer()
    assert answered == ResultReceived(ok(call_id, "pong"), "future-1")
    assert link.consumer.pending_outgoing == 0


def test_call_ids_are_unique_and_never_zero() -> None:
    link = Link()
    link.open()
    ids = [link.consumer.send_call(make_call(), f"t{n}") for n in range(5)]
    ids.append(link.consumer.send_call(make_call(one_way=True), "unused"))
    assert 0 not in ids
    assert len(set(ids)) == len(ids)
    assert [frame.call.id for frame in link.consumer.take_outbox()] == ids


def test_results_may_come_back_in_any_order() -> None:
    link = Link()
    link.open()
    first = link.call("first")
    second = link.call("second")
    link.provider.send_result(ok(second))
    link.provider.send_result(ok(first))
    events = link.to_consumer()
    assert [event.token for event in events if isinstance(event, ResultReceived)] == [
        "second",
        "first",
    ]


def test_the_provider_can_call_back_the_consumer() -> None:
    link = Link()
    link.open()
    callback_id = link.provider.send_call(pb.Call(callback_id=3, method="changed"), "cb")
    [received] = link.to_consumer()
    assert isinstance(received, CallReceived)
    assert received.call.callback_id == 3
    link.consumer.send_result(ok(callback_id))
    assert link.to_provider() == [ResultReceived(ok(callback_id), "cb")]


def test_one_way_call_registers_no_pending_result() -> None:
    link = Link()
    link.open()
    call_id = link.call(one_way=True)
    assert link.consumer.pending_outgoing == 0
    assert link.provider.pending_incoming == 0
    with pytest.raises(LocalProtocolError, match=f"no unanswered call with id {call_id}"):
        link.provider.send_result(ok(call_id))


def test_result_for_an_unknown_call_id_is_faulted_and_the_stream_goes_on() -> None:
    link = Link()
    link.open()
    events = feed(link.consumer, pb.Frame(result=ok(99)))
    fault = single_fault(link.consumer)
    assert fault.call_id == 99
    assert fault.message == "result for unknown call id 99 (never sent, answered or cancelled)"
    assert events == [PeerMistake(fault.message)]

    call_id = link.call("still-works")
    link.provider.send_result(ok(call_id))
    assert link.to_consumer() == [ResultReceived(ok(call_id), "still-works")]


def test_a_second_result_for_the_same_call_is_faulted() -> None:
    link = Link()
    link.open()
    call_id = link.call()
    feed(link.consumer, pb.Frame(result=ok(call_id)))
    events = feed(link.consumer, pb.Frame(result=ok(call_id)))
    assert single_fault(link.consumer).call_id == call_id
    assert [type(event) for event in events] == [PeerMistake]


def test_duplicate_call_id_while_running_is_faulted_and_the_first_still_answerable() -> None:
    provider = open_provider()
    [first] = feed(provider, call_frame(7))
    assert isinstance(first, CallReceived)

    events = feed(provider, call_frame(7))
    fault = single_fault(provider)
    assert fault.call_id == 7
    assert fault.message == "duplicate call id 7: a call with this id is still running"
    assert events == [PeerMistake(fault.message)]
    assert provider.pending_incoming == 1

    provider.send_result(ok(7))
    assert [frame.result.id for frame in provider.take_outbox()] == [7]
    feed(provider, call_frame(7))  # finished: its id may be used again
    assert provider.pending_incoming == 1


def test_call_id_zero_is_faulted() -> None:
    provider = open_provider()
    events = feed(provider, call_frame(0))
    fault = single_fault(provider)
    assert fault.message == "call id 0 is not allowed: give every call a non-zero id"
    assert fault.call_id == 0
    assert events == [PeerMistake(fault.message)]
    assert provider.pending_incoming == 0


def test_calls_over_the_in_flight_limit_are_refused_with_resource_exhausted() -> None:
    provider = open_provider(max_calls_in_flight=1)
    feed(provider, call_frame(1))
    events = feed(provider, call_frame(2))
    [frame] = provider.take_outbox()
    assert frame.result.id == 2
    assert frame.result.error.code == pb.RESOURCE_EXHAUSTED
    assert frame.result.error.type == "backchannel.RemoteProtocolError"
    message = (
        "too many calls in flight on this stream: this side runs at most 1 at once (call 2 refused)"
    )
    assert frame.result.error.message == message
    assert events == [PeerMistake(message)]
    provider.send_result(ok(1))
    assert [type(event) for event in feed(provider, call_frame(3))] == [CallReceived]


def test_one_way_calls_past_the_limit_wait_for_a_slot_in_order() -> None:
    provider = open_provider(max_calls_in_flight=2)
    assert [type(e) for e in feed(provider, call_frame(1, one_way=True))] == [CallReceived]
    assert [type(e) for e in feed(provider, call_frame(2, one_way=True))] == [CallReceived]
    assert provider.running_one_way == 2
    # over the limit: they wait (their sender cannot count them), neither run nor refused
    assert feed(provider, call_frame(3, one_way=True), call_frame(4, one_way=True)) == []
    assert provider.take_outbox() == [] and provider.one_way_waiting == 2
    assert provider.next_one_way() is None  # no slot free yet
    # a call that wants a result is counted apart: one-way calls do not take its slots
    assert [type(event) for event in feed(provider, call_frame(9))] == [CallReceived]
    provider.one_way_done(1)
    assert provider.running_one_way == 1
    waited = provider.next_one_way()  # the slot goes to the first waiting, in order
    assert waited is not None and waited.id == 3
    assert provider.running_one_way == 2 and provider.one_way_waiting == 1
    assert provider.next_one_way() is None
    # while some wait, a new one waits behind them, even with a slot free meanwhile
    provider.one_way_done(2)
    assert feed(provider, call_frame(5, one_way=True)) == []
    assert [c.id for c in iter(provider.next_one_way, None)] == [4]
    provider.one_way_done(3)
    assert [c.id for c in iter(provider.next_one_way, None)] == [5]
    assert provider.one_way_waiting == 0 and provider.take_outbox() == []


def test_one_way_calls_past_twice_the_waiting_budget_are_dropped_with_one_fault() -> None:
    provider = open_provider(max_calls_in_flight=1)
    provider.max_waiting_one_way = 3
    feed(provider, call_frame(1, one_way=True))  # runs
    assert not provider.one_way_full
    feed(provider, *(call_frame(i, one_way=True) for i in range(2, 5)))
    assert provider.one_way_full  # the transport stops reading the peer here
    assert provider.take_outbox() == []
    feed(provider, *(call_frame(i, one_way=True) for i in range(5, 8)))  # twice: full
    events = feed(provider, *(call_frame(i, one_way=True) for i in range(8, 20)))
    fault = single_fault(provider)  # one Fault for all those dropped, naming the first
    assert fault.call_id == 8
    assert fault.message == (
        "too many one-way calls waiting on this stream: this side runs 1 at once and "
        "keeps at most 6 waiting for a slot (twice max_waiting_one_way; their bytes at "
        "most twice max_queued_bytes); one-way call 8 and the next ones are dropped "
        "until half have run"
    )
    assert events == [PeerMistake(fault.message)]
    assert provider.one_way_waiting == 6
    provider.one_way_done(1)
    taken = []
    while not provider.one_way_drained:  # at most half the budget waits
        call = provider.next_one_way()
        assert call is not None
        taken.append(call.id)
        provider.one_way_done(call.id)
    assert taken == [2, 3, 4, 5, 6] and provider.one_way_waiting == 1
    assert provider.take_outbox() == []
    feed(provider, *(call_frame(i, one_way=True) for i in range(20, 27)))
    assert single_fault(provider).call_id == 25  # drained to half: told again when full


def test_a_one_way_call_after_go_away_is_dropped_with_one_fault() -> None:
    provider = open_provider()
    provider.send_go_away("leaving")
    provider.take_outbox()
    events = feed(provider, call_frame(3, one_way=True), call_frame(4, one_way=True))
    fault = single_fault(provider)  # once: later ones are dropped quietly
    assert fault.call_id == 3
    assert fault.message == (
        "shutting down: this side accepts no new calls on this stream "
        "(one-way call 3 and any later ones dropped)"
    )
    assert events == []  # a race with the GoAway, not the peer's mistake: no warning


def test_one_way_done_frees_one_slot_per_call_even_when_ids_repeat() -> None:
    provider = open_provider(max_calls_in_flight=3)
    feed(provider, call_frame(7, one_way=True), call_frame(7, one_way=True))
    assert provider.running_one_way == 2
    provider.one_way_done(7)
    provider.one_way_done(7)
    provider.one_way_done(7)  # one too many, or unknown: nothing to free
    provider.one_way_done(99)
    assert provider.running_one_way == 0
    assert provider.take_outbox() == []


def test_connection_lost_frees_the_one_way_slots() -> None:
    provider = open_provider(max_calls_in_flight=1)
    feed(provider, call_frame(1, one_way=True))
    provider.connection_lost(StreamBroken("gone"))
    assert provider.running_one_way == 0
    provider.one_way_done(1)  # the task that ran it ends later: harmless
    assert provider.running_one_way == 0


def test_send_result_for_an_unknown_id_is_a_local_error() -> None:
    link = Link()
    link.open()
    with pytest.raises(LocalProtocolError) as raised:
        link.provider.send_result(ok(42))
    assert str(raised.value) == "no unanswered call with id 42 to send a result for"
    assert link.provider.take_outbox() == []


def test_a_result_serialized_already_is_sent_as_a_result_frame() -> None:
    link = Link()
    link.open()
    call_id = link.call("future")
    link.provider.send_encoded_result(call_id, ok(call_id, "pong").SerializeToString())
    assert link.provider.pending_incoming == 0
    assert link.to_consumer() == [ResultReceived(ok(call_id, "pong"), "future")]
    with pytest.raises(LocalProtocolError) as raised:  # answered: not twice
        link.provider.send_encoded_result(call_id, ok(call_id).SerializeToString())
    assert str(raised.value) == f"no unanswered call with id {call_id} to send a result for"
    assert link.provider.take_outbox() == []


def test_send_result_twice_is_a_local_error() -> None:
    link = Link()
    link.open()
    call_id = link.call()
    link.provider.send_result(ok(call_id))
    with pytest.raises(LocalProtocolError):
        link.provider.send_result(ok(call_id))


# ------------------------------------------------------------------ frames


def test_empty_frame_is_faulted_as_an_unknown_kind() -> None:
    provider = open_provider()
    events = feed(provider, pb.Frame())
    fault = single_fault(provider)
    assert fault.message == "frame with no kind set (an unknown frame kind?)"
    assert fault.call_id == 0
    assert events == [PeerMistake(fault.message)]


def test_a_message_that_is_no_frame_is_faulted_and_the_stream_goes_on() -> None:
    provider = open_provider()
    events = provider.receive_unparseable(4, "Error parsing message")
    message = "a message of 4 bytes is not a backchannel.v1.Frame (Error parsing message)"
    assert events == [PeerMistake(message)]
    assert single_fault(provider).message == message
    assert provider.state is State.OPEN
    assert isinstance(provider.receive(call_frame(1))[0], CallReceived)


NO_FRAME = "a message of 9 bytes is not a backchannel.v1.Frame (too deep)"


def test_a_call_that_does_not_parse_is_answered_with_an_invalid_argument_error() -> None:
    provider = open_provider()
    events = provider.receive_unparseable(9, "too deep", call_id=5)
    message = f"call 5 could not be read: {NO_FRAME}"
    assert events == [PeerMistake(message)]
    [frame] = provider.take_outbox()  # an error Result, no Fault: the call is answered
    assert frame.result == error_result(
        5, pb.INVALID_ARGUMENT, "backchannel.RemoteProtocolError", message
    )
    assert provider.pending_incoming == 0  # nothing left running for it
    assert [type(event) for event in feed(provider, call_frame(5))] == [CallReceived]


def test_a_call_that_does_not_parse_with_the_id_of_a_running_one_is_faulted() -> None:
    provider = open_provider()
    feed(provider, call_frame(7))
    events = provider.receive_unparseable(9, "too deep", call_id=7)
    message = f"duplicate call id 7: a call with this id is still running ({NO_FRAME})"
    assert events == [PeerMistake(message)]
    fault = single_fault(provider)  # not a Result: that would answer the running call
    assert (fault.message, fault.call_id) == (message, 7)
    assert provider.pending_incoming == 1
    provider.send_result(ok(7))  # the running call is still answerable
    assert [frame.result.id for frame in provider.take_outbox()] == [7]


def test_a_one_way_call_that_does_not_parse_is_faulted_with_its_id() -> None:
    provider = open_provider()
    events = provider.receive_unparseable(9, "too deep", call_id=5, one_way=True)
    message = f"one-way call 5 could not be read: {NO_FRAME}"
    assert events == [PeerMistake(message)]
    fault = single_fault(provider)  # a one-way call has no Result to answer with
    assert (fault.message, fault.call_id) == (message, 5)
    assert (provider.pending_incoming, provider.running_one_way) == (0, 0)


def test_a_result_that_does_not_parse_fails_the_call_it_answers() -> None:
    link = Link()
    link.open()
    waiting = link.call("waiting")
    other = link.call("other")
    events = link.consumer.receive_unparseable(9, "too deep", result_id=waiting)
    message = f"the result of call {waiting} could not be read: {NO_FRAME}"
    failed = error_result(waiting, pb.INVALID_ARGUMENT, "backchannel.RemoteProtocolError", message)
    assert events == [ResultReceived(failed, "waiting"), PeerMistake(message)]
    fault = single_fault(link.consumer)
    assert (fault.message, fault.call_id) == (message, waiting)
    assert link.consumer.pending_outgoing == 1  # only that call: the other still waits

    # the peer may send it again, readable this time: the call has failed, it is dropped
    assert feed(link.consumer, pb.Frame(result=ok(waiting))) == []
    assert link.consumer.take_outbox() == []
    link.provider.send_result(ok(other))
    assert link.to_consumer() == [ResultReceived(ok(other), "other")]


def test_a_result_that_does_not_parse_for_no_awaited_call_is_one_fault() -> None:
    link = Link()
    link.open()
    waiting = link.call("waiting")
    events = link.consumer.receive_unparseable(9, "too deep", result_id=waiting + 1)
    assert events == [PeerMistake(NO_FRAME)]
    fault = single_fault(link.consumer)
    assert (fault.message, fault.call_id) == (NO_FRAME, 0)
    assert link.consumer.pending_outgoing == 1


def test_a_message_that_does_not_parse_with_no_id_fails_no_call() -> None:
    link = Link()
    link.open()
    waiting = link.call("waiting")  # call id 1
    assert waiting == 1
    events = link.consumer.receive_unparseable(9, "too deep")
    assert events == [PeerMistake(NO_FRAME)]
    fault = single_fault(link.consumer)
    assert (fault.message, fault.call_id) == (NO_FRAME, 0)
    assert link.consumer.pending_outgoing == 1
    link.provider.send_result(ok(waiting))
    assert link.to_consumer() == [ResultReceived(ok(waiting), "waiting")]


def test_after_connection_lost_a_message_that_does_not_parse_is_ignored() -> None:
    provider = open_provider()
    provider.connection_lost(StreamBroken("gone"))
    assert provider.receive_unparseable(9, "too deep", call_id=5) == []
    assert provider.receive_batch([call_frame(6), Unparseable(9, "too deep")]) == []
    assert provider.take_outbox() == []


def test_a_split_batch_is_taken_in_order_each_unparseable_frame_costing_only_itself() -> None:
    """A Batch that did not parse whole is split and its frames parsed one by one
    (transport/receiver.py); the pieces that parsed count as in a Batch, the others as messages that
    do not parse (docs/reliability.md, "A Batch that does not parse loses none of its
    calls")."""
    provider: Connection[str] = Connection(Role.PROVIDER, "warehouse", SERVICES)
    pieces: list[pb.Frame | Unparseable] = [
        hello(),
        call_frame(1),
        Unparseable(9, "too deep", call_id=2),
        call_frame(3),
        Unparseable(9, "too deep"),
        pb.Frame(batch=pb.Batch(frames=[call_frame(4)])),
        call_frame(5),
    ]
    events = provider.receive_batch(pieces)
    nested = "a batch inside a batch is not allowed; its frames were dropped"
    assert events == [
        HandshakeDone("shop", ()),
        CallReceived(call_frame(1).call),
        PeerMistake(f"call 2 could not be read: {NO_FRAME}"),
        CallReceived(call_frame(3).call),
        PeerMistake(NO_FRAME),
        PeerMistake(nested),
        CallReceived(call_frame(5).call),
    ]
    frames = provider.take_outbox()
    assert kinds(frames) == ["welcome", "result", "fault", "fault"]
    assert frames[1].result.id == 2
    assert frames[1].result.error.message == f"call 2 could not be read: {NO_FRAME}"
    assert [frame.fault.message for frame in frames[2:]] == [NO_FRAME, nested]
    assert provider.state is State.OPEN
    assert provider.pending_incoming == 3  # 1, 3 and 5; call 4 was dropped with its batch


def test_batch_is_processed_in_order() -> None:
    provider: Connection[str] = Connection(Role.PROVIDER, "warehouse")
    batch = pb.Batch(frames=[hello(), call_frame(1), call_frame(2), call_frame(3)])
    events = feed(provider, pb.Frame(batch=batch))
    assert isinstance(events[0], HandshakeDone)  # the calls after hello see an open stream
    assert [event.call.id for event in events[1:] if isinstance(event, CallReceived)] == [1, 2, 3]
    assert kinds(provider.take_outbox()) == ["welcome"]


def test_batch_inside_a_batch_is_faulted_and_the_frames_around_it_still_count() -> None:
    provider = open_provider()
    inner = pb.Frame(batch=pb.Batch(frames=[call_frame(2)]))
    outer = pb.Frame(batch=pb.Batch(frames=[call_frame(1), inner, call_frame(3)]))
    events = feed(provider, outer)
    nested = "a batch inside a batch is not allowed; its frames were dropped"
    assert single_fault(provider).message == nested
    assert [type(event) for event in events] == [CallReceived, PeerMistake, CallReceived]
    assert provider.pending_incoming == 2  # call 2 was dropped with its batch


def test_release_and_fault_frames_become_events() -> None:
    link = Link()
    link.open()
    link.consumer.send_release(12)
    assert link.to_provider() == [ReleaseReceived(12)]
    events = feed(link.provider, pb.Frame(fault=pb.Fault(message="you broke it", call_id=4)))
    assert events == [FaultReceived("you broke it", 4)]
    assert link.provider.take_outbox() == []


# ------------------------------------------------------------------ cancel


def test_cancel_of_a_running_call_is_reported_to_the_provider() -> None:
    link = Link()
    link.open()
    call_id = link.call()
    link.consumer.send_cancel(call_id, "deadline exceeded")
    assert link.consumer.pending_outgoing == 0
    assert link.to_provider() == [CancelReceived(call_id, "deadline exceeded")]


def test_cancel_of_an_answered_call_sends_nothing() -> None:
    link = Link()
    link.open()
    call_id = link.call()
    link.provider.send_result(ok(call_id))
    link.to_consumer()
    link.consumer.send_cancel(call_id, "too late")
    assert link.consumer.take_outbox() == []


def test_cancel_for_a_call_that_is_not_running_is_ignored() -> None:
    provider = open_provider()
    assert feed(provider, pb.Frame(cancel=pb.Cancel(id=77, reason="late"))) == []
    assert provider.take_outbox() == []


def test_a_cancelled_call_frees_its_in_flight_slot() -> None:
    link = Link(max_calls_in_flight=1)
    link.open()
    call_id = link.call()
    link.consumer.send_cancel(call_id, "deadline exceeded")
    link.to_provider()
    assert link.provider.pending_incoming == 0
    link.call("next")
    assert kinds(link.provider.take_outbox()) == []  # not refused


def test_a_result_sent_after_a_cancel_draws_no_fault() -> None:
    link = Link()
    link.open()
    call_id = link.call()
    link.consumer.send_cancel(call_id, "deadline exceeded")
    link.to_provider()
    link.provider.send_result(ok(call_id))  # the provider answers anyway
    assert link.to_consumer() == []
    assert link.consumer.take_outbox() == []


def test_a_result_crossing_a_cancel_draws_no_fault() -> None:
    link = Link()
    link.open()
    call_id = link.call()
    link.provider.send_result(ok(call_id))  # on its way ...
    link.consumer.send_cancel(call_id, "deadline exceeded")  # ... while this is too
    assert link.to_provider() == []
    assert link.to_consumer() == []
    assert link.consumer.take_outbox() == []


def test_cancel_is_sent_even_when_the_token_is_none() -> None:
    link = Link()
    link.open()
    call_id = link.consumer.send_call(make_call(), None)  # type: ignore[arg-type]
    link.consumer.take_outbox()
    link.consumer.send_cancel(call_id, "stop")
    assert kinds(link.consumer.take_outbox()) == ["cancel"]


REMEMBERED = 4096  # cancelled calls each side remembers, for the late results of the race


def test_a_consumer_remembers_the_last_4096_calls_it_cancelled_not_every_one() -> None:
    """A late result of a cancelled call is an ordinary race, dropped quietly; the ids
    are remembered for the last 4096 cancels only, so a long-lived stream's memory stays
    bounded, and a result older than that is treated as one for an unknown call."""
    link = Link()
    link.open()
    ids = [link.consumer.send_call(make_call(), f"t{n}") for n in range(REMEMBERED + 1)]
    for call_id in ids:
        link.consumer.send_cancel(call_id, "deadline exceeded")
    link.consumer.take_outbox()
    assert feed(link.consumer, pb.Frame(result=ok(ids[1]))) == []  # the oldest remembered
    assert link.consumer.take_outbox() == []
    events = feed(link.consumer, pb.Frame(result=ok(ids[0])))  # forgotten
    message = f"result for unknown call id {ids[0]} (never sent, answered or cancelled)"
    assert events == [PeerMistake(message)]
    assert single_fault(link.consumer).call_id == ids[0]


def test_a_provider_remembers_the_last_4096_calls_the_peer_cancelled_not_every_one() -> None:
    provider = open_provider()
    ids = range(1, REMEMBERED + 2)
    feed(provider, *(call_frame(call_id) for call_id in ids))
    feed(provider, *(pb.Frame(cancel=pb.Cancel(id=call_id)) for call_id in ids))
    assert provider.pending_incoming == 0
    provider.send_result(ok(ids[1]))  # the oldest remembered: dropped quietly
    assert provider.take_outbox() == []
    with pytest.raises(LocalProtocolError) as raised:  # forgotten: as if never received
        provider.send_result(ok(ids[0]))
    assert str(raised.value) == "no unanswered call with id 1 to send a result for"


# ------------------------------------------------------------------ go-away


def test_after_go_away_a_new_call_gets_a_shutting_down_result() -> None:
    link = Link()
    link.open()
    assert (link.provider.going_away, link.consumer.peer_going_away) == (False, False)
    assert link.provider.going_away is False and link.consumer.peer_going_away is False
    link.provider.send_go_away("server shutting down")
    assert link.provider.going_away is True
    assert link.to_consumer() == [GoAwayReceived("server shutting down")]
    assert link.consumer.peer_going_away is True

    call_id = link.call("late")
    assert link.provider.pending_incoming == 0
    [answered] = link.to_consumer()
    assert isinstance(answered, ResultReceived)
    assert answered.token == "late"
    assert answered.result.id == call_id
    assert answered.result.error.type == "backchannel.ShuttingDown"
    assert answered.result.error.code == pb.UNAVAILABLE
    message = "shutting down: this side accepts no new calls on this stream"
    assert answered.result.error.message == message


def test_go_away_lets_running_calls_finish() -> None:
    link = Link()
    link.open()
    call_id = link.call("early")
    link.provider.send_go_away("draining")
    link.provider.send_result(ok(call_id))
    events = link.to_consumer()
    assert events[-1] == ResultReceived(ok(call_id), "early")


def test_go_away_is_sent_once() -> None:
    link = Link()
    link.open()
    link.provider.send_go_away("first")
    link.provider.send_go_away("second")
    assert kinds(link.provider.take_outbox()) == ["go_away"]


# ------------------------------------------------------------------ connection lost


def test_connection_lost_returns_pending_tokens_and_running_ids() -> None:
    link = Link()
    link.open()
    link.consumer.send_call(make_call(), "a")
    link.consumer.send_call(make_call(), "b")
    link.to_provider()
    callback_id = link.provider.send_call(pb.Call(callback_id=1, method="changed"), "cb")
    link.to_consumer()

    tokens, running = link.consumer.connection_lost(StreamBroken("reset"))
    assert sorted(tokens) == ["a", "b"]
    assert running == [callback_id]
    assert link.consumer.state is State.CLOSED
    assert (link.consumer.pending_outgoing, link.consumer.pending_incoming) == (0, 0)
    assert link.consumer.connection_lost(StreamBroken("again")) == ([], [])


def test_after_connection_lost_sending_raises_the_stored_cause_type() -> None:
    link = Link()
    link.open()
    link.consumer.connection_lost(StreamBroken("peer reset the stream"))
    with pytest.raises(StreamBroken, match="peer reset the stream") as raised:
        link.consumer.send_call(make_call(), "token")
    assert isinstance(raised.value.__cause__, StreamBroken)
    with pytest.raises(StreamBroken):  # sticky: every later send fails the same way
        link.consumer.send_call(make_call(), "token")


def test_after_connection_lost_by_a_foreign_cause_sending_is_a_local_error() -> None:
    link = Link()
    link.open()
    link.consumer.connection_lost(RuntimeError("boom"))
    with pytest.raises(LocalProtocolError, match="closed.*boom"):
        link.consumer.send_call(make_call(), "token")


def test_after_connection_lost_the_error_says_what_could_not_be_sent() -> None:
    """The text a caller sees when its call meets a stream that is gone."""
    link = Link()
    link.open()
    link.consumer.connection_lost(StreamBroken("peer reset the stream"))
    with pytest.raises(StreamBroken) as raised:
        link.consumer.send_call(make_call(), "token")
    assert str(raised.value) == "cannot send call: peer reset the stream"

    consumer: Connection[str] = Connection(Role.CONSUMER)
    consumer.connection_lost(RuntimeError("boom"))
    with pytest.raises(LocalProtocolError) as local:
        consumer.start()
    assert str(local.value) == "cannot send hello: the stream is closed (boom)"
    with pytest.raises(LocalProtocolError) as local:
        consumer.send_call(make_call(), "token")
    assert str(local.value) == "cannot send call: the stream is closed (boom)"


class _Unserializable:
    """A call whose serializing fails (a real ``pb.Call`` fails only past 2 GB)."""

    id = 0
    one_way = False

    def SerializeToString(self) -> bytes:
        raise ValueError("cannot serialize this call")


def test_a_call_that_cannot_be_serialized_is_not_sent_and_takes_no_id() -> None:
    """docs/reliability.md: "a Call that cannot be serialized at all registers nothing"."""
    link = Link()
    link.open()
    assert link.consumer.send_call(make_call(), "first") == 1
    bad = _Unserializable()
    with pytest.raises(ValueError, match="cannot serialize this call"):
        link.consumer.send_call(bad, "bad")  # type: ignore[arg-type]
    assert bad.id == 0  # it was not sent, so it has no id
    assert link.consumer.pending_outgoing == 1  # and nothing waits for its result
    assert link.consumer.send_call(make_call(), "next") == 2  # its id was not used up
    assert [frame.call.id for frame in link.consumer.take_outbox()] == [1, 2]


def test_after_connection_lost_receive_and_quiet_sends_do_nothing() -> None:
    link = Link()
    link.open()
    call_id = link.call()
    link.consumer.send_call(make_call(), "unsent")  # left in the outbox
    link.provider.connection_lost(StreamBroken("gone"))
    link.consumer.connection_lost(StreamBroken("gone"))
    assert link.consumer.take_outbox() == []

    assert feed(link.provider, call_frame(50), pb.Frame(), hello()) == []
    link.provider.send_result(ok(call_id))
    link.provider.send_go_away("bye")
    link.provider.send_release(1)
    assert link.provider.take_outbox() == []
    assert link.provider.state is State.CLOSED


# ------------------------------------------------------------------ purity


def _imports(path: Path) -> set[str]:
    """Every module name an import statement in ``path`` names (``from a import b``: a, a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            assert node.module is not None
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _imported_closure(module: str) -> dict[str, set[str]]:
    """Imports of ``module`` and of every backchannel module it reaches, by file.

    Found without importing anything: importing ``backchannel`` runs its ``__init__``,
    which imports grpc on purpose. That package ``__init__`` is left out of the walk.
    """
    spec = importlib.util.find_spec("backchannel")  # a top-level spec imports nothing
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    seen: dict[str, set[str]] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")[1:]
        for path in (
            root.joinpath(*parts).with_suffix(".py"),
            root.joinpath(*parts, "__init__.py"),
        ):
            if parts and path.is_file() and str(path) not in seen:
                seen[str(path)] = found = _imports(path)
                todo += [n for n in found if n.split(".")[0] == "backchannel"]
    return seen


def _top_levels(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_protocol_imports_neither_asyncio_nor_grpc() -> None:
    closure = _imported_closure("backchannel.wire.protocol")
    scanned = {Path(path).name for path in closure}
    assert {"protocol.py", "errors.py", "envelope_pb2.py"} <= scanned
    for path, names in closure.items():
        assert not _top_levels(names) & {"asyncio", "grpc", "trio", "anyio"}, path
        assert not any(name.startswith("grpc") for name in _top_levels(names)), path


def test_the_import_scan_does_see_asyncio_and_grpc() -> None:
    uses_both = _top_levels(
        set().union(*_imported_closure("backchannel.transport.grpcio.serving").values())
    )
    assert {"asyncio", "grpc"} <= uses_both
