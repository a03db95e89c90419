"""Default limits and timing (the transport turns them into its options).

Every default is safe: calls time out, streams are kept alive and dead peers noticed,
and no peer can make this side hold unbounded calls or messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Dubbo's default call timeout, in seconds: forward calls and callback calls alike
DEFAULT_TIMEOUT = 1.0
#: calls one side lets run at once on one stream, in each direction
DEFAULT_MAX_CALLS_IN_FLIGHT = 1000
#: the largest frame either side sends or accepts, in bytes (gRPC's own default)
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
#: arguments or a result bigger than this (bytes on the wire) are decoded in a worker
#: thread, not on the event loop, where ~30 ms per MB of map or list entries would hold
#: up every other call (bench/bulk.py); smaller ones stay on the loop's fast path
BULK_BYTES = 64 * 1024
#: a result of an ``async def`` method is encoded in a worker thread when it is a list,
#: tuple or dict of more items than this (~3 ms of encoding on the loop)
BULK_ITEMS = 1024
#: bytes one stream may hold queued for writing before it stops reading from its peer:
#: eight messages of the largest default size, which a peer that reads catches up on in
#: well under a second on a LAN, while a stream whose peer stops reading holds at most
#: twice this (then it is ended): 64 MiB, not whatever the peer asked for
DEFAULT_MAX_QUEUED_BYTES = 32 * 1024 * 1024
#: seconds a stream may stay over max_queued_bytes, its peer reading nothing more,
#: before it is ended: far longer than a reading peer needs to catch up, short enough
#: that a peer that stopped for good (or two that wait for each other) is not kept
DEFAULT_MAX_WRITE_STALL = 30.0
#: seconds an incoming connection may take to finish its TLS and HTTP/2 handshake, and a
#: Connect stream to send its Hello: a peer that connects and says nothing holds a file
#: descriptor and memory only this long (gRPC's own handshake timeout is 120 s)
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Connect streams one provider holds at once (~40 KiB each while idle): past it a new
#: stream is refused with RESOURCE_EXHAUSTED
DEFAULT_MAX_STREAMS = 4096
#: Faults a peer may send on one stream at once; the allowance refills at this many a
#: minute. A backchannel peer sends one only when this side breaks the protocol, which
#: it does not: a peer that keeps sending them is lying, and its stream is ended
DEFAULT_MAX_FAULTS = 100
#: one-way calls from the peer that may wait on one stream for an in-flight slot (its
#: sender cannot count them: no Result says when one ended); past it this side stops
#: reading from the peer until half of them have started, past twice it drops them
DEFAULT_MAX_WAITING_ONE_WAY = 10_000
#: the shortest keepalive time allowed, in seconds; every server accepts pings this often
#: whatever its own keepalive, so a client with a short keepalive is never sent away
MIN_KEEPALIVE_TIME = 0.1
#: the longest time gRPC takes as a channel option (milliseconds in a C int), in seconds:
#: ~24.8 days; a longer handshake timeout or keepalive would fail the server's start
MAX_GRPC_SECONDS = (2**31 - 1) / 1000
#: bytes of one call's attachments, keys and values together (the proto's 8 KiB)
DEFAULT_MAX_ATTACHMENT_BYTES = 8 * 1024

#: the largest max_message_size: gRPC takes it, plus 64 KiB, in a C int
MAX_MESSAGE_SIZE_LIMIT = 2**31 - 1 - 64 * 1024


def _check_seconds(name: str, value: object, maximum: float = math.inf) -> None:
    """Refuse ``value`` unless it is a finite number of seconds > 0 and <= ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and 0 < value <= maximum):
        bound = "" if maximum == math.inf else f" and <= {maximum:g}"
        raise ValueError(f"{name} must be finite, > 0 seconds{bound}, got {value!r}")


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    """Refuse ``value`` unless it is an int (not a bool) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive pings, so a peer that vanished without closing is noticed.

    A ping is sent after ``time`` seconds without traffic; no answer within ``timeout``
    seconds ends the connection, and with it every pending call and callback. ``time``
    is at least :data:`MIN_KEEPALIVE_TIME`: a server accepts pings that often from any
    client, whatever its own keepalive (gRPC's servers otherwise send a client that pings
    more often than they do away with GOAWAY ``too_many_pings``).
    """

    time: float = 10.0
    timeout: float = 5.0

    def __post_init__(self) -> None:
        _check_seconds("keepalive time", self.time, MAX_GRPC_SECONDS)
        _check_seconds("keepalive timeout", self.timeout, MAX_GRPC_SECONDS)
        if self.time < MIN_KEEPALIVE_TIME:
            raise ValueError(
                f"keepalive time must be >= {MIN_KEEPALIVE_TIME} s (MIN_KEEPALIVE_TIME), got {self}"
            )


