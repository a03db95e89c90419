"""The receiving part of a :class:`~backchannel.transport.session.Session`: acting on what
the peer sends.

Frames off the stream are parsed (:func:`parse_frame`, the stream's deserializer) and
handed to the protocol; the events it makes of them are acted on here: results settle
this side's calls, and the peer's calls are served, each run eagerly (it gets a task of
its own only if it has to wait) and answered. Nothing here waits on user code.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import types
from collections.abc import Coroutine, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.message import DecodeError

from backchannel.errors import CallCancelled, EncodeError, LocalProtocolError, MessageTooLarge
from backchannel.transport import observe
from backchannel.transport.outgoing import call_name
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec, frames, slices
from backchannel.wire.protocol import (
    CallReceived,
    CancelReceived,
    FaultReceived,
    GoAwayReceived,
    HandshakeDone,
    PeerMistake,
    ReleaseReceived,
    ResultReceived,
    Unparseable,
)
from backchannel.wire.text import wire_text

if TYPE_CHECKING:
    import collections

    from backchannel.settings import Limits
    from backchannel.transport.outgoing import Outgoing
    from backchannel.transport.peerlog import PeerLog
    from backchannel.transport.pools import CountedPool
    from backchannel.wire.protocol import Connection
    from backchannel.wire.slices import Piece

logger = logging.getLogger("backchannel")

#: (session, id of the incoming call) while this side runs a call the peer sent; calls
#: made meanwhile carry that id as their parent so the peer can tell re-entrant calls
#: (typed with the Session it always is where ``backchannel.transport.session`` exports it)
CURRENT_CALL: contextvars.ContextVar[tuple[Receiver, int] | None] = contextvars.ContextVar(
    "backchannel_current_call", default=None
)

#: frames of one received Batch (or targets of a Multicast) acted on before the reader
#: yields to the event loop: a Batch of 150,000 calls refused past the in-flight limit
#: would otherwise hold the loop for over a second (one slice of refusals takes a few
#: milliseconds)
RECEIVE_SLICE = 500


class Dispatcher(Protocol):
    """One side's handling of what the peer sends on one session."""

    async def dispatch(self, call: pb.Call) -> pb.Value:
        """Run one call; return its encoded result or raise its exception."""
        ...

    def released(self, callback_id: int) -> None:
        """The peer ended a callback instance."""
        ...

    def ended(self, cause: BaseException) -> None:
        """The stream ended."""
        ...


