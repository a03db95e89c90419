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

What each received frame does is :mod:`backchannel.wire.receiving`'s (the Connection's
receiving half). The events (:mod:`backchannel.wire.events`) and the roles, states and
transition table (:mod:`backchannel.wire.transitions`) have modules of their own; they are
re-exported here, with :class:`Connection`, as the protocol's one import.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from backchannel.errors import LocalProtocolError, TransportError
from backchannel.settings import DEFAULT_MAX_QUEUED_BYTES, DEFAULT_MAX_WAITING_ONE_WAY
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
from backchannel.wire.receiving import PROTOCOL_VERSION, Receiving
from backchannel.wire.text import sendable_text
from backchannel.wire.transitions import ACCEPTS, Role, State

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


class Connection(Receiving[Token]):
    """One side of one Connect stream.

    ``Token`` is whatever the transport wants back when a call's result arrives (a
    future, typically). Receiving is :class:`~backchannel.wire.receiving.Receiving`'s.
    """

    def __init__(
        self,
        role: Role,
        application: str = "",
        services: tuple[pb.ServiceInfo, ...] = (),
        max_calls_in_flight: int = 0,
        max_message_size: int = 0,
        accepts_multicast: bool = True,
    ) -> None:
        self.role = role
        #: consumer: Multicast frames are taken (the Hello says so); provider: unused
        self.accepts_multicast = accepts_multicast and role is Role.CONSUMER
        #: provider: the consumer's Hello said it takes Multicast frames (send_multicast)
        self.peer_accepts_multicast = False
        #: calls from the peer this side runs at once, and one-way calls apart from them;
        #: more calls are refused, more one-way calls wait for a slot (0: no limit)
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
        # one-way calls from the peer past the in-flight limit wait here, in order, for a
        # slot (next_one_way): their sender cannot count them, so they are not refused.
        # Past max_waiting_one_way of them (or max_waiting_bytes) the transport stops
        # reading the peer; past twice that they are dropped, the peer told once
        self._waiting: collections.deque[pb.Call] = collections.deque()
        self._waiting_bytes = 0
        #: one-way calls from the peer waiting for an in-flight slot
        self.one_way_waiting = 0
        #: how many may wait (and their bytes) before the transport stops reading the peer
        self.max_waiting_one_way = DEFAULT_MAX_WAITING_ONE_WAY
        self.max_waiting_bytes = DEFAULT_MAX_QUEUED_BYTES
        self._dropping_one_way = False  # the peer was told its one-way calls are dropped
        self._told_going_away = False  # a one-way call after GoAway was Faulted once
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
            accepts_multicast=self.accepts_multicast,
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

    def send_multicast(
        self,
        call: pb.Call,
        callback_ids: Sequence[int],
        tokens: Sequence[Token],
        trace_contexts: Sequence[dict[str, str]] = (),
    ) -> int:
        """Provider: queue one Multicast of ``call`` to the callback instances
        ``callback_ids`` (at least one), a call id each; returns the first id (the others
        follow it). ``tokens`` (one per target) return with their results; a target's
        ``trace_contexts`` entry, when given, replaces the call's for it."""
        self._check_can_send("multicast")
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send a multicast in state {self.state.value!r}")
        if not self.peer_accepts_multicast:
            raise LocalProtocolError("the consumer did not say it accepts multicast frames")
        if not callback_ids:
            raise LocalProtocolError("a multicast needs at least one target")
        first = self._next_id
        targets = pb.Multicast()
        add = targets.targets.add
        if trace_contexts:
            pairs = zip(callback_ids, trace_contexts, strict=True)
            for offset, (callback_id, trace) in enumerate(pairs):
                add(id=first + offset, callback_id=callback_id, trace_context=trace)
        else:
            for offset, callback_id in enumerate(callback_ids):
                add(id=first + offset, callback_id=callback_id)
        # the call serialized once, beside its targets: not copied into the Multicast
        frame = frames.multicast_frame(call.SerializeToString(), targets.SerializeToString())
        self._next_id += len(callback_ids)
        if not call.one_way:
            outgoing = self._outgoing
            for offset, token in enumerate(tokens):
                outgoing[first + offset] = token
        self._outbox.append(frame)
        return first

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

    @property
    def one_way_full(self) -> bool:
        """Whether so many one-way calls wait for a slot that the peer should be held back
        (its stream not read) until half of them have started."""
        return (
            self.one_way_waiting >= self.max_waiting_one_way
            or self._waiting_bytes >= self.max_waiting_bytes
        )

    @property
    def one_way_drained(self) -> bool:
        """Whether at most half of :attr:`one_way_full`'s budget waits: read the peer again."""
        return (
            2 * self.one_way_waiting <= self.max_waiting_one_way
            and 2 * self._waiting_bytes <= self.max_waiting_bytes
        )

    def next_one_way(self) -> pb.Call | None:
        """The next one-way call waiting for an in-flight slot, if one is free: it runs
        from now (counted in flight until :meth:`one_way_done`), else None."""
        if not self._waiting or self.state is State.CLOSED:
            return None
        limit = self.max_calls_in_flight
        if 0 < limit <= self._one_way_count:
            return None
        call = self._waiting.popleft()
        self.one_way_waiting -= 1
        self._waiting_bytes -= call.ByteSize()
        if self._dropping_one_way and self.one_way_drained:
            self._dropping_one_way = False  # the next one dropped tells the peer again
        self._one_way[call.id] = self._one_way.get(call.id, 0) + 1
        self._one_way_count += 1
        return call

    def _wait_one_way(self, call: pb.Call) -> None:
        """Keep a one-way call from the peer until a slot frees (:meth:`next_one_way`)."""
        self._waiting.append(call)
        self.one_way_waiting += 1
        self._waiting_bytes += call.ByteSize()

    def _over_waiting_budget(self) -> bool:
        """Twice :attr:`one_way_full`'s budget waits: the peer was not held back (this
        side reads on while it awaits a result) and floods it; further ones are dropped."""
        return (
            self.one_way_waiting >= 2 * self.max_waiting_one_way
            or self._waiting_bytes >= 2 * self.max_waiting_bytes
        )

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
        self._waiting.clear()
        self.one_way_waiting = self._waiting_bytes = 0
        self._outbox.clear()
        return tokens, running

    def _check_can_send(self, what: str) -> None:
        if self.state is State.CLOSED:
            cause = self._closed_cause
            if isinstance(cause, TransportError):
                raise type(cause)(f"cannot send {what}: {cause}") from cause
            raise LocalProtocolError(f"cannot send {what}: the stream is closed ({cause})")


_MISSING = object()
