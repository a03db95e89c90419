"""The RPCs a grpclib provider serves, as the seam sees them: a Connect stream
(:class:`ServerCall`, the HTTP/2 stream itself, framed by hand) and an RPC grpclib's own
request handler serves (:class:`MappedRpc`: Invoke, Describe, health, reflection)."""

from __future__ import annotations

import asyncio
import contextlib
from base64 import b64decode
from collections.abc import Sequence
from typing import Any, NoReturn

from grpclib.exceptions import GRPCError
from grpclib.server import Stream as GrpclibStream
from h2.errors import ErrorCodes

from backchannel.transport.grpclib.call import Call
from backchannel.transport.grpclib.status import STATUS, Status, trailers
from backchannel.transport.seam import Code

#: request headers that are not the caller's metadata
_NOT_METADATA = frozenset({"te", "content-type"})
#: the response headers that open a call's messages
_OPENING = [(":status", "200"), ("content-type", "application/grpc")]


def peer_name(address: Any) -> str:
    """A peer's address as grpc names it: ``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    return f"unix:{address}" if address else "unknown"


def metadata_of(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """A request's metadata (binary values decoded as UTF-8)."""
    metadata: dict[str, str] = {}
    for key, value in headers:
        if key.startswith((":", "grpc-")) or key in _NOT_METADATA:
            continue
        if key.endswith("-bin"):
            with contextlib.suppress(ValueError):
                padded = value + "=" * (-len(value) % 4)
                value = b64decode(padded).decode(errors="replace")
        metadata[key] = value
    return metadata


class Ended(Exception):
    """The handler ended its RPC with a status (abort, refuse): nothing more to send."""


class ServerCall(Call):
    """A Connect stream a grpclib provider serves: its ``read`` and ``write`` are the
    session's; the status at its end goes in the trailers."""

    _headers_sent = False
    _trailers_sent = False
    request_headers: Sequence[tuple[str, str]] = ()

    def opened(self, headers: Sequence[tuple[str, str]], serialize: Any) -> None:
        """The request came with ``headers``; messages are sent through ``serialize``."""
        self.request_headers = headers
        self._serialize = serialize
        self._before_write = self._open

    async def _open(self) -> None:
        """Before the first message: the response headers."""
        self._before_write = None
        if self._error is None and self.send_now(_OPENING, end=False):
            self._headers_sent = True

    def peer(self) -> str:
        return peer_name(self._transport.get_extra_info("peername"))

    def metadata(self) -> dict[str, str]:
        return metadata_of(self.request_headers)

    def end_call(self, code: Code, message: str) -> None:
        """End the call with ``code``: the trailers, then a reset if the caller still
        sends (it is told to stop)."""
        if self._trailers_sent:
            return
        self._trailers_sent = True
        self._before_write = None
        sent = self.send_now(trailers(code, message, only=not self._headers_sent), end=True)
        if sent and self.closable:
            self.reset_nowait(ErrorCodes.NO_ERROR)
        if self._error is None:
            self._fail(GRPCError(STATUS[code], message or "the call ended"))

    async def abort(self, code: Code, message: str) -> NoReturn:
        self.end_call(code, message)
        raise Ended(f"{code.name}: {message}")

    async def refuse(self, code: Code, message: str) -> NoReturn:
        """End the stream with a status after reading the caller's first message (a
        consumer's hello), as on grpcio: a peer whose first write is still under way
        then sees this status, not a reset."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.read(), 2.0)
        await self.abort(code, message)

    def refused(self, status: Status, message: str) -> None:
        """A message over the limit: the call ends with ``status`` at once."""
        self.end_call(Code(status.value), message)


class MappedRpc:
    """An RPC grpclib's request handler serves, as the seam's
    :class:`~backchannel.transport.seam.Rpc`: ended by raising grpclib's GRPCError."""

    __slots__ = ("_stream",)

    def __init__(self, stream: GrpclibStream[Any, Any]) -> None:
        self._stream = stream

    def peer(self) -> str:
        return peer_name(self._stream.peer.addr())

    def metadata(self) -> dict[str, str]:
        return {
            key: value if isinstance(value, str) else value.decode(errors="replace")
            for key, value in (self._stream.metadata or {}).items()
        }

    async def abort(self, code: Code, message: str) -> NoReturn:
        raise GRPCError(STATUS[code], message)

    async def refuse(self, code: Code, message: str) -> NoReturn:
        raise GRPCError(STATUS[code], message)
