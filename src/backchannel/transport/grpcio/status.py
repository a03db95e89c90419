"""grpc's statuses and errors in backchannel's terms: the seam's :class:`Code` and grpc's
``StatusCode``, a stream's end marker, and the one place grpc's stream errors become
backchannel's."""

from __future__ import annotations

from typing import Any

import grpc

from backchannel.errors import StreamBroken, TransportError, Unauthenticated
from backchannel.transport import seam
from backchannel.transport.seam import Code
from backchannel.transport.status_details import DETAILS_KEY, error_of

#: what a gRPC read returns at the end of the stream
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

#: the seam's codes as grpc's (the same numbers)
STATUS = {Code(status.value[0]): status for status in grpc.StatusCode}


def translate(exc: BaseException, peer: str) -> TransportError:
    """The one place grpc's stream errors become backchannel's."""
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.UNAUTHENTICATED:
        error: TransportError = Unauthenticated(f"{peer} refused this consumer: {exc.details()}")
    elif isinstance(exc, grpc.aio.AioRpcError):
        error = StreamBroken(f"the stream to {peer} broke: {exc.code().name}: {exc.details()}")
    else:
        return seam.translate(exc, peer)
    error.__cause__ = exc
    return error


def status_error(exc: grpc.aio.AioRpcError) -> seam.StatusError:
    """A unary RPC's status as the seam's error (raise it ``from exc``), with the Error
    its details trailer holds."""
    trailers: Any = exc.trailing_metadata() or ()  # (key, value) pairs
    details = next((value for key, value in trailers if key == DETAILS_KEY), None)
    error = error_of(details) if isinstance(details, bytes) else None
    return seam.StatusError(Code(exc.code().value[0]), str(exc.details()), error)