class Receiver:
    """Acts on the events of what the peer sent, and serves the peer's calls: a part of
    :class:`~backchannel.transport.session.Session`, whose ``__init__`` sets up the state
    below."""

    #: the application name the peer's Hello (or Welcome) gave, once it came
    peer_application = ""

    # declared for the type checker only: at run time a stub here would hide the part
    # of the Session that defines the method
    if TYPE_CHECKING:
        # the receiver's state
        _handling: bool
        _running: dict[int, asyncio.Task[None] | None]
        _one_way_tasks: set[asyncio.Task[None]]
        _incoming_parent: dict[int, int]
        # what it uses of the rest of the session
        _sent: dict[int, Outgoing]
        _outgoing_parent: dict[int, int]
        _waiting: collections.deque[Outgoing]
        connection: Connection[Outgoing]
        peer: str
        error_types: codec.ErrorTypes
        cause: BaseException | None
        handshake: asyncio.Future[tuple[pb.ServiceInfo, ...]]
        dispatcher: Dispatcher
        peer_log: PeerLog
        _loop: asyncio.AbstractEventLoop
        _limits: Limits
        _send_tracebacks: bool
        _writable: asyncio.Event
        calls_held: bool  # True while over max_queued_bytes
        held_pools: set[CountedPool]  # the pools that passed its calls by meanwhile
        _parked: collections.deque[tuple[pb.Call, bool]]
        _unparking: bool
        _queue_bytes: int
        _message_bytes: int
        _peer_max_calls: int
        _peer_max_message: int

        def flush(self) -> None: ...
        def _write_now(self) -> None: ...
        def _admit(self) -> None: ...
        def _count_fault(self) -> None: ...
        async def _hold_for_backlog(self) -> None: ...
        def _release_one_way(self) -> None: ...

    async def _receive_in_slices(self, pieces: Iterator[list[Piece]]) -> None:
        """Act on one big Batch or Multicast a slice at a time (about
        :data:`RECEIVE_SLICE` calls each), yielding to the loop between slices (and
        waiting, as the reader does, while the peer reads too slowly), so no single
        message holds the loop for long."""
        for index, piece in enumerate(pieces):
            if index:
                await asyncio.sleep(0)
                if not self._writable.is_set():
                    await self._writable.wait()
                if self.connection.one_way_waiting:
                    await self._hold_for_backlog()
                if self.cause is not None:
                    return
            self._handling = True
            try:
                self._handle(self.connection.receive_batch(piece))
            finally:
                self._handling = False
            self._write_now()

    def _handle(self, events: list[Any]) -> None:
        traced: bool | None = None  # whether calls get a server span: asked once per message
        for event in events:
            if self.cause is not None:  # ended by one of them (too many Faults)
                return
            if type(event) is ResultReceived:
                outgoing = event.token
                outgoing.resolve(event.result)  # settles it; then, as Calls._finished does:
                call_id = event.result.id
                self._sent.pop(call_id, None)
                if self._outgoing_parent:
                    self._outgoing_parent.pop(call_id, None)
                if self._waiting:
                    self._admit()
            elif type(event) is CallReceived:
                if traced is None:
                    traced = observe.AVAILABLE and observe.collecting()
                self._start_serving(event.call, traced)
            elif type(event) is CancelReceived:
                victim = self._running.pop(event.call_id, None)
                if victim is not None:
                    victim.cancel(f"cancelled by the peer: {wire_text(event.reason)}")
            elif type(event) is HandshakeDone:
                self.peer_application = event.peer_application
                own = self._limits
                self._peer_max_calls = min(
                    own.max_calls_in_flight,
                    event.peer_max_calls_in_flight or own.max_calls_in_flight,
                )
                self._peer_max_message = min(
                    own.max_message_size, event.peer_max_message_size or own.max_message_size
                )
                if not self.handshake.done():
                    self.handshake.set_result(event.services)
            elif type(event) is ReleaseReceived:
                self.dispatcher.released(event.callback_id)
            elif type(event) is GoAwayReceived:
                logger.info("%s is going away: %s", self.peer, wire_text(event.reason))
            elif type(event) is FaultReceived:
                self.peer_log.warning("%s reports a protocol fault: %s", event.message)
                self._count_fault()
            elif type(event) is PeerMistake:
                self.peer_log.warning("protocol mistake by %s: %s", event.message)

    async def _serve(self, call: pb.Call, traced: bool) -> None:
        """Run one incoming call (in a server span if ``traced``) and send its result."""
        call_id = call.id  # read once: each read of a protobuf field costs an attribute
        parent = call.parent_id
        # this task's own context: calls made here are its children
        CURRENT_CALL.set((self, call_id))
        if parent:
            self._incoming_parent[call_id] = parent
        try:
            if traced:  # the server span around it
                value = await observe.serve(self, call, self.dispatcher.dispatch)
            else:
                value = await self.dispatcher.dispatch(call)
            # serialized once and framed by hand: a Result(value=...) and its Frame would
            # each copy the value, on the loop (bench/bulk.py: ~60 ms per MB each)
            result: pb.Result | bytes = frames.value_result(call_id, value.SerializeToString())
        except asyncio.CancelledError:
            if call_id in self._running and self.cause is None:
                # cancelled locally, not by the peer: the peer still waits for an answer
                del self._running[call_id]
                error = codec.encode_error(
                    CallCancelled("cancelled by the provider"), self.error_types
                )
                self._answer(pb.Result(id=call_id, error=error))
            raise
        except Exception as exc:
            result = pb.Result(id=call_id, error=self._encode_error(call, exc))
        finally:
            if parent:
                self._incoming_parent.pop(call_id, None)
            if call.one_way:  # its work is over: its in-flight slot is free
                self.connection.one_way_done(call_id)
                if self.connection.one_way_waiting:
                    self._release_one_way()
        size = len(result) if isinstance(result, bytes) else result.ByteSize()
        if size > self._peer_max_message:
            too_large = MessageTooLarge(
                f"the result of {call_name(call)} is {size} bytes, over the "
                f"message size limit of {self._peer_max_message} bytes (max_message_size)"
            )
            result = pb.Result(id=call_id, error=codec.encode_error(too_large, self.error_types))
        if call_id in self._running and not call.one_way:
            del self._running[call_id]
            self._answer(result, call_id)

    def _encode_error(self, call: pb.Call, exc: Exception) -> pb.Error:
        """The Error to answer ``call`` with; never raises, so the call is always answered
        (and an eager call raising here would end the reader, and the stream)."""
        try:
            return codec.encode_error(exc, self.error_types, self._send_tracebacks)
        except Exception as failure:
            unsendable = EncodeError(
                f"{call_name(call)} raised {type(exc).__name__}, which could not be sent: "
                f"{type(failure).__name__}: {failure}"
            )
            return codec.encode_error(unsendable, self.error_types)

    def _start_serving(self, call: pb.Call, traced: bool) -> None:
        """Run an incoming call eagerly: its first step runs now, in a context of its own,
        and only a call that has to wait gets a task (most calls finish in one step)."""
        if self.calls_held and self._park(call, traced):
            return
        if not call.one_way:
            self._running[call.id] = None
        context = contextvars.copy_context()
        serving = self._serve(call, traced)
        try:
            waiting_on = context.run(serving.send, None)
        except StopIteration:
            return
        if getattr(waiting_on, "_asyncio_future_blocking", False):
            # taken, as a task takes what it is given at once: until this one's task runs,
            # another call may await the same future (a resource loaded once), and an await
            # of a future still marked as being awaited raises RuntimeError
            waiting_on._asyncio_future_blocking = False
        task = self._loop.create_task(_resume(serving, waiting_on), context=context)
        if call.id in self._running:
            self._running[call.id] = task
        elif call.one_way:
            self._one_way_tasks.add(task)
            task.add_done_callback(self._one_way_tasks.discard)

    def _park(self, call: pb.Call, traced: bool) -> bool:
        """The stream is over max_queued_bytes (or draining back from it): a call
        that has not started waits (in order, until :meth:`_start_parked`), so results
        beyond the limit come only from calls already running. True if parked; a
        re-entrant call is not: a call running on this side waits for it."""
        parent = call.parent_id
        if self._unparking or (parent and parent in self._sent):
            return False
        if not call.one_way:
            self._running[call.id] = None  # a Cancel from the peer takes it out
        self._parked.append((call, traced))
        return True

    def _feed_held(self) -> None:
        """Held, its queue at most half the limit (the writer took a message), or empty
        when a pool thread frees up: its calls queued in pools start on the threads
        that are free, and parked ones start (next loop turn, not within the writer's
        step) while the queue stays under half the limit. Once none is left and the
        queue is empty, it is no longer held."""
        if not self.calls_held or self._queued_bytes() > self._limits.max_queued_bytes // 2:
            return
        for pool in list(self.held_pools):
            pool.resume_lane(self)
        if self._parked:
            self._loop.call_soon(self._start_parked)
        elif not self._queued_bytes() and not any(p.holds(self) for p in self.held_pools):
            self._resume_held()

    def fed(self) -> None:
        """A pool thread is free for this held stream's work (see Holdable.fed)."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing to start
            self._loop.call_soon_threadsafe(self._fed)

    def _fed(self) -> None:
        # only with nothing queued: else the writer's next message feeds it, and the
        # results of work done in threads may not be queued yet (threads outpace the
        # loop): fed at the pace the peer reads, what they add stays bounded
        if not self._queued_bytes():
            self._feed_held()

    def _resume_held(self) -> None:
        """No longer held: the pools that passed its queued calls by take them up."""
        self.calls_held = False  # before the pools are told: see CountedPool._take_next
        if self.held_pools:
            pools, self.held_pools = self.held_pools, set()
            for pool in pools:
                pool.resume()

    def _start_parked(self) -> None:
        """Start the parked calls in order while the queue is at most half the limit
        (each result is queued as it comes: flush), once the calls read before them,
        queued in pools, have started."""
        if not self.calls_held or any(pool.holds(self) for pool in self.held_pools):
            return
        half = self._limits.max_queued_bytes // 2
        parked = self._parked
        self._unparking = True  # _park lets them start
        try:
            while parked and self.cause is None and self._queued_bytes() <= half:
                call, traced = parked.popleft()
                if call.one_way or call.id in self._running:  # else the peer cancelled it
                    self._start_serving(call, traced)
        finally:
            self._unparking = False
        if not parked:
            self._feed_held()

    def _queued_bytes(self) -> int:
        return self._queue_bytes + self._message_bytes

    def _answer(self, result: pb.Result | bytes, call_id: int = 0) -> None:
        """Send the Result of call ``call_id``: a message, or serialized already."""
        try:
            if isinstance(result, bytes):
                self.connection.send_encoded_result(call_id, result)
            else:
                self.connection.send_result(result)
        except LocalProtocolError:  # the stream ended meanwhile
            return
        self.flush()


class SplitBatch:
    """A received Batch that did not parse as a whole, its frames parsed one by one."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[pb.Frame | Unparseable]) -> None:
        self.frames = frames


