"""Drives one protocol :class:`~backchannel.wire.protocol.Connection` over one gRPC stream.

Used by both ends: the provider wraps the server side of ``Connect``, the consumer the
client side. One reader task takes frames off the stream and never waits on user code
(an incoming call runs eagerly, and gets a task of its own only if it has to wait); the
writer sends what the protocol queued, one write at a time, coalescing every frame that
is ready into one ``Batch`` message: each write's completion (gRPC's flow control)
starts the next, through done-callbacks rather than a task. The first failure of the
stream is stored and fails every pending call at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import threading
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any, Protocol

from google.protobuf.message import DecodeError

from backchannel import telemetry
from backchannel.errors import (
    CallCancelled,
    DeadlineExceeded,
    EncodeError,
    LocalProtocolError,
    MessageTooLarge,
    StreamBroken,
    forget_frames,
)
from backchannel.settings import Limits
from backchannel.transport.deadlines import Deadlines, Entry
from backchannel.transport.handoff import (
    Deferred as Deferred,  # re-exported: the client imports it here
)
from backchannel.transport.peerlog import PeerLog
from backchannel.transport.seam import EOF, Code, Translate, translate
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec, frames
from backchannel.wire.protocol import (
    CallReceived,
    CancelReceived,
    Connection,
    FaultReceived,
    GoAwayReceived,
    HandshakeDone,
    PeerMistake,
    ReleaseReceived,
    ResultReceived,
    State,
    Unparseable,
)
from backchannel.wire.text import wire_text

logger = logging.getLogger("backchannel")

#: (session, id of the incoming call) while this side runs a call the peer sent; calls
#: made meanwhile carry that id as their parent so the peer can tell re-entrant calls
CURRENT_CALL: contextvars.ContextVar[tuple[Session, int] | None] = contextvars.ContextVar(
    "backchannel_current_call", default=None
)

#: frames per Batch message, and roughly how many bytes one Batch may hold
MAX_BATCH_FRAMES = 32
MAX_BATCH_BYTES = 1 << 20
#: a call that waited for an in-flight slot is sent only while more than this share of
#: its timeout is left: a peer that holds its slots until calls expire then gets at most
#: ten calls per slot per timeout, not every call that waited (each sent, then cancelled)
MIN_TIME_LEFT_TO_SEND = 0.1
#: waiting calls (expired or cancelled ones included) held before the queue is compacted
_COMPACT_WAITING_AT = 4096
#: frames of one received Batch acted on before the reader yields to the event loop: a
#: Batch of 150,000 calls refused past the in-flight limit would otherwise hold the loop
#: for over a second (one slice of refusals takes a few milliseconds)
RECEIVE_SLICE = 500
#: frames the writer packs into messages at a time (~1 ms), so a long queue of small
#: frames never holds the loop while it is packed all at once
_COALESCE_FRAMES = 64 * MAX_BATCH_FRAMES

Read = Callable[[], Awaitable[Any]]
Future = asyncio.Future[Any]
#: turns a call's Result into what its caller gets (raising what it should raise), or
#: into a Deferred when it finishes the decoding off the loop
Decode = Callable[[pb.Result], Any]
#: turns the error of a stream that ended under a call into the one its caller gets
Broken = Callable[[BaseException], BaseException]
Write = Callable[[bytes], Awaitable[None]]


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


class Session:
    """One live Connect stream, either end."""

    def __init__(
        self,
        connection: Connection[Outgoing],
        write: Write,
        dispatcher: Callable[[Session], Dispatcher],
        error_types: codec.ErrorTypes,
        *,
        peer: str,
        limits: Limits,
        send_tracebacks: bool = False,
        eof: object = EOF,
        translate: Translate = translate,
    ) -> None:
        self.connection = connection
        self.peer = peer
        self.error_types = error_types
        self._write = write
        # the transport's: what its read returns at the end, and its errors as ours
        self._eof = eof
        self._translate = translate
        self._send_tracebacks = send_tracebacks
        self._loop = asyncio.get_running_loop()
        self._limits = limits
        # what the peer accepts, until its handshake says otherwise
        self._peer_max_calls = limits.max_calls_in_flight
        self._peer_max_message = limits.max_message_size
        self._sent: dict[int, Outgoing] = {}
        self._deadlines = Deadlines(self._loop, self._expire)
        self._waiting: collections.deque[Outgoing] = collections.deque()
        self._compact_waiting_at = _COMPACT_WAITING_AT
        self._loop_thread = threading.get_ident()
        # the call tree, for re-entrancy: outgoing call id -> the incoming call it was
        # made during, and incoming call id -> the outgoing call it was made during
        self._outgoing_parent: dict[int, int] = {}
        self._incoming_parent: dict[int, int] = {}
        self._queue: list[bytes] = []  # serialized frames, to batch
        self._messages: collections.deque[bytes] = collections.deque()  # serialized, to write
        self._writing: _Driven | None = None  # the write under way
        self._write_context = contextvars.Context()  # where writes run: no caller's
        self._write_soon = False  # a _write_next is scheduled
        self._handling = False  # the reader is acting on a message: it writes when done
        # calls the peer sent that are running: their task, or None while running eagerly
        self._running: dict[int, asyncio.Task[None] | None] = {}
        self._one_way_tasks: set[asyncio.Task[None]] = set()  # strong references
        self._drained = asyncio.Event()  # set while the writer has nothing left to send
        # bytes waiting to be written: frames not yet serialized, and serialized messages
        self._queue_bytes = 0
        self._message_bytes = 0
        # set while they are under max_queued_bytes: the reader reads and calls are sent
        self._writable = asyncio.Event()
        self._writable.set()
        self._reader: asyncio.Task[Any] | None = None
        self._stall: asyncio.TimerHandle | None = None  # ends a stream over the limit too long
        #: the status this side ended the stream with, when it did (a peer that broke a
        #: limit: did not read, sent no Hello, kept sending Faults)
        self.ending: tuple[Code, str] | None = None
        #: the rate-limited warnings about what the peer sent
        self.peer_log = PeerLog(self._loop, peer, logger)
        # Faults the peer may still send: max_faults at once, refilled at that a minute
        self._fault_allowance = float(limits.max_faults)
        self._fault_time = self._loop.time()
        self._closed = asyncio.Event()
        #: set once the handshake finished; holds the provider's services on the consumer
        self.handshake: asyncio.Future[tuple[pb.ServiceInfo, ...]] = self._loop.create_future()
        #: why the stream ended, once it has
        self.cause: BaseException | None = None
        #: this side's handling of the peer's calls on this stream
        self.dispatcher = dispatcher(self)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the session runs on."""
        return self._loop

    def in_loop_thread(self) -> bool:
        """True when called from the thread that runs this session's loop."""
        return threading.get_ident() == self._loop_thread

    # ------------------------------------------------------------------ state

    @property
    def usable(self) -> bool:
        """True while new calls may be sent on this stream."""
        return (
            self.cause is None
            and self.connection.state is State.OPEN
            and not self.connection.peer_going_away
        )

    @property
    def closed(self) -> asyncio.Event:
        """Set once the stream has ended and every pending call was failed."""
        return self._closed

    # ---------------------------------------------------------------- writing

    def flush(self) -> None:
        """Send what the protocol queued: at the end of this turn of the event loop when
        no write is under way (so what this turn produces goes as one batch), else when
        the current write completes."""
        idle = self._writing is None and not self._write_soon and not self._handling
        if self._enqueue() and idle:
            self._write_soon = True
            self._loop.call_soon(self._write_next)

    def _write_now(self) -> None:
        """Send what is queued without waiting for the end of the loop turn."""
        if self._enqueue() and self._writing is None:
            self._write_next()

    def _enqueue(self) -> bool:
        """Move what the protocol queued to the writer's queue; True if any is waiting."""
        frames = self.connection.take_encoded()
        if frames:
            self._queue.extend(frames)
            self._drained.clear()
            self._queue_bytes += sum(map(len, frames))
            if self._queue_bytes + self._message_bytes > self._limits.max_queued_bytes:
                self._over_limit()
        return bool(self._queue)

    def _over_limit(self) -> None:
        """More than max_queued_bytes waits to be written: the peer reads slower than it
        asks. Stop reading from it (and sending it calls) until the queue drains; past
        twice the limit, end the stream: only results of calls already running got here."""
        if self.cause is not None:
            return
        limit = self._limits.max_queued_bytes
        queued = self._queue_bytes + self._message_bytes
        if queued > 2 * limit:
            self.end(
                Code.RESOURCE_EXHAUSTED,
                f"{self.peer} did not read what was sent to it: {queued} bytes queued for "
                f"it, over twice the limit of {limit} bytes (max_queued_bytes); "
                "the stream is ended",
            )
        elif self._writable.is_set():
            self._writable.clear()
            self._stall = self._loop.call_later(self._limits.max_write_stall, self._stalled)
            logger.info(
                "%s reads slower than it asks: %d bytes queued for it, over the limit of %d "
                "bytes (max_queued_bytes); not reading from it until they are written",
                self.peer,
                queued,
                limit,
            )

    def _stalled(self) -> None:
        """Over max_queued_bytes for max_write_stall seconds: the peer reads nothing more
        (or waits, as this side does, for the other to read first)."""
        self.end(
            Code.RESOURCE_EXHAUSTED,
            f"{self.peer} read nothing of what was queued for it for "
            f"{self._limits.max_write_stall} s (max_write_stall) while over the limit of "
            f"{self._limits.max_queued_bytes} bytes (max_queued_bytes); the stream is ended",
        )

    #: where :meth:`end` logs, when not at WARNING each time: the provider's one
    #: rate-limited log for all its streams, which peers could otherwise flood
    end_log: PeerLog | None = None

    def end(self, code: Code, why: str) -> None:
        """End the stream of a peer that broke a limit, dropping what is queued for it;
        the provider ends the RPC with ``code`` and ``why`` (:attr:`ending`)."""
        if self.cause is not None:
            return
        self.ending = (code, why)
        if self.end_log is not None:  # a provider's: rate-limited across its streams
            self.end_log.line("%s", why)
        else:
            logger.warning("%s", why)
        self._queue.clear()
        self._messages.clear()
        self._queue_bytes = self._message_bytes = 0
        self._drained.set()
        if self._writing is not None:
            self._writing.cancel()
        self.lost(StreamBroken(why))
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()  # it may wait for a frame the peer never sends

    def _write_next(self) -> None:
        """Start the next write. Its first step runs here, so the message is handed to
        gRPC without waiting for a loop turn; the rest is driven by done-callbacks
        (``_Driven``) outside every task, so no caller's cancellation can reach it (a
        cancelled write ends the RPC)."""
        self._write_soon = False
        if self._writing is not None:
            return  # the completion of the current write carries on
        while True:
            if not self._messages:
                if not self._queue:
                    self._drained.set()
                    return
                if len(self._queue) <= _COALESCE_FRAMES:
                    frames, self._queue = self._queue, []
                    self._queue_bytes = 0
                else:  # a bounded piece: coalescing 100,000 frames at once takes ~80 ms
                    frames = self._queue[:_COALESCE_FRAMES]
                    del self._queue[:_COALESCE_FRAMES]
                    self._queue_bytes -= sum(map(len, frames))
                limit = min(MAX_BATCH_BYTES, self._peer_max_message)
                self._messages.extend(coalesce(frames, limit))
                self._message_bytes = sum(map(len, self._messages))
            message = self._messages.popleft()
            self._message_bytes -= len(message)
            if not self._writable.is_set():
                self._drained_some()
            writing = self._write(message)
            try:
                waiting_on = writing.send(None)  # type: ignore[attr-defined]
            except StopIteration:
                continue  # written already
            except Exception as exc:
                self._write_failed(exc)
                return
            self._writing = _Driven(
                self._loop,
                self._write_context,
                writing,  # type: ignore[arg-type]
                waiting_on,
                self._written,
            )
            return

    def _drained_some(self) -> None:
        """The writer took a message: back under max_queued_bytes, read and send again."""
        if self._queue_bytes + self._message_bytes <= self._limits.max_queued_bytes:
            self._writable.set()
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            if self._waiting:  # not from here: sending one would start a second write
                self._loop.call_soon(self._admit)

    def _written(self, exc: BaseException | None) -> None:
        """A write ended. The next one starts at the end of this loop turn, so what the
        calls it woke produce goes with it (as flush does)."""
        self._writing = None
        if isinstance(exc, asyncio.CancelledError):
            return
        if exc is not None:
            self._write_failed(exc)
        elif not self._messages and not self._queue:
            self._drained.set()
        elif not self._write_soon:
            self._write_soon = True
            self._loop.call_soon(self._write_next)

    def _write_failed(self, exc: BaseException) -> None:
        """The stream failed under a write: the reader sees it too."""
        self._messages.clear()
        self._queue.clear()
        self._queue_bytes = self._message_bytes = 0
        self._drained.set()
        self.lost(self._translate(exc, self.peer))

    # ---------------------------------------------------------------- reading

    async def run(self, read: Read) -> None:
        """Read frames until the stream ends; then fail what is pending and return."""
        cause: BaseException
        eof = self._eof
        self._reader = asyncio.current_task()
        try:
            while True:
                if not self._writable.is_set():  # back-pressure: the peer does not read
                    await self._writable.wait()
                if self.cause is not None:
                    cause = self.cause
                    break
                frame = await read()
                if frame is eof:
                    cause = StreamBroken(f"the peer {self.peer} closed the stream")
                    break
                batch = _many_frames(frame)
                if batch is not None:
                    await self._receive_in_slices(batch)
                    continue
                # what acting on one message produces (results of calls that finish at
                # once, say) is written as one batch as soon as it is done: no loop turn
                self._handling = True
                try:
                    if type(frame) is Unparseable:
                        events = self.connection.receive_unparseable(
                            frame.size, frame.reason, frame.call_id, frame.one_way, frame.result_id
                        )
                    elif type(frame) is SplitBatch:
                        events = self.connection.receive_batch(frame.frames)
                    else:
                        events = self.connection.receive(frame)
                    self._handle(events)
                finally:
                    self._handling = False
                self._write_now()
        except asyncio.CancelledError:
            if self.ending is not None and self._reader is not None:
                self._reader.uncancel()  # this side ended it: the caller ends the RPC
                return
            self.lost(StreamBroken(f"the stream to {self.peer} was closed"))
            if self._writing is not None:
                self._writing.cancel()
            raise
        except Exception as exc:
            cause = self._translate(exc, self.peer)
        self.lost(cause)
        await self._drain_writer()

    async def _receive_in_slices(self, frames: Sequence[pb.Frame | Unparseable]) -> None:
        """Act on the frames of one big Batch, :data:`RECEIVE_SLICE` at a time, yielding
        to the loop between slices (and waiting, as the reader does, while the peer reads
        too slowly), so no single message holds the loop for long."""
        for start in range(0, len(frames), RECEIVE_SLICE):
            if start:
                await asyncio.sleep(0)
                if not self._writable.is_set():
                    await self._writable.wait()
                if self.cause is not None:
                    return
            self._handling = True
            try:
                piece = frames[start : start + RECEIVE_SLICE]
                self._handle(self.connection.receive_batch(piece))
            finally:
                self._handling = False
            self._write_now()

    async def _drain_writer(self) -> None:
        """Let what is queued (a last Fault, say) be written for a moment, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), 0.5)
        if self._writing is not None:
            self._writing.cancel()

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            if self.cause is not None:  # ended by one of them (too many Faults)
                return
            if type(event) is ResultReceived:
                event.token.resolve(event.result)
                self._finished(event.result.id)
            elif type(event) is CallReceived:
                self._start_serving(event.call)
            elif type(event) is CancelReceived:
                victim = self._running.pop(event.call_id, None)
                if victim is not None:
                    victim.cancel(f"cancelled by the peer: {wire_text(event.reason)}")
            elif type(event) is HandshakeDone:
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

    def _count_fault(self) -> None:
        """A Fault came: past ``max_faults`` at once (refilled at that many a minute),
        the peer is not reporting this side's mistakes but flooding: end the stream."""
        now = self._loop.time()
        limit = self._limits.max_faults
        refill = (now - self._fault_time) * limit / 60.0
        self._fault_allowance = min(float(limit), self._fault_allowance + refill) - 1.0
        self._fault_time = now
        if self._fault_allowance < 0:
            self.end(
                Code.RESOURCE_EXHAUSTED,
                f"{self.peer} sent more than {limit} Faults (max_faults at once, or more "
                f"than {limit} a minute after that); the stream is ended",
            )

    async def _serve(self, call: pb.Call) -> None:
        """Run one incoming call and send its result."""
        CURRENT_CALL.set(
            (self, call.id)
        )  # this task's own context: calls made here are its children
        if call.parent_id:
            self._incoming_parent[call.id] = call.parent_id
        try:
            if telemetry.AVAILABLE and telemetry.collecting():  # the server span around it
                value = await telemetry.serve(self, call, self.dispatcher.dispatch)
            else:
                value = await self.dispatcher.dispatch(call)
            # serialized once and framed by hand: a Result(value=...) and its Frame would
            # each copy the value, on the loop (bench/bulk.py: ~60 ms per MB each)
            result: pb.Result | bytes = frames.value_result(call.id, value.SerializeToString())
        except asyncio.CancelledError:
            if call.id in self._running and self.cause is None:
                # cancelled locally, not by the peer: the peer still waits for an answer
                del self._running[call.id]
                error = codec.encode_error(
                    CallCancelled("cancelled by the provider"), self.error_types
                )
                self._answer(pb.Result(id=call.id, error=error))
            raise
        except Exception as exc:
            result = pb.Result(id=call.id, error=self._encode_error(call, exc))
        finally:
            self._incoming_parent.pop(call.id, None)
            if call.one_way:  # its work is over: its in-flight slot is free
                self.connection.one_way_done(call.id)
        size = len(result) if isinstance(result, bytes) else result.ByteSize()
        if size > self._peer_max_message:
            too_large = MessageTooLarge(
                f"the result of {_call_name(call)} is {size} bytes, over the "
                f"message size limit of {self._peer_max_message} bytes (max_message_size)"
            )
            result = pb.Result(id=call.id, error=codec.encode_error(too_large, self.error_types))
        if not call.one_way and call.id in self._running:
            del self._running[call.id]
            self._answer(result, call.id)

    def _encode_error(self, call: pb.Call, exc: Exception) -> pb.Error:
        """The Error to answer ``call`` with; never raises, so the call is always answered
        (and an eager call raising here would end the reader, and the stream)."""
        try:
            return codec.encode_error(exc, self.error_types, self._send_tracebacks)
        except Exception as failure:
            unsendable = EncodeError(
                f"{_call_name(call)} raised {type(exc).__name__}, which could not be sent: "
                f"{type(failure).__name__}: {failure}"
            )
            return codec.encode_error(unsendable, self.error_types)

    def _start_serving(self, call: pb.Call) -> None:
        """Run an incoming call eagerly: its first step runs now, in a context of its own,
        and only a call that has to wait gets a task (most calls finish in one step)."""
        if not call.one_way:
            self._running[call.id] = None
        context = contextvars.copy_context()
        serving = self._serve(call)
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

    # ---------------------------------------------------------------- calling

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
        label = label or _call_name(call)
        size = call.ByteSize()
        if size > self._peer_max_message:
            raise MessageTooLarge(
                f"{label}: the call is {size} bytes, over the message size limit of "
                f"{self._peer_max_message} bytes (max_message_size)"
            )
        if parent:
            call.parent_id = parent
        outgoing = Outgoing(call, self._loop.create_future(), label, timeout, decode, broken)
        if telemetry.AVAILABLE and telemetry.collecting():  # the client span, its context
            telemetry.sending(self, call, outgoing.future)
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
        return outgoing.future

    def _send(self, outgoing: Outgoing) -> None:
        call = outgoing.call
        call_id = self.connection.send_call(call, outgoing)
        if self.connection.pending_outgoing <= 1 and not self._queue:
            self._write_now()  # a lone call (a sequential caller): nothing to batch it with
        else:
            self.flush()
        if call.one_way:
            outgoing.resolve(pb.Result(id=call_id, value=codec.NULL))
            return
        self._sent[call_id] = outgoing
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
            self._compact_waiting_at = max(_COMPACT_WAITING_AT, 2 * len(live))

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
        self._outgoing_parent.pop(call_id, None)
        if self._waiting:
            self._admit()

    def _expire(self, outgoing: Outgoing) -> None:
        outgoing.deadline = None
        if outgoing.call.id:
            self.abandon(outgoing.call.id, f"deadline of {outgoing.timeout} s exceeded")
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

    # ----------------------------------------------------------------- ending

    def lost(self, cause: BaseException) -> None:
        """The stream ended: fail every pending call with ``cause``, cancel running ones."""
        forget_frames(cause)  # its frames would hold this session in a reference cycle
        if self.cause is not None:
            return
        self.cause = cause
        pending, _running_ids = self.connection.connection_lost(cause)
        for outgoing in pending:
            outgoing.fail_lost(cause)
        for task in [*self._running.values(), *self._one_way_tasks]:
            if task is not None:
                task.cancel("the stream ended")
        self._running.clear()
        if not self.handshake.done():
            self.handshake.set_exception(type(cause)(str(cause)))
            self.handshake.exception()  # retrieved: nobody may be waiting
        for outgoing in [*self._sent.values(), *self._waiting]:
            outgoing.settle()
            outgoing.fail_lost(cause)
        self._sent.clear()
        self._waiting.clear()
        self._deadlines.close()
        self._outgoing_parent.clear()
        self._writable.set()  # a reader held back by back-pressure sees the end
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self.dispatcher.ended(cause)
        self.peer_log.summarize()
        self._closed.set()
        logger.debug("stream with %s ended: %s", self.peer, wire_text(cause))

    def discard(self) -> None:
        """Drop this side's handling of a stream that never opened (its handshake failed
        or was given up): it holds the session, a reference cycle per failed attempt
        that only the cyclic garbage collector would free, and a thousand unreachable
        providers fail thousands of attempts. Nothing may hold the session after this."""
        self.dispatcher = _DISCARDED

    def go_away(self, reason: str) -> None:
        """Tell the peer this side accepts no new calls."""
        self.connection.send_go_away(reason)
        self.flush()

    async def wait_idle(self) -> None:
        """Wait until no call the peer sent is still running and their results are sent."""
        while tasks := [task for task in self._running.values() if task is not None]:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.cause is None:
            await self._drained.wait()


