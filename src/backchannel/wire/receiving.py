"""The receiving half of a :class:`~backchannel.wire.protocol.Connection`: what each frame
the peer sends does to the connection, and what it reports.

One plain function per frame kind (:data:`_HANDLERS`), plus the handling of what did not
parse and of a Multicast's targets, each checked exactly as the Call it stands for. A
mistake by the peer never raises: it is answered with a Fault (or an error Result when it
concerns one call) and reported as :class:`~backchannel.wire.events.PeerMistake`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic

from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire.events import (
    CallReceived,
    CancelReceived,
    Event,
    FaultReceived,
    GoAwayReceived,
    HandshakeDone,
    PeerMistake,
    ReleaseReceived,
    ResultReceived,
    Token,
    Unparseable,
    error_result,
)
from backchannel.wire.one_way import _REFUSED, _RUN, _WAIT, admit_one_way
from backchannel.wire.slices import MULTICAST_BUDGET_MESSAGES, Piece, Targets, multicast_budget
from backchannel.wire.text import sendable_text
from backchannel.wire.transitions import ACCEPTS, MOVES, Role, State

if TYPE_CHECKING:
    import collections

PROTOCOL_VERSION = 1


class Receiving(Generic[Token]):
    """Takes what the peer sent: a part of :class:`~backchannel.wire.protocol.Connection`,
    whose ``__init__`` sets up the state below."""

    # declared for the type checker only: the Connection defines them
    if TYPE_CHECKING:
        role: Role
        state: State
        application: str
        services: tuple[pb.ServiceInfo, ...]
        max_calls_in_flight: int
        max_message_size: int
        going_away: bool
        peer_going_away: bool
        accepts_multicast: bool
        peer_accepts_multicast: bool
        _outgoing: dict[int, Token]
        _incoming: set[int]
        _one_way: dict[int, int]
        _one_way_count: int
        one_way_waiting: int
        max_waiting_one_way: int
        _dropping_one_way: bool
        _told_going_away: bool
        _cancelled: collections.deque[int]
        _abandoned: collections.deque[int]
        _accepts: frozenset[str]

        def _put(self, frame: pb.Frame) -> None: ...
        def _wait_one_way(self, call: pb.Call) -> None: ...
        def _over_waiting_budget(self) -> bool: ...

    def receive(self, frame: pb.Frame) -> list[Event[Token]]:
        """Take one received frame; return what happened. Never raises for peer mistakes."""
        events: list[Event[Token]] = []
        self._receive(frame, events, nested=False)
        return events

    def receive_unparseable(
        self,
        size: int,
        reason: str,
        call_id: int = 0,
        one_way: bool = False,
        result_id: int = 0,
        targets: tuple[int, ...] = (),
    ) -> list[Event[Token]]:
        """Take a message that did not parse as a Frame: the peer is told, the stream goes
        on. A Call whose id could be read (or a Multicast's targets) is answered with an
        error Result, and a Result for a call this side awaits fails that call: neither
        is lost."""
        events: list[Event[Token]] = []
        piece = Unparseable(size, reason, call_id, one_way, result_id, targets)
        _on_unparseable(self, piece, events)
        return events

    def receive_batch(self, frames: Sequence[Piece]) -> list[Event[Token]]:
        """Take a Batch that was split and its frames parsed one by one (it did not parse
        as a whole), or one slice of a big Batch or Multicast (:mod:`.slices`): as
        :meth:`receive` would take it, each unparseable frame costing only itself."""
        events: list[Event[Token]] = []
        if self.state is not State.CLOSED and "batch" not in self._accepts:
            self._refuse(pb.Frame(batch=pb.Batch()), "batch", events)
            return events
        for frame in frames:
            if type(frame) is Unparseable:
                _on_unparseable(self, frame, events)
            elif type(frame) is Targets:
                if self.state is State.CLOSED:
                    return events
                if "multicast" not in self._accepts:
                    self._refuse(pb.Frame(), "multicast", events)
                else:
                    _targets(self, frame.multicast, frame.start, frame.stop, events)
            else:
                self._receive(frame, events, nested=True)  # type: ignore[arg-type]
        return events

    def _receive(self, frame: pb.Frame, events: list[Event[Token]], nested: bool) -> None:
        if self.state is State.CLOSED:
            return
        kind = frame.WhichOneof("kind")
        if kind is None:
            self._mistake(events, "frame with no kind set (an unknown frame kind?)")
            return
        if kind not in self._accepts:
            self._refuse(frame, kind, events)
            return
        if kind == "batch":
            if nested:
                self._mistake(
                    events, "a batch inside a batch is not allowed; its frames were dropped"
                )
                return
            # Results (most of what a provider gets back from a fan-out) are taken here
            # directly while nothing else of the batch changed the state: the same as
            # _on_result, without the dispatch per frame
            fast = self._takes_results_directly()
            outgoing = self._outgoing
            for inner in frame.batch.frames:
                if fast and inner.WhichOneof("kind") == "result":
                    result = inner.result
                    token = outgoing.pop(result.id, _MISSING)
                    if token is not _MISSING:
                        events.append(ResultReceived(result, token))  # type: ignore[arg-type]
                    else:
                        _on_result(self, result, events)
                    continue
                self._receive(inner, events, nested=True)
                fast = self._takes_results_directly()
            return
        moved = MOVES.get((self.role, self.state, kind))
        try:
            _HANDLERS[kind](self, getattr(frame, kind), events)
        except _StayPut:
            return
        if moved is not None:
            self.state = moved
            self._accepts = ACCEPTS[(self.role, moved)]

    def _takes_results_directly(self) -> bool:
        """Whether a Result now is taken by :func:`_on_result` with no change of state."""
        return (
            self.state is not State.CLOSED
            and "result" in self._accepts
            and (self.role, self.state, "result") not in MOVES
        )

    def _refuse(self, frame: pb.Frame, kind: str, events: list[Event[Token]]) -> None:
        if kind == "call" and self.state is State.HANDSHAKE:
            call = frame.call
            if self.role is Role.PROVIDER:
                message = f"handshake required: send a hello frame before call {call.id}"
            else:  # a provider's Call before its Welcome
                message = f"handshake required: send the welcome frame before call {call.id}"
            if call.one_way:  # no Result to answer with: a Fault names it
                what = f"{message} (one-way call {call.id} dropped)"
                self._mistake(events, what, call.id)
            else:
                self._answer_call_error(call.id, False, pb.FAILED_PRECONDITION, message, events)
            return
        where = "before the handshake" if self.state is State.HANDSHAKE else "after the handshake"
        self._mistake(events, f"unexpected {kind} frame {where} ({self.role.value} side)")

    def _mistake(self, events: list[Event[Token]], message: str, call_id: int = 0) -> None:
        fault = pb.Fault(message=sendable_text(message), call_id=call_id)
        self._put(pb.Frame(fault=fault))
        events.append(PeerMistake(message))

    def _answer_call_error(
        self, call_id: int, one_way: bool, code: int, message: str, events: list[Event[Token]]
    ) -> None:
        events.append(PeerMistake(message))
        if call_id and not one_way:
            result = error_result(call_id, code, "backchannel.RemoteProtocolError", message)
            self._put(pb.Frame(result=result))


class _StayPut(Exception):
    """Raised by a handler to keep the state where it is."""


_MISSING = object()


# --------------------------- one handler per frame kind, and one for what did not parse


def _on_hello(connection: Receiving[Token], hello: pb.Hello, events: list[Event[Token]]) -> None:
    if hello.protocol_version > PROTOCOL_VERSION:
        message = (
            f"unsupported protocol version {hello.protocol_version}; "
            f"this provider speaks {PROTOCOL_VERSION}"
        )
        connection._mistake(events, message)
        raise _StayPut
    welcome = pb.Welcome(
        protocol_version=PROTOCOL_VERSION,
        application=connection.application,
        services=connection.services,
        max_calls_in_flight=connection.max_calls_in_flight,
        max_message_size=connection.max_message_size,
    )
    connection._put(pb.Frame(welcome=welcome))
    connection.peer_accepts_multicast = hello.accepts_multicast
    events.append(
        HandshakeDone(hello.application, (), hello.max_calls_in_flight, hello.max_message_size)
    )


def _on_welcome(
    connection: Receiving[Token], welcome: pb.Welcome, events: list[Event[Token]]
) -> None:
    services = tuple(welcome.services)
    limits = (welcome.max_calls_in_flight, welcome.max_message_size)
    events.append(HandshakeDone(welcome.application, services, *limits))


def _on_call(connection: Receiving[Token], call: pb.Call, events: list[Event[Token]]) -> None:
    admitted = _admit(connection, call.id, call.one_way, events)
    if admitted == _RUN:
        events.append(CallReceived(call))
    elif admitted == _WAIT:
        connection._wait_one_way(call)


def _admit(
    connection: Receiving[Token], call_id: int, one_way: bool, events: list[Event[Token]]
) -> int:
    """Whether the peer's call ``call_id`` may run (:data:`_RUN`: it is counted in flight
    from now), must wait for a slot (:data:`_WAIT`: a one-way call past the limit), or
    was refused (:data:`_REFUSED`: the peer is told why, by a Fault or an error Result)."""
    if call_id == 0:
        connection._mistake(events, "call id 0 is not allowed: give every call a non-zero id")
    elif call_id in connection._incoming:
        message = f"duplicate call id {call_id}: a call with this id is still running"
        connection._mistake(events, message, call_id)
    elif one_way:
        return admit_one_way(connection, call_id, events)
    elif 0 < connection.max_calls_in_flight <= len(connection._incoming):
        # one-way calls are counted apart: the sender cannot count them, so running ones
        # must not cost a sender that keeps to the limit the calls it paces
        message = (
            f"too many calls in flight on this stream: this side runs at most "
            f"{connection.max_calls_in_flight} at once (call {call_id} refused)"
        )
        connection._answer_call_error(call_id, one_way, pb.RESOURCE_EXHAUSTED, message, events)
    elif connection.going_away:
        message = "shutting down: this side accepts no new calls on this stream"
        result = error_result(call_id, pb.UNAVAILABLE, "backchannel.ShuttingDown", message)
        connection._put(pb.Frame(result=result))
    else:
        connection._incoming.add(call_id)
        return _RUN
    return _REFUSED


def _on_multicast(
    connection: Receiving[Token], multicast: pb.Multicast, events: list[Event[Token]]
) -> None:
    _targets(connection, multicast, 0, len(multicast.targets), events)


def _targets(
    connection: Receiving[Token],
    multicast: pb.Multicast,
    start: int,
    stop: int,
    events: list[Event[Token]],
) -> None:
    """Targets ``start`` to ``stop`` of a Multicast (all of it, or a slice of a big one:
    :mod:`~backchannel.wire.slices`), each taken exactly as the Call it stands for."""
    targets = multicast.targets
    if not targets:
        message = "a multicast with no targets: give it at least one (call id, callback id)"
        connection._mistake(events, message)
        return
    one_way = multicast.call.one_way
    if not connection.accepts_multicast:
        message = (
            "multicast frames were not negotiated: this consumer's hello did not set "
            "accepts_multicast; send it one call per callback"
        )
        if start == 0:
            connection._mistake(events, message)
        if not one_way:  # its calls are refused, not left to their deadlines
            for index in range(start, stop):
                if call_id := targets[index].id:
                    refused = error_result(
                        call_id, pb.FAILED_PRECONDITION, "backchannel.RemoteProtocolError", message
                    )
                    connection._put(pb.Frame(result=refused))
        return
    # the call is parsed back once per target: a Call of its own each, as if sent so;
    # so the targets past what the budget allows for a call of this size are refused
    template = multicast.call.SerializeToString()
    allowed = multicast_budget(connection.max_message_size) // max(1, len(template))
    if stop > allowed:
        _over_budget(connection, multicast, max(start, allowed), stop, len(template), events)
        stop = max(start, allowed)
    parse = pb.Call.FromString
    for index in range(start, stop):
        target = targets[index]
        call_id = target.id
        admitted = _admit(connection, call_id, one_way, events)
        if admitted:
            call = parse(template)
            call.id = call_id
            call.callback_id = target.callback_id
            if target.trace_context:
                call.trace_context.clear()
                call.trace_context.update(target.trace_context)
            if admitted == _RUN:
                events.append(CallReceived(call))
            else:
                connection._wait_one_way(call)


def _over_budget(
    connection: Receiving[Token],
    multicast: pb.Multicast,
    start: int,
    stop: int,
    size: int,
    events: list[Event[Token]],
) -> None:
    """Refuse targets ``start`` to ``stop``: past the bytes one Multicast may stand for
    (:func:`~backchannel.wire.slices.multicast_budget`). Each that wants a Result gets
    RESOURCE_EXHAUSTED, as a refused Call would; the peer is told once per slice."""
    budget = multicast_budget(connection.max_message_size)
    message = (
        f"multicast over budget: {len(multicast.targets)} targets of a {size}-byte call "
        f"stand for more than the {budget} bytes one multicast may ("
        f"{MULTICAST_BUDGET_MESSAGES} x max_message_size); this side takes the first "
        f"{budget // max(1, size)} and refuses the others"
    )
    targets = multicast.targets
    if multicast.call.one_way:  # nothing to answer: the peer hears of it by a Fault
        first = targets[start].id
        connection._mistake(events, f"{message} (one-way calls {first} and on)", first)
        return
    events.append(PeerMistake(message))
    incoming = connection._incoming
    put = connection._put
    for index in range(start, stop):
        call_id = targets[index].id
        if call_id and call_id not in incoming:  # else its running call must not be answered
            refused = error_result(
                call_id,
                pb.RESOURCE_EXHAUSTED,
                "backchannel.RemoteProtocolError",
                f"call {call_id} refused: {message}",
            )
            put(pb.Frame(result=refused))


def _on_result(connection: Receiving[Token], result: pb.Result, events: list[Event[Token]]) -> None:
    token = connection._outgoing.pop(result.id, _MISSING)
    if token is _MISSING and result.id in connection._abandoned:
        return  # a late result of a call this side cancelled: an ordinary race
    if token is _MISSING:
        message = f"result for unknown call id {result.id} (never sent, answered or cancelled)"
        connection._mistake(events, message, result.id)
        return
    events.append(ResultReceived(result, token))  # type: ignore[arg-type]


def _on_cancel(connection: Receiving[Token], cancel: pb.Cancel, events: list[Event[Token]]) -> None:
    if cancel.id in connection._incoming:  # else it already finished: nothing to do
        connection._incoming.discard(cancel.id)  # the peer wants no result: the slot is free
        connection._cancelled.append(cancel.id)
        events.append(CancelReceived(cancel.id, cancel.reason))


def _on_release(
    connection: Receiving[Token], release: pb.Release, events: list[Event[Token]]
) -> None:
    events.append(ReleaseReceived(release.callback_id))


def _on_go_away(
    connection: Receiving[Token], go_away: pb.GoAway, events: list[Event[Token]]
) -> None:
    connection.peer_going_away = True
    events.append(GoAwayReceived(go_away.reason))


def _on_fault(connection: Receiving[Token], fault: pb.Fault, events: list[Event[Token]]) -> None:
    events.append(FaultReceived(fault.message, fault.call_id))


def _on_unparseable(
    connection: Receiving[Token], piece: Unparseable, events: list[Event[Token]]
) -> None:
    """What did not parse as a Frame: the peer is told, and a call or result it holds is
    answered or failed (see :meth:`Connection.receive_unparseable`)."""
    if connection.state is State.CLOSED:
        return
    what = f"a message of {piece.size} bytes is not a backchannel.v1.Frame ({piece.reason})"
    if piece.targets:  # a Multicast: each target's call answered, as a lone Call's would be
        message = f"a multicast could not be read: {what}"
        connection._mistake(events, message)
        if not piece.one_way and connection.accepts_multicast:
            for target in piece.targets:
                if target not in connection._incoming:
                    failed = error_result(
                        target,
                        pb.INVALID_ARGUMENT,
                        "backchannel.RemoteProtocolError",
                        f"call {target} could not be read: {message}",
                    )
                    connection._put(pb.Frame(result=failed))
        return
    call_id = piece.call_id
    if call_id and not piece.one_way and call_id not in connection._incoming:
        message = f"call {call_id} could not be read: {what}"
        connection._answer_call_error(call_id, False, pb.INVALID_ARGUMENT, message, events)
    elif call_id and not piece.one_way:
        message = f"duplicate call id {call_id}: a call with this id is still running ({what})"
        connection._mistake(events, message, call_id)
    elif call_id:
        connection._mistake(events, f"one-way call {call_id} could not be read: {what}", call_id)
    elif piece.result_id and piece.result_id in connection._outgoing:
        token = connection._outgoing.pop(piece.result_id)
        connection._abandoned.append(piece.result_id)  # a later Result for it: dropped quietly
        message = f"the result of call {piece.result_id} could not be read: {what}"
        failed = error_result(
            piece.result_id, pb.INVALID_ARGUMENT, "backchannel.RemoteProtocolError", message
        )
        events.append(ResultReceived(failed, token))
        connection._mistake(events, message, piece.result_id)
    else:
        connection._mistake(events, what)


#: what acts on each kind of frame: plain functions taking the connection, not a table of
#: bound methods per connection (which would hold the connection in a reference cycle)
_HANDLERS: dict[str, Callable[[Receiving[Any], Any, list[Event[Any]]], None]] = {
    "hello": _on_hello,
    "welcome": _on_welcome,
    "call": _on_call,
    "result": _on_result,
    "cancel": _on_cancel,
    "release": _on_release,
    "go_away": _on_go_away,
    "fault": _on_fault,
    "multicast": _on_multicast,
}
