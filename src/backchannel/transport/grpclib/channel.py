"""A consumer's side of grpclib: a connection to one provider address (grpclib's
``Channel``), the Connect streams opened on it, and one unary call for the command line."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError
from grpclib.metadata import USER_AGENT, encode_metadata
from grpclib.protocol import H2Protocol, Stream

from backchannel.settings import Keepalive, Limits
from backchannel.transport.grpclib.call import Call
from backchannel.transport.grpclib.liveness import watch
from backchannel.transport.grpclib.options import (
    client_tls,
    configuration,
    split_address,
    wire_limit,
)
from backchannel.transport.grpclib.status import (
    EOF,
    RawDetails,
    Status,
    status_error,
    stream_error,
    trailers_status,
)
from backchannel.transport.seam import SERVICE_NAME, Code, Parse, Serialize, StatusError

CONNECT_PATH = f"/{SERVICE_NAME}/Connect"


class ClientCall(Call):
    """A consumer's Connect stream: returned at once, opened in the background (the
    connection, then the request headers); the first write waits for that, and a read
    fails with what stopped it."""

    def __init__(
        self, channel: GrpclibChannel, metadata: Sequence[tuple[str, str]], limit: int
    ) -> None:
        # the stream's HTTP/2 half is set up once connected (Stream.__init__ in _open)
        self._setup(channel.parse, limit)
        self.id = None
        self._serialize = channel.serialize
        self._channel = channel
        self._before_write = self._wait_open
        self._opening: asyncio.Task[None] | None = self._loop.create_task(
            self._open(list(metadata)), name=f"backchannel-connect {channel.address}"
        )

    async def _open(self, metadata: list[tuple[str, str]]) -> None:
        channel = self._channel
        try:
            protocol = await asyncio.wait_for(channel.connection(), channel.connect_timeout)
            if self._error is not None:  # cancelled meanwhile
                return
            connection = protocol.processor.connection
            Stream.__init__(self, connection, connection._connection, connection._transport)
            headers = [*channel.headers, *encode_metadata(metadata)]
            self._release = await self.send_request(headers, _processor=protocol.processor)
            if self._error is not None:  # cancelled while the request went out
                self._close()
        except TimeoutError:
            self._fail(
                stream_error(
                    Status.UNAVAILABLE,
                    f"failed to connect to {channel.address} within "
                    f"{channel.connect_timeout} s (connect_timeout)",
                )
            )
        except Exception as exc:  # refused, unreachable, a TLS failure, a broken connection
            self._fail(
                stream_error(
                    Status.UNAVAILABLE,
                    f"failed to connect to {channel.address}: {type(exc).__name__}: {exc}",
                )
            )
        finally:
            self._opening = None

    async def _wait_open(self) -> None:
        opening = self._opening
        if opening is not None:
            await asyncio.shield(opening)
        self._before_write = None
        if self._error is not None:
            raise self._error

    def finish(self) -> Any:
        """The provider ended the stream: EOF for OK, else its status raised."""
        headers = self.trailers if self.trailers is not None else self.headers
        error = trailers_status(headers or [])
        self._fail(error or stream_error(Status.OK, "the stream ended"))
        self._close()
        if error is not None:
            raise error
        return EOF

    def refused(self, status: Status, message: str) -> None:
        self._close()

    def __terminated__(self, reason: str) -> None:
        super().__terminated__(reason)
        # not now: grpclib terminates the streams of a lost connection while iterating
        # over the table release takes this one out of
        self._loop.call_soon(self.release)

    def _close(self) -> None:
        """The call is over on this side: reset it when still open, and forget it."""
        if self.id is not None:
            self.reset_now()
            self.release()

    def cancel(self) -> bool:
        """End the stream at once (the provider sees it cancelled)."""
        if self._error is not None:
            return False
        self._fail(stream_error(Status.CANCELLED, "Locally cancelled by application!"))
        if self._opening is not None:
            self._opening.cancel()
        self._close()
        return True

    async def done_writing(self) -> None:
        """Half-close: nothing more is written."""
        if self._before_write is not None:
            await self._before_write()
        if self._error is None and self.closable:
            await self.end()


class GrpclibChannel:
    """grpclib's ``Channel`` to one provider address; each :meth:`connect` opens a
    Connect stream on its connection."""

    def __init__(
        self,
        address: str,
        *,
        credentials: object | None,
        limits: Limits,
        keepalive: Keepalive | None,
        connect_timeout: float,
        parse: Parse,
        serialize: Serialize,
    ) -> None:
        tls = client_tls(credentials)
        host, port = split_address(address)
        self.address = address
        self.parse = parse
        self.serialize = serialize
        self.connect_timeout = connect_timeout
        self._limit = wire_limit(limits)
        self._channel = Channel(host, port, ssl=tls, config=configuration(keepalive))
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.headers = [
            (":method", "POST"),
            (":scheme", "https" if tls is not None else "http"),
            (":path", CONNECT_PATH),
            (":authority", authority),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("user-agent", f"backchannel {USER_AGENT}"),
        ]

    async def connection(self) -> H2Protocol:
        """The connection, made when there is none (or it was lost)."""
        protocol: H2Protocol = await self._channel.__connect__()
        watch(protocol.connection)
        return protocol

    def connect(self, metadata: Sequence[tuple[str, str]]) -> ClientCall:
        """Open a Connect stream sending ``metadata``; it connects in the background."""
        return ClientCall(self, metadata, self._limit)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._channel.close()


async def unary(
    address: str, method: str, request: Message, response_type: type[Message], timeout: float
) -> Any:
    """Call ``method`` of the envelope service at ``address`` once, over plaintext."""
    host, port = split_address(address)
    channel = Channel(host, port, status_details_codec=RawDetails())  # a failed Invoke's
    try:
        async with channel.request(
            f"/{SERVICE_NAME}/{method}",
            Cardinality.UNARY_UNARY,
            type(request),
            response_type,
            timeout=timeout,
        ) as stream:
            await stream.send_message(request, end=True)
            reply = await stream.recv_message()
    except GRPCError as exc:
        raise status_error(exc) from exc
    except OSError as exc:  # refused, unreachable: what grpc says UNAVAILABLE for
        raise StatusError(
            Code.UNAVAILABLE, f"failed to connect to {address}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        channel.close()
    return reply