def parse_frame(data: bytes) -> pb.Frame | Unparseable | SplitBatch:
    """The stream's deserializer. A message that is no Frame does not end the stream (as
    a raising deserializer would, with no word to the peer): the reader answers it. A
    Batch that does not parse (one frame too deep, or not UTF-8) is split and its frames
    parsed one by one, so only what is wrong is refused, and every Call in it answered."""
    try:
        return pb.Frame.FromString(data)
    except DecodeError as exc:
        reason = str(exc) or "unparseable protobuf"
    inner = frames.split_batch(data)
    if inner is None:
        return _unparseable(data, reason)
    parsed: list[pb.Frame | Unparseable] = []
    for frame in inner:
        try:
            parsed.append(pb.Frame.FromString(frame))
        except DecodeError as exc:
            parsed.append(_unparseable(frame, str(exc) or "unparseable protobuf"))
    return SplitBatch(parsed)


def _unparseable(data: bytes, reason: str) -> Unparseable:
    call_id, one_way, result_id = frames.find_ids(data)
    if call_id or result_id:
        return Unparseable(len(data), reason, call_id, one_way, result_id)
    targets, one_way = frames.find_targets(data, RECEIVE_SLICE)
    return Unparseable(len(data), reason, 0, one_way, 0, targets)


@types.coroutine
def _resume(coroutine: Coroutine[Any, Any, None], waiting_on: Any) -> Generator[Any, Any, None]:
    """Drive, inside a task, a coroutine whose first step already ran outside one.

    Hands the task what the coroutine waits on, and the coroutine what the task sends or
    throws (cancellation included), until it returns.
    """
    if getattr(waiting_on, "_asyncio_future_blocking", None) is False:
        waiting_on._asyncio_future_blocking = True  # as the await left it: see _start_serving
    while True:
        try:
            sent = yield waiting_on
        except BaseException as exc:
            try:
                waiting_on = coroutine.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting_on = coroutine.send(sent)
            except StopIteration:
                return


def many_frames(frame: Any, weigh_targets: bool) -> Iterator[list[Piece]] | None:
    """The slices of a received message too big to act on in one go (made as they are
    taken), else None: a Batch of many frames, or (``weigh_targets``: a consumer's) a
    Multicast of many targets or a Batch holding them. A provider takes a Multicast as
    one refused frame: it is not weighed, nor cut."""
    if type(frame) is SplitBatch:
        frames: Sequence[pb.Frame | Unparseable] = frame.frames
    elif type(frame) is pb.Frame:
        if frame.HasField("batch"):
            frames = frame.batch.frames
        elif weigh_targets and frame.HasField("multicast"):
            if len(frame.multicast.targets) <= RECEIVE_SLICE:
                return None
            return slices.slices([frame], RECEIVE_SLICE)
        else:
            return None
    else:
        return None
    if len(frames) <= RECEIVE_SLICE and not (
        weigh_targets and slices.weight(frames) > RECEIVE_SLICE
    ):
        return None
    if weigh_targets:
        return slices.slices(frames, RECEIVE_SLICE)
    return (
        list(frames[start : start + RECEIVE_SLICE])
        for start in range(0, len(frames), RECEIVE_SLICE)
    )
