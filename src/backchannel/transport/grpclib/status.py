"""grpclib's statuses and errors in backchannel's terms: the seam's :class:`Code` and
grpclib's ``Status``, a stream's end marker, the statuses of a call's end (its trailers),
and the one place grpclib's (and h2's) stream errors become backchannel's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpclib.const import Status
from grpclib.encoding.base import StatusDetailsCodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import decode_grpc_message, encode_grpc_message

from backchannel.errors import StreamBroken, TransportError, Unauthenticated
from backchannel.transport import seam
from backchannel.transport.seam import Code
from backchannel.transport.status_details import error_of

__all__ = [
    "EOF",
    "STATUS",
    "RawDetails",
    "Status",
    "status_error",
    "stream_error",
    "translate",
]


class _EndOfStream:
    """The type of :data:`EOF`."""

    def __repr__(self) -> str:
        return "EOF"


#: what a grpclib stream's read returns at the end of the stream
EOF: object = _EndOfStream()

#: the seam's codes as grpclib's (the same numbers)
STATUS = {Code(status.value): status for status in Status}

#: an HTTP/2 reset's error code -> the status a gRPC peer reports for it (gRPC's
#: doc/PROTOCOL-HTTP2.md: CANCEL is CANCELLED, REFUSED_STREAM is UNAVAILABLE, ...)
_RESET_STATUS = {
    0x0: Status.INTERNAL,  # NO_ERROR before the trailers came
    0x7: Status.UNAVAILABLE,  # REFUSED_STREAM
    0x8: Status.CANCELLED,  # CANCEL
    0xB: Status.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: Status.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}


def stream_error(status: Status, message: str) -> GRPCError:
    """A call that ended with ``status`` (what its reads and writes raise)."""
    return GRPCError(status, message)


def reset_error(error_code: int) -> GRPCError:
    """A call the peer reset with HTTP/2 ``error_code``."""
    status = _RESET_STATUS.get(error_code, Status.INTERNAL)
    return GRPCError(status, f"the peer reset the stream (HTTP/2 error code {error_code})")


def terminated_error(reason: str) -> GRPCError:
    """A call whose connection ended (grpclib's reason: lost, GOAWAY, protocol error)."""
    return GRPCError(Status.UNAVAILABLE, reason)


def trailers_status(headers: Sequence[tuple[str, str]]) -> GRPCError | None:
    """The status the trailers (or a trailers-only response) carry: None for OK."""
    fields = dict(headers)
    http = fields.get(":status")
    if http is not None and http != "200":
        return GRPCError(Status.UNKNOWN, f"the server answered HTTP status {http}")
    value = fields.get("grpc-status")
    if value is None:
        return GRPCError(Status.UNKNOWN, "the stream ended without a grpc-status")
    try:
        status = Status(int(value))
    except ValueError:
        return GRPCError(Status.UNKNOWN, f"an invalid grpc-status: {value!r}")
    if status is Status.OK:
        return None
    return GRPCError(status, decode_grpc_message(fields.get("grpc-message", "")))


def trailers(code: Code, message: str, *, only: bool) -> list[tuple[str, str]]:
    """The trailers that end a call with ``code`` (a trailers-only response when
    ``only``: no headers were sent before them)."""
    headers = [(":status", "200"), ("content-type", "application/grpc")] if only else []
    headers.append(("grpc-status", str(int(code))))
    if message:
        headers.append(("grpc-message", encode_grpc_message(message)))
    return headers


def translate(exc: BaseException, peer: str) -> TransportError:
    """The one place grpclib's stream errors become backchannel's."""
    if isinstance(exc, GRPCError) and exc.status is Status.UNAUTHENTICATED:
        error: TransportError = Unauthenticated(f"{peer} refused this consumer: {exc.message}")
    elif isinstance(exc, GRPCError):
        error = StreamBroken(f"the stream to {peer} broke: {exc.status.name}: {exc.message}")
    elif isinstance(exc, StreamTerminatedError):
        error = StreamBroken(f"the stream to {peer} broke: UNAVAILABLE: {exc}")
    else:
        return seam.translate(exc, peer)
    error.__cause__ = exc
    return error


def status_error(exc: GRPCError) -> seam.StatusError:
    """A unary RPC's status as the seam's error (raise it ``from exc``), with the Error
    its details trailer holds (the channel decodes with :class:`RawDetails`)."""
    details = exc.details if isinstance(exc.details, bytes) else None
    return seam.StatusError(Code(exc.status.value), str(exc.message or ""), error_of(details))


class RawDetails(StatusDetailsCodecBase):
    """grpclib's status details codec for bytes made (and read) by
    :mod:`backchannel.transport.status_details`: passed through as they are (grpclib's
    own codec needs googleapis-common-protos)."""

    def encode(self, status: Status, message: str | None, details: Any) -> bytes:
        return details if isinstance(details, bytes) else b""

    def decode(self, status: Status, message: str | None, data: bytes) -> Any:
        return data
