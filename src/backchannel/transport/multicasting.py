"""The multicasting part of a :class:`~backchannel.transport.session.Session` (provider):
one call to many callback instances of the consumer, sent as Multicast frames.

The call is serialized once per frame and each target is a call of its own in the table
of outgoing calls (:mod:`~backchannel.transport.outgoing`): its future (or sink), deadline,
in-flight slot and Result, as if sent alone; the targets sent together share one entry in
the deadline queue, which fails each of them still waiting when it expires. Targets beyond
the in-flight slots the consumer allows wait as single Calls, as any call does. A frame
holds no more targets than the consumer's budget for a call of its size allows
(:func:`~backchannel.wire.slices.multicast_budget`), nor more bytes than its
max_message_size: a big call to many listeners goes as several frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from backchannel.errors import MessageTooLarge
from backchannel.transport import observe
from backchannel.transport.outgoing import Decode, Outgoing, Sink
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec
from backchannel.wire.slices import multicast_budget

if TYPE_CHECKING:
    import asyncio
    import collections

    from backchannel.transport.deadlines import Deadlines
    from backchannel.wire.protocol import Connection

#: targets per Multicast frame: the consumer acts on that many calls in one go
MULTICAST_TARGETS = 500
#: bytes a target takes in a frame, at most: its ids, its length and tag; when traced, a
#: trace context entry adds its key and value and at most this much around them
_TARGET_BYTES = 24
_TRACE_ENTRY_BYTES = 13
#: bytes a Multicast frame takes beyond its call and targets, at most (tags and lengths)
_FRAME_BYTES = 16

#: (callback id, label, decode) of one target
Target = tuple[int, str, Decode | None]


class Multicasting:
    """Sends one call to many callback instances as Multicast frames: a part of
    :class:`~backchannel.transport.session.Session`, whose ``__init__`` sets up the state
    it uses."""

    # declared for the type checker only: the rest of the session defines them
    if TYPE_CHECKING:
        connection: Connection[Outgoing]
        _loop: asyncio.AbstractEventLoop
        _sent: dict[int, Outgoing]
        _deadlines: Deadlines
        _waiting: collections.deque[Outgoing]
        _outgoing_parent: dict[int, int]
        _writable: asyncio.Event
        _peer_max_calls: int
        _peer_max_message: int
        multicast_frames: int

        def flush(self) -> None: ...
        def _wait_for_a_slot(self, outgoing: Outgoing) -> None: ...
        def _too_large(self, label: str, size: int) -> MessageTooLarge: ...

    @property
    def multicast(self) -> bool:
        """True when the peer takes Multicast frames (it said so in its Hello)."""
        return self.connection.peer_accepts_multicast

    def start_multicast(
        self,
        call: pb.Call,
        targets: Sequence[Target],
        timeout: float | None,
        parent: int = 0,
        sinks: Sequence[Sink] | None = None,
    ) -> list[Sink]:
        """Send ``call`` to each target's callback instance; a future per target, in
        order, for its Result or what its ``decode`` makes of it (as
        :meth:`~backchannel.transport.outgoing.Calls.start_call` gives). The targets go
        in Multicast frames (the peer must take them: :attr:`multicast`), those beyond
        the in-flight slots wait as single Calls. A call over the peer's message size
        limit raises MessageTooLarge before anything is sent.

        ``sinks`` (one per target) take the outcomes instead of futures, and are what it
        returns then; unless telemetry makes a span per call, which needs a future each."""
        size = call.ByteSize()
        if size > self._peer_max_message:
            raise self._too_large(f"{targets[0][1]} and {len(targets) - 1} more", size)
        if parent:
            call.parent_id = parent
            size = call.ByteSize()
        room = 0
        if not self._waiting and self._writable.is_set():
            room = max(0, self._peer_max_calls - self.connection.pending_outgoing)
        traced = observe.AVAILABLE and observe.collecting()
        if traced or sinks is None:
            create_future = self._loop.create_future
            sinks = [create_future() for _ in targets]
        now: list[Outgoing] = []
        later: list[Outgoing] = []
        callback_ids: list[int] = []
        traces: list[dict[str, str]] = []
        for index, (callback_id, label, decode) in enumerate(targets):
            sink = sinks[index]
            if index < room:
                outgoing = Outgoing(call, sink, label, timeout, decode)
                now.append(outgoing)
                callback_ids.append(callback_id)
            else:
                outgoing = Outgoing(_alone(call, callback_id), sink, label, timeout, decode)
                later.append(outgoing)
            if traced:  # the target's client span, its context: a stand-in Call for it
                own = outgoing.call
                stand_in = own if own is not call else _alone(call, callback_id, args=False)
                observe.sending(self, stand_in, sink)  # type: ignore[arg-type]
                if own is call:
                    traces.append(dict(stand_in.trace_context))
        if timeout is not None:
            if now:  # sent together: one deadline for them all
                group = self._deadlines.add_group(now, timeout)
                for outgoing in now:
                    outgoing.deadline = group
            add_deadline = self._deadlines.add
            for outgoing in later:
                outgoing.deadline = add_deadline(outgoing, timeout)
        # as many targets a frame as the consumer's budget for a call of this size allows
        # (it refuses the others), in the room its max_message_size leaves
        most = min(MULTICAST_TARGETS, multicast_budget(self._peer_max_message) // max(1, size))
        room_bytes = self._peer_max_message - size - _FRAME_BYTES
        try:
            start = 0
            while start < len(now):
                stop = _frame_end(start, len(now), max(1, most), room_bytes, traces)
                self._send_multicast(
                    call, now[start:stop], callback_ids[start:stop], traces[start:stop]
                )
                start = stop
        except BaseException:  # not sent: nothing of them may stay behind
            for outgoing in now + later:
                if not outgoing.id:
                    outgoing.settle()
            raise
        for outgoing in later:  # after the others: calls to one instance keep their order
            self._wait_for_a_slot(outgoing)
        return list(sinks)

    def _send_multicast(
        self,
        call: pb.Call,
        outgoings: list[Outgoing],
        callback_ids: list[int],
        traces: list[dict[str, str]],
    ) -> None:
        first = self.connection.send_multicast(call, callback_ids, outgoings, traces)
        self.multicast_frames += 1
        self.flush()
        if call.one_way:
            for offset, outgoing in enumerate(outgoings):
                outgoing.id = first + offset
                outgoing.resolve(pb.Result(id=first + offset, value=codec.NULL))
            return
        sent = self._sent
        call_id = first
        for outgoing in outgoings:
            outgoing.id = call_id
            sent[call_id] = outgoing
            call_id += 1
        if call.parent_id:
            for offset in range(len(outgoings)):
                self._outgoing_parent[first + offset] = call.parent_id


def _frame_end(start: int, end: int, most: int, room: int, traces: list[dict[str, str]]) -> int:
    """Where the frame of the targets from ``start`` ends: after at most ``most`` of them
    (at least one), in ``room`` bytes, each target's trace context (if any) measured."""
    if not traces:
        return min(end, start + max(1, min(most, room // _TARGET_BYTES)))
    stop = start
    limit = min(end, start + most)
    while stop < limit:
        need = _TARGET_BYTES
        for key, value in traces[stop].items():
            need += len(key.encode()) + len(value.encode()) + _TRACE_ENTRY_BYTES
        room -= need
        if room < 0 and stop > start:
            break
        stop += 1
    return stop


def _alone(call: pb.Call, callback_id: int, args: bool = True) -> pb.Call:
    """``call`` to one callback instance, as a Call of its own (without its arguments:
    a stand-in for the telemetry hook)."""
    if args:
        own = pb.Call()
        own.CopyFrom(call)
        own.callback_id = callback_id
        return own
    return pb.Call(
        method=call.method,
        callback_id=callback_id,
        parent_id=call.parent_id,
        one_way=call.one_way,
    )