@dataclass(frozen=True)
class Limits:
    """Per-stream limits of one side; the first two are told the peer in the handshake.

    ``max_queued_bytes`` bounds what one stream holds serialized or queued for writing
    (results, calls, every frame) while its peer does not read: past it this side stops
    reading from that peer (no new calls are taken from it, new outgoing calls wait),
    and reads again once the queue is back under it. Its calls that have not started
    wait meanwhile (those queued for a thread, and those read already): they start a few
    at a time, in order, once the queue is under half the limit, and as usual once none
    waits and the queue is empty. Past twice the limit (the results of calls already
    running still queue), or when it stays over the limit for ``max_write_stall``
    seconds (a peer that stopped reading for good, or two peers each waiting for the
    other to read), the stream is ended, the provider with status ``RESOURCE_EXHAUSTED``
    naming the limit. Other streams never notice. It must hold at least one message of
    ``max_message_size``.

    ``handshake_timeout`` and ``max_streams`` bound what a provider holds for consumers
    that connect and say nothing, or open stream after stream (a consumer ignores them);
    ``max_faults`` ends, on either side, the stream of a peer that floods it with Faults.
    ``max_waiting_one_way`` bounds the one-way calls from the peer that wait for an
    in-flight slot: past it (or past ``max_queued_bytes`` of them) this side stops reading
    the peer, so HTTP/2 flow control holds the sender back instead of cutting it off.
    """

    #: calls that may run at once on one stream in each direction; past it new calls
    #: wait (asyncio) or block (sync) until one finishes
    max_calls_in_flight: int = DEFAULT_MAX_CALLS_IN_FLIGHT
    #: the largest frame in bytes; a call or result over it fails with MessageTooLarge
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: bytes one stream may hold queued for writing; past it this side stops reading
    #: from the peer, past twice it the stream ends with RESOURCE_EXHAUSTED
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    #: seconds a stream may stay over max_queued_bytes before it is ended
    max_write_stall: float = DEFAULT_MAX_WRITE_STALL
    #: provider: seconds a new connection may take to finish its TLS and HTTP/2
    #: handshake (then gRPC closes it), and a Connect stream to send its Hello (then it
    #: is ended with DEADLINE_EXCEEDED)
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    #: provider: Connect streams held at once; one more is refused with RESOURCE_EXHAUSTED
    max_streams: int = DEFAULT_MAX_STREAMS
    #: Faults the peer may send on one stream at once (refilled at this many a minute);
    #: one more ends the stream
    max_faults: int = DEFAULT_MAX_FAULTS
    #: bytes of one call's attachments (keys and values, UTF-8): the sender raises
    #: InvalidArguments before sending more, the receiver refuses such a call with
    #: INVALID_ARGUMENT (docs/attachments.md)
    max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES
    #: one-way calls from the peer waiting for an in-flight slot on one stream (they also
    #: stay under max_queued_bytes in bytes); past it this side stops reading from the
    #: peer until half have started; past twice it (only while this side awaits a result
    #: from the peer, so keeps reading) they are dropped, the peer told once by a Fault
    max_waiting_one_way: int = DEFAULT_MAX_WAITING_ONE_WAY

    def __post_init__(self) -> None:
        # each field on its own, by name: a bad one is named with its value (a float
        # count, an infinite timeout), never left to fail later where it is used
        _check_seconds("Limits.max_write_stall", self.max_write_stall)
        # gRPC takes it in milliseconds in a C int (its server handshake timeout option)
        _check_seconds("Limits.handshake_timeout", self.handshake_timeout, MAX_GRPC_SECONDS)
        _check_int("Limits.max_calls_in_flight", self.max_calls_in_flight, 1)
        _check_int("Limits.max_message_size", self.max_message_size, 1024, MAX_MESSAGE_SIZE_LIMIT)
        _check_int("Limits.max_queued_bytes", self.max_queued_bytes, 1)
        _check_int("Limits.max_streams", self.max_streams, 1)
        _check_int("Limits.max_faults", self.max_faults, 1)
        _check_int("Limits.max_attachment_bytes", self.max_attachment_bytes, 0)
        _check_int("Limits.max_waiting_one_way", self.max_waiting_one_way, 1)
        if self.max_queued_bytes < self.max_message_size:
            raise ValueError(
                f"max_queued_bytes must be >= max_message_size (a stream must be able to "
                f"queue one message of the largest size), got {self}"
            )
