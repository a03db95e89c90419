"""The calling part of a :class:`~backchannel.transport.session.Session`: the table of
this side's outgoing calls and their deadlines.

A call is sent at once, or waits for one of the in-flight slots the peer allows; it is
in the table until its Result comes, it expires or it is abandoned, and a waiting one is
sent as a slot frees. The call tree (which outgoing call was made during which incoming
one) lets the peer's re-entrant calls be told apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from backchannel.errors import DeadlineExceeded, MessageTooLarge
from backchannel.transport import observe
from backchannel.transport.handoff import Deferred
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec

if TYPE_CHECKING:
    import collections

    from backchannel.transport.deadlines import Deadlines, Entry
    from backchannel.wire.protocol import Connection

#: a call that waited for an in-flight slot is sent only while more than this share of
#: its timeout is left: a peer that holds its slots until calls expire then gets at most
#: ten calls per slot per timeout, not every call that waited (each sent, then cancelled)
MIN_TIME_LEFT_TO_SEND = 0.1
#: waiting calls (expired or cancelled ones included) held before the queue is compacted
COMPACT_WAITING_AT = 4096

Future = asyncio.Future[Any]


class Sink(Protocol):
    """Where a call's outcome goes: its future, or (a Multicast's target started by
    ``gather``) something that takes the outcome at once, without a future's done-callback
    and its extra turn of the loop."""

    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...
    def cancel(self) -> bool: ...


#: turns a call's Result into what its caller gets (raising what it should raise), or
#: into a Deferred when it finishes the decoding off the loop
Decode = Callable[[pb.Result], Any]
#: turns the error of a stream that ended under a call into the one its caller gets
Broken = Callable[[BaseException], BaseException]


class Calls:
    """Sends this side's calls and keeps the table of those awaiting a Result: a part of
    :class:`~backchannel.transport.session.Session`, whose ``__init__`` sets up the state
    below."""

    # declared for the type checker only: at run time a stub here would hide the part
    # of the Session that defines the method
    if TYPE_CHECKING:
        # the table's state
        _sent: dict[int, Outgoing]
        _deadlines: Deadlines
        _waiting: collections.deque[Outgoing]
        _compact_waiting_at: int
        _outgoing_parent: dict[int, int]
        _incoming_parent: dict[int, int]
        # what it uses of the rest of the session
        connection: Connection[Outgoing]
        _loop: asyncio.AbstractEventLoop
        _queue: list[bytes]
        _writable: asyncio.Event
        _backlog_hold: asyncio.Event | None
        _handling: bool
        _peer_max_calls: int
        _peer_max_message: int

        def flush(self) -> None: ...
        def _write_now(self) -> None: ...
        def _wake_reader(self) -> None: ...

    def start_call(
        self,
        call: pb.Call,
        timeout: float | None,
        parent: int = 0,
        label: str = "",
        decode: Decode | None = None,
        broken: Broken | None = None,
    ) -> Future:
        """Send a call (now, or as soon as the in-flight limit allows); return a future
        for its Result, or for what ``decode`` makes of it (without another loop turn).
        If the stream ends under it, it fails with the error, or what ``broken`` makes of
        it.

        ``parent`` is the id of the incoming call this one is made during (0: none). On
        timeout the future fails with DeadlineExceeded and the peer gets a Cancel. A call
        over the peer's message size limit raises MessageTooLarge before anything is sent.
        """
        label = label or call_name(call)
        size = call.ByteSize()
        if size > self._peer_max_message:
            raise self._too_large(label, size)
        if parent:
            call.parent_id = parent
        future = self._loop.create_future()
        outgoing = Outgoing(call, future, label, timeout, decode, broken)
        if observe.AVAILABLE and observe.collecting():  # the client span, its context
            observe.sending(self, call, future)
        if timeout is not None:
            outgoing.deadline = self._deadlines.add(outgoing, timeout)
        if (
            self._waiting
            or self.connection.pending_outgoing >= self._peer_max_calls
            or not self._writable.is_set()
        ):
            self._wait_for_a_slot(outgoing)
        else:
            try:
                self._send(outgoing)
            except BaseException:  # not sent: nothing of it may stay behind
                outgoing.settle()
                raise
        return future

    def _too_large(self, label: str, size: int) -> MessageTooLarge:
        """The error for a call of ``size`` bytes over the peer's message size limit."""
        return MessageTooLarge(
            f"{label}: the call is {size} bytes, over the message size limit of "
            f"{self._peer_max_message} bytes (max_message_size)"
        )

    def _send(self, outgoing: Outgoing) -> None:
        call = outgoing.call
        call_id = outgoing.id = self.connection.send_call(call, outgoing)
        if self.connection.pending_outgoing <= 1 and not self._queue and not self._handling:
            self._write_now()  # a lone call (a sequential caller): nothing to batch it with
        else:
            self.flush()
        if call.one_way:
            outgoing.resolve(pb.Result(id=call_id, value=codec.NULL))
            return
        self._sent[call_id] = outgoing
        if self._backlog_hold is not None:  # the reader must read its result
            self._wake_reader()
        if call.parent_id:
            self._outgoing_parent[call_id] = call.parent_id

    def _wait_for_a_slot(self, outgoing: Outgoing) -> None:
        """Back-pressure: queue a call until one in flight finishes. Calls that expire or
        are cancelled while they wait are dropped when the queue doubles (amortized O(1)),
        so a peer that never frees a slot does not make the queue grow without bound."""
        waiting = self._waiting
        waiting.append(outgoing)
        if len(waiting) > self._compact_waiting_at:
            live = [kept for kept in waiting if not kept.future.done()]
            waiting.clear()
            waiting.extend(live)
            self._compact_waiting_at = max(COMPACT_WAITING_AT, 2 * len(live))

    def _admit(self) -> None:
        """Send waiting calls while the in-flight limit allows. A call whose time ran
        (nearly) out while it waited fails here and is never sent: sending it would only
        add a Cancel, and when its peer's slots free up as calls expire, every waiting
        call would be sent and cancelled in turn."""
        now = self._loop.time()
        while (
            self._waiting
            and self.connection.pending_outgoing < self._peer_max_calls
            and self._writable.is_set()
        ):
            outgoing = self._waiting.popleft()
            if outgoing.future.done():  # it expired or was cancelled waiting
                continue
            entry = outgoing.deadline
            timeout = outgoing.timeout
            if (
                entry is not None
                and timeout
                and entry.deadline - now <= (MIN_TIME_LEFT_TO_SEND * timeout)
            ):
                outgoing.settle()
                outgoing.future.set_exception(
                    DeadlineExceeded(
                        f"{outgoing.label} was not sent: it waited for one of the "
                        f"{self._peer_max_calls} calls the peer runs at once "
                        f"(max_calls_in_flight) until less than a tenth of its {timeout} s "
                        "timeout was left"
                    )
                )
                continue
            try:
                self._send(outgoing)
            except Exception as exc:  # its caller hears of it, not the reader running this
                outgoing.settle()
                outgoing.future.set_exception(exc)

    def _finished(self, call_id: int) -> None:
        """An outgoing call is over (answered, expired, cancelled): free its slot."""
        outgoing = self._sent.pop(call_id, None)
        if outgoing is not None:
            outgoing.settle()
        if self._outgoing_parent:
            self._outgoing_parent.pop(call_id, None)
        if self._waiting:
            self._admit()

    def _expire(self, outgoing: Outgoing | list[Outgoing]) -> None:
        if type(outgoing) is list:  # a Multicast's group: those of its calls still waiting
            for member in outgoing:
                if member.deadline is not None:
                    self._expire(member)
            return
        assert type(outgoing) is Outgoing
        outgoing.deadline = None
        if outgoing.id:
            self.abandon(outgoing.id, f"deadline of {outgoing.timeout} s exceeded")
        if not outgoing.future.done():
            outgoing.future.set_exception(
                DeadlineExceeded(f"{outgoing.label} did not finish within {outgoing.timeout} s")
            )

    def abandon(self, call_id: int, reason: str) -> None:
        """Stop waiting for an outgoing call and tell the peer to stop running it."""
        self.connection.send_cancel(call_id, reason)
        self.flush()
        self._finished(call_id)

    def awaits(self, call_id: int) -> bool:
        """True while this side waits for the answer to its outgoing call ``call_id``."""
        return call_id in self._sent

    def ancestors(self, parent_id: int) -> set[int]:
        """The incoming calls up the chain from an outgoing call ``parent_id``."""
        chain: set[int] = set()
        incoming = self._outgoing_parent.get(parent_id, 0)
        while incoming and incoming not in chain:
            chain.add(incoming)
            incoming = self._outgoing_parent.get(self._incoming_parent.get(incoming, 0), 0)
        return chain