class _Discarded:
    """The dispatcher of a discarded session: nothing was exported on it, nothing runs."""

    async def dispatch(self, call: pb.Call) -> pb.Value:
        raise StreamBroken("the stream never opened")

    def released(self, callback_id: int) -> None:
        pass

    def ended(self, cause: BaseException) -> None:
        pass


_DISCARDED = _Discarded()


def coalesce(encoded: list[bytes], max_bytes: int = MAX_BATCH_BYTES) -> list[bytes]:
    """Pack serialized frames into as few messages as the batch limits allow.

    A batch is put together from the frames' bytes (a ``Frame`` whose ``batch`` holds
    them), not by copying the frames into a new message.
    """
    if len(encoded) == 1:
        return encoded
    messages: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for data in encoded:
        if batch and (len(batch) >= MAX_BATCH_FRAMES or size + len(data) > max_bytes):
            messages.append(frames.batch_frame(batch))
            batch, size = [], 0
        batch.append(data)
        size += len(data)
    if batch:
        messages.append(frames.batch_frame(batch))
    return messages


class Outgoing:
    """A call this side sends: waiting for a slot, then for its result."""

    __slots__ = ("broken", "call", "deadline", "decode", "future", "label", "timeout")

    def __init__(
        self,
        call: pb.Call,
        future: Future,
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
    return Unparseable(len(data), reason, call_id, one_way, result_id)


def serialize(message: pb.Frame | bytes) -> bytes:
    """The stream's serializer: the writer hands it frames it has serialized already."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class _Driven:
    """Drives a coroutine whose first step already ran, without a task: each future it
    waits on wakes it through a done-callback, and ``done`` gets what it ended with
    (None, or its exception). A task would take two more callbacks per write: its first
    step, and its done-callback.
    """

    __slots__ = ("_context", "_coroutine", "_done", "_loop", "_waiting")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
        coroutine: Coroutine[Any, Any, None],
        waiting_on: Any,
        done: Callable[[BaseException | None], None],
    ) -> None:
        self._loop = loop
        self._context = context
        self._coroutine = coroutine
        self._done = done
        self._waiting: asyncio.Future[Any] | None = None
        self._wait(waiting_on)

    def _wait(self, waiting_on: Any) -> None:
        if waiting_on is None:  # a bare yield: go on at the next turn, as a task would
            self._waiting = None
            self._loop.call_soon(self._step, context=self._context)
            return
        if not getattr(waiting_on, "_asyncio_future_blocking", False):
            self._coroutine.close()
            self._done(RuntimeError(f"a write waited on {waiting_on!r}, not a future"))
            return
        waiting_on._asyncio_future_blocking = False
        self._waiting = waiting_on
        waiting_on.add_done_callback(self._step, context=self._context)

    def _step(self, _future: object = None) -> None:
        try:
            waiting_on = self._coroutine.send(None)
        except StopIteration:
            self._done(None)
        except (Exception, asyncio.CancelledError) as exc:
            self._done(exc)
        else:
            self._wait(waiting_on)

    def cancel(self) -> None:
        """Cancel what it waits on: the coroutine then ends with CancelledError."""
        if self._waiting is not None:
            self._waiting.cancel()


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


def _many_frames(frame: Any) -> Sequence[pb.Frame | Unparseable] | None:
    """The frames of a received Batch too big to act on in one go, else None."""
    if type(frame) is SplitBatch:
        frames: Sequence[pb.Frame | Unparseable] = frame.frames
    elif type(frame) is pb.Frame and frame.HasField("batch"):
        frames = frame.batch.frames
    else:
        return None
    return frames if len(frames) > RECEIVE_SLICE else None


def _call_name(call: pb.Call) -> str:
    if call.callback_id:
        return f"callback {call.callback_id}.{call.method}"
    return f"{call.service}.{call.method}"
