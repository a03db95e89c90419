"""The envelope protocol as a sans-I/O state machine, one per side of a Connect stream.

Feed it the frames that arrive (:meth:`Connection.receive`) and tell it what this side
wants to send (:meth:`Connection.send_call`, :meth:`Connection.send_result`, ...); it
keeps track of call ids, pending results and the handshake, returns :mod:`events
<backchannel.wire.events>` to act on, and collects the frames to write, serialized, in an outbox
(:meth:`Connection.take_encoded`). It does no I/O and imports neither asyncio nor grpc,
so it is tested by feeding it lists of frames.

A mistake by the peer never breaks the stream: it is answered with a ``Fault`` frame (or
an error ``Result`` when it concerns one call) and reported as :class:`PeerMistake`. A
mistake by this side raises :class:`LocalProtocolError`. Once the stream is lost the
connection is ``CLOSED`` for good and every later send raises the stored cause.

The events (:mod:`backchannel.wire.events`) and the roles, states and transition table
(:mod:`backchannel.wire.transitions`) have modules of their own; they are re-exported here,
with :class:`Connection`, as the protocol's one import.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any, Generic

from backchannel.errors import LocalProtocolError, TransportError
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import frames
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
from backchannel.wire.text import sendable_text
from backchannel.wire.transitions import ACCEPTS, MOVES, Role, State

__all__ = [
    "PROTOCOL_VERSION",
    "CallReceived",
    "CancelReceived",
    "Connection",
    "Event",
    "FaultReceived",
    "GoAwayReceived",
    "HandshakeDone",
    "PeerMistake",
    "ReleaseReceived",
    "ResultReceived",
    "Role",
    "State",
    "Token",
    "Unparseable",
    "error_result",
]

PROTOCOL_VERSION = 1


class Connection(Generic[Token]):
    """One side of one Connect stream.

    ``Token`` is whatever the transport wants back when a call's result arrives (a
    future, typically).
    """

    def __init__(
        self,
        role: Role,
        application: str = "",
        services: tuple[pb.ServiceInfo, ...] = (),
        max_calls_in_flight: int = 0,
        max_message_size: int = 0,
    ) -> None:
        self.role = role
        #: calls from the peer this side runs at once; more are refused (0: no limit)
        self.max_calls_in_flight = max_calls_in_flight
        #: the largest frame this side accepts, as told to the peer (0: not stated)
        self.max_message_size = max_message_size
        self.state = State.HANDSHAKE
        self.application = application
        self.services = services
        #: the peer said go-away: send it no new calls
        self.peer_going_away = False
        #: this side said go-away: new calls from the peer are refused
        self.going_away = False
        self._outbox: list[bytes] = []  # serialized frames, in order
        self._next_id = 1
        self._outgoing: dict[int, Token] = {}
        self._incoming: set[int] = set()
        # one-way calls from the peer still running, by id (a count: ids may repeat); they
        # hold an in-flight slot until the side running them calls one_way_done()
        self._one_way: dict[int, int] = {}
        self._one_way_count = 0
        # ids of calls the peer cancelled lately: a result for one is dropped quietly
        self._cancelled: collections.deque[int] = collections.deque(maxlen=4096)
        # ids of calls this side cancelled lately: a late result for one is dropped quietly
        self._abandoned: collections.deque[int] = collections.deque(maxlen=4096)
        self._closed_cause: BaseException | None = None
        self._accepts = ACCEPTS[(role, self.state)]

    # ------------------------------------------------------------- inspection

    @property
    def pending_outgoing(self) -> int:
        """How many calls this side sent and still awaits a result for."""
        return len(self._outgoing)

    @property
    def pending_incoming(self) -> int:
        """How many calls the peer sent that this side has not answered yet."""
        return len(self._incoming)

    @property
    def running_one_way(self) -> int:
        """How many one-way calls the peer sent are still running on this side."""
        return self._one_way_count

    def take_encoded(self) -> list[bytes]:
        """The frames to write, serialized, in order; empties the outbox."""
        frames, self._outbox = self._outbox, []
        return frames

    def take_outbox(self) -> list[pb.Frame]:
        """The frames to write, parsed back into messages, in order; empties the outbox.
        For looking at them (tests): a transport takes :meth:`take_encoded`."""
        return [pb.Frame.FromString(data) for data in self.take_encoded()]

    def _put(self, frame: pb.Frame) -> None:
        self._outbox.append(frame.SerializeToString())

    # ---------------------------------------------------------------- sending

    def start(self) -> None:
        """Consumer: queue the Hello that opens the stream."""
        self._check_can_send("hello")
        if self.role is not Role.CONSUMER:
            raise LocalProtocolError("only the consumer sends hello")
        hello = pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            application=self.application,
            max_calls_in_flight=self.max_calls_in_flight,
            max_message_size=self.max_message_size,
        )
        self._put(pb.Frame(hello=hello))

    def send_call(self, call: pb.Call, token: Token) -> int:
        """Queue a Call; assigns and returns its id. ``token`` returns with its result."""
        self._check_can_send("call")
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send a call in state {self.state.value!r}")
        call_id = self._next_id
        call.id = call_id
        try:  # before anything is registered: serializing may raise
            frame = frames.call_frame(call.SerializeToString())
        except BaseException:
            call.id = 0
            raise
        self._next_id += 1
        if not call.one_way:
            self._outgoing[call_id] = token
        self._outbox.append(frame)
        return call_id

    def send_result(self, result: pb.Result) -> None:
        """Queue the Result of a call the peer sent and this side has not answered yet."""
        if self._answering(result.id):
            self._outbox.append(frames.result_frame(result.SerializeToString()))

    def send_encoded_result(self, call_id: int, result: bytes) -> None:
        """:meth:`send_result` of a Result serialized already (a big value is serialized
        once, not copied into a Result and a Frame)."""
        if self._answering(call_id):
            self._outbox.append(frames.result_frame(result))

    def _answering(self, call_id: int) -> bool:
        """Whether a Result for ``call_id`` is to be sent; the call is answered from now."""
        if self.state is State.CLOSED:
            return False  # nobody is left to read it
        if call_id not in self._incoming:
            if call_id in self._cancelled:
                return False  # the peer cancelled it meanwhile and wants no result
            raise LocalProtocolError(f"no unanswered call with id {call_id} to send a result for")
        self._incoming.discard(call_id)
        return True

    def one_way_done(self, call_id: int) -> None:
        """A one-way call from the peer finished its work: its in-flight slot is free."""
        count = self._one_way.get(call_id, 0)
        if count == 0:
            return  # the stream ended meanwhile (or no such call): nothing to free
        if count == 1:
            del self._one_way[call_id]
        else:
            self._one_way[call_id] = count - 1
        self._one_way_count -= 1

    def send_cancel(self, call_id: int, reason: str) -> None:
        """Stop waiting for a call this side sent and ask the peer to stop running it."""
        if self._outgoing.pop(call_id, _MISSING) is _MISSING or self.state is State.CLOSED:
            return  # already answered: nothing to cancel
        self._abandoned.append(call_id)
        cancel = pb.Cancel(id=call_id, reason=sendable_text(reason))
        self._put(pb.Frame(cancel=cancel))

    def send_release(self, callback_id: int) -> None:
        """Queue a Release of a callback instance."""
        if self.state is State.OPEN:
            self._put(pb.Frame(release=pb.Release(callback_id=callback_id)))

    def send_go_away(self, reason: str) -> None:
        """Tell the peer this side accepts no new calls."""
        if self.state is State.CLOSED or self.going_away:
            return
        self.going_away = True
        self._put(pb.Frame(go_away=pb.GoAway(reason=sendable_text(reason))))

    def connection_lost(self, cause: BaseException) -> tuple[list[Token], list[int]]:
        """The stream ended. Returns (tokens of calls still awaiting a result, ids of
        calls from the peer still running); the connection is closed for good."""
        if self.state is State.CLOSED:
            return [], []
        self.state = State.CLOSED
        self._closed_cause = cause
        tokens = list(self._outgoing.values())
        running = sorted(self._incoming)
        self._outgoing.clear()
        self._incoming.clear()
        self._one_way.clear()
        self._one_way_count = 0
        self._outbox.clear()
        return tokens, running

    def _check_can_send(self, what: str) -> None:
        if self.state is State.CLOSED:
            cause = self._closed_cause
            if isinstance(cause, TransportError):
                raise type(cause)(f"cannot send {what}: {cause}") from cause
            raise LocalProtocolError(f"cannot send {what}: the stream is closed ({cause})")

    # -------------------------------------------------------------- receiving

    def receive(self, frame: pb.Frame) -> list[Event[Token]]:
        """Take one received frame; return what happened. Never raises for peer mistakes."""
        events: list[Event[Token]] = []
        self._receive(frame, events, nested=False)
        return events

    def receive_unparseable(
        self, size: int, reason: str, call_id: int = 0, one_way: bool = False, result_id: int = 0
    ) -> list[Event[Token]]:
        """Take a message that did not parse as a Frame: the peer is told, the stream goes
        on. A Call whose id could be read is answered with an error Result, and a Result
        for a call this side awaits fails that call: neither is lost."""
        events: list[Event[Token]] = []
        _on_unparseable(self, Unparseable(size, reason, call_id, one_way, result_id), events)
        return events

    def receive_batch(self, frames: Sequence[pb.Frame | Unparseable]) -> list[Event[Token]]:
        """Take a Batch that was split and its frames parsed one by one (it did not parse
        as a whole): as :meth:`receive` would take it, each unparseable frame costing only
        itself."""
        events: list[Event[Token]] = []
        if self.state is not State.CLOSED and "batch" not in self._accepts:
            self._refuse(pb.Frame(batch=pb.Batch()), "batch", events)
            return events
        for frame in frames:
            if type(frame) is Unparseable:
                _on_unparseable(self, frame, events)
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
            for inner in frame.batch.frames:
                self._receive(inner, events, nested=True)
            return
        moved = MOVES.get((self.role, self.state, kind))
        try:
            _HANDLERS[kind](self, getattr(frame, kind), events)
        except _StayPut:
            return
        if moved is not None:
            self.state = moved
            self._accepts = ACCEPTS[(self.role, moved)]

    def _refuse(self, frame: pb.Frame, kind: str, events: list[Event[Token]]) -> None:
        if kind == "call" and self.state is State.HANDSHAKE:
            message = f"handshake required: send a hello frame before call {frame.call.id}"
            self._answer_call_error(frame.call, pb.FAILED_PRECONDITION, message, events)
            return
        where = "before the handshake" if self.state is State.HANDSHAKE else "after the handshake"
        self._mistake(events, f"unexpected {kind} frame {where} ({self.role.value} side)")

    def _mistake(self, events: list[Event[Token]], message: str, call_id: int = 0) -> None:
        fault = pb.Fault(message=sendable_text(message), call_id=call_id)
        self._put(pb.Frame(fault=fault))
        events.append(PeerMistake(message))

    def _answer_call_error(
        self, call: pb.Call, code: int, message: str, events: list[Event[Token]]
    ) -> None:
        events.append(PeerMistake(message))
        if call.id and not call.one_way:
            result = error_result(call.id, code, "backchannel.RemoteProtocolError", message)
            self._put(pb.Frame(result=result))


class _StayPut(Exception):
    """Raised by a handler to keep the state where it is."""


_MISSING = object()


# --------------------------- one handler per frame kind, and one for what did not parse


def _on_hello(connection: Connection[Token], hello: pb.Hello, events: list[Event[Token]]) -> None:
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
    events.append(
        HandshakeDone(hello.application, (), hello.max_calls_in_flight, hello.max_message_size)
    )


def _on_welcome(
    connection: Connection[Token], welcome: pb.Welcome, events: list[Event[Token]]
) -> None:
    services = tuple(welcome.services)
    limits = (welcome.max_calls_in_flight, welcome.max_message_size)
    events.append(HandshakeDone(welcome.application, services, *limits))


def _on_call(connection: Connection[Token], call: pb.Call, events: list[Event[Token]]) -> None:
    if call.id == 0:
        connection._mistake(events, "call id 0 is not allowed: give every call a non-zero id")
    elif call.id in connection._incoming:
        message = f"duplicate call id {call.id}: a call with this id is still running"
        connection._mistake(events, message, call.id)
    elif (
        0 < connection.max_calls_in_flight <= len(connection._incoming) + connection._one_way_count
    ):
        what = "one-way call" if call.one_way else "call"
        message = (
            f"too many calls in flight on this stream: this side runs at most "
            f"{connection.max_calls_in_flight} at once, one-way calls included "
            f"({what} {call.id} refused)"
        )
        if call.one_way:  # nothing to answer: the peer hears of it by a Fault
            connection._mistake(events, message, call.id)
        else:
            connection._answer_call_error(call, pb.RESOURCE_EXHAUSTED, message, events)
    elif connection.going_away:
        if not call.one_way:
            message = "shutting down: this side accepts no new calls on this stream"
            result = error_result(call.id, pb.UNAVAILABLE, "backchannel.ShuttingDown", message)
            connection._put(pb.Frame(result=result))
    else:
        if call.one_way:
            connection._one_way[call.id] = connection._one_way.get(call.id, 0) + 1
            connection._one_way_count += 1
        else:
            connection._incoming.add(call.id)
        events.append(CallReceived(call))


def _on_result(
    connection: Connection[Token], result: pb.Result, events: list[Event[Token]]
) -> None:
    token = connection._outgoing.pop(result.id, _MISSING)
    if token is _MISSING and result.id in connection._abandoned:
        return  # a late result of a call this side cancelled: an ordinary race
    if token is _MISSING:
        message = f"result for unknown call id {result.id} (never sent, answered or cancelled)"
        connection._mistake(events, message, result.id)
        return
    events.append(ResultReceived(result, token))  # type: ignore[arg-type]


def _on_cancel(
    connection: Connection[Token], cancel: pb.Cancel, events: list[Event[Token]]
) -> None:
    if cancel.id in connection._incoming:  # else it already finished: nothing to do
        connection._incoming.discard(cancel.id)  # the peer wants no result: the slot is free
        connection._cancelled.append(cancel.id)
        events.append(CancelReceived(cancel.id, cancel.reason))


def _on_release(
    connection: Connection[Token], release: pb.Release, events: list[Event[Token]]
) -> None:
    events.append(ReleaseReceived(release.callback_id))


def _on_go_away(
    connection: Connection[Token], go_away: pb.GoAway, events: list[Event[Token]]
) -> None:
    connection.peer_going_away = True
    events.append(GoAwayReceived(go_away.reason))


def _on_fault(connection: Connection[Token], fault: pb.Fault, events: list[Event[Token]]) -> None:
    events.append(FaultReceived(fault.message, fault.call_id))


def _on_unparseable(
    connection: Connection[Token], piece: Unparseable, events: list[Event[Token]]
) -> None:
    """What did not parse as a Frame: the peer is told, and a call or result it holds is
    answered or failed (see :meth:`Connection.receive_unparseable`)."""
    if connection.state is State.CLOSED:
        return
    what = f"a message of {piece.size} bytes is not a backchannel.v1.Frame ({piece.reason})"
    call_id = piece.call_id
    if call_id and not piece.one_way and call_id not in connection._incoming:
        message = f"call {call_id} could not be read: {what}"
        connection._answer_call_error(pb.Call(id=call_id), pb.INVALID_ARGUMENT, message, events)
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
_HANDLERS: dict[str, Callable[[Connection[Any], Any, list[Event[Any]]], None]] = {
    "hello": _on_hello,
    "welcome": _on_welcome,
    "call": _on_call,
    "result": _on_result,
    "cancel": _on_cancel,
    "release": _on_release,
    "go_away": _on_go_away,
    "fault": _on_fault,
}