class Outgoing:
    """A call this side sends: waiting for a slot, then for its result. A target of a
    Multicast holds the call it shares with the others, its own id, and its share of the
    group's deadline."""

    __slots__ = ("broken", "call", "deadline", "decode", "future", "id", "label", "timeout")

    def __init__(
        self,
        call: pb.Call,
        future: Sink,
        label: str,
        timeout: float | None,
        decode: Decode | None = None,
        broken: Broken | None = None,
    ) -> None:
        self.call = call
        self.future = future
        self.label = label
        self.timeout = timeout
        self.decode = decode
        self.broken = broken
        self.deadline: Entry | None = None
        #: its call id once sent (0 until then)
        self.id = 0

    def fail_lost(self, cause: BaseException) -> None:
        """The stream ended under it: fail it with (a copy of) ``cause``, or with what
        ``broken`` makes of that."""
        if not self.future.done():
            error = type(cause)(str(cause))
            self.future.set_exception(self.broken(error) if self.broken else error)

    def resolve(self, result: pb.Result) -> None:
        """Its Result arrived: settle the future with it (or what ``decode`` makes of it)."""
        self.settle()
        if self.future.done():
            return
        if self.decode is None:
            self.future.set_result(result)
            return
        try:
            value = self.decode(result)
        except Exception as exc:
            self.future.set_exception(exc)
        else:
            if type(value) is Deferred:
                value.future.add_done_callback(self._deferred_done)
            else:
                self.future.set_result(value)

    def _deferred_done(self, done: Future) -> None:
        if self.future.done():
            return
        if done.cancelled():
            self.future.cancel()
        elif (exc := done.exception()) is not None:
            self.future.set_exception(exc)
        else:
            self.future.set_result(done.result())

    def settle(self) -> None:
        """Drop its deadline: the outcome is known or no longer awaited."""
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None


def call_name(call: pb.Call) -> str:
    """A call in words, for messages: ``Service.method`` or ``callback 7.method``."""
    if call.callback_id:
        return f"callback {call.callback_id}.{call.method}"
    return f"{call.service}.{call.method}"
