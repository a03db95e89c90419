"""backchannel: Dubbo-style parameter callbacks and event notify for Python, on gRPC.

Declare an interface, export an implementation on a :class:`Server` (or
:class:`AsyncServer`), and call it through a :class:`Client` (or :class:`AsyncClient`)
reference; every call of a consumer travels on one long-lived gRPC stream.
"""

from backchannel.client import DEFAULT_TIMEOUT, AsyncClient, Client
from backchannel.errors import (
    BackchannelError,
    CallbackGone,
    CallCancelled,
    CallError,
    ChannelClosed,
    CodecError,
    DeadlineExceeded,
    DecodeError,
    EncodeError,
    InvalidArguments,
    LocalProtocolError,
    MethodNotFound,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    ServiceNotFound,
    ShuttingDown,
    StreamBroken,
    TooManyCallbacks,
    TransportError,
)
from backchannel.exports import DEFAULT_CALLBACK_LIMIT
from backchannel.interface import Method, interface
from backchannel.server import AsyncServer, Server

__all__ = [
    "DEFAULT_CALLBACK_LIMIT",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncServer",
    "BackchannelError",
    "CallCancelled",
    "CallError",
    "CallbackGone",
    "ChannelClosed",
    "Client",
    "CodecError",
    "DeadlineExceeded",
    "DecodeError",
    "EncodeError",
    "InvalidArguments",
    "LocalProtocolError",
    "Method",
    "MethodNotFound",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "Server",
    "ServiceNotFound",
    "ShuttingDown",
    "StreamBroken",
    "TooManyCallbacks",
    "TransportError",
    "interface",
]
