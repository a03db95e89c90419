"""A consumer's side of grpcio: a ``grpc.aio`` channel to one provider address and the
Connect streams opened on it; one unary call for the command line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import grpc.experimental
from google.protobuf.message import Message

from backchannel.settings import Keepalive, Limits
from backchannel.transport.grpcio.options import link_options
from backchannel.transport.grpcio.status import status_error
from backchannel.transport.seam import SERVICE_NAME, Parse, Serialize, Stream

#: grpc's "credentials" for a plaintext channel (one shared object): no TLS either
PLAINTEXT = grpc.experimental.insecure_channel_credentials()  # type: ignore[no-untyped-call]

CONNECT_PATH = f"/{SERVICE_NAME}/Connect"


class GrpcioChannel:
    """A ``grpc.aio`` channel to one provider address; each :meth:`connect` opens a
    Connect stream on it, the gRPC call itself (its ``read`` and ``write`` are the
    stream's: nothing stands between them and the session)."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        limits: Limits,
        keepalive: Keepalive | None,
        connect_timeout: float,
        parse: Parse,
        serialize: Serialize,
    ) -> None:
        options = link_options(limits, keepalive, connect_timeout)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._connect = self._channel.stream_stream(
            CONNECT_PATH,
            request_serializer=serialize,
            response_deserializer=parse,
        )

    def connect(self, metadata: Sequence[tuple[str, str]]) -> Stream:
        stream: Stream = self._connect(None, metadata=metadata)
        return stream

    async def close(self) -> None:
        await self._channel.close(None)


async def unary(
    address: str, method: str, request: Message, response_type: type[Message], timeout: float
) -> Any:
    """Call ``method`` of the envelope service at ``address`` once, over plaintext."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            f"/{SERVICE_NAME}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            return await call(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise status_error(exc) from exc
