"""backchannel: Dubbo-style parameter callbacks and event notify for Python, on gRPC.

Declare an interface, export an implementation on a :class:`Server` (or
:class:`AsyncServer`), and call it through a :class:`Client` (or :class:`AsyncClient`)
reference; every call of a consumer travels on one long-lived gRPC stream.
"""

from backchannel.auth import Authenticator, bearer_tokens, current_identity
from backchannel.broadcast import gather
from backchannel.callbacks import ReverseProxy
from backchannel.client import AsyncClient, Client
from backchannel.config import Config, ConfigError, load_config
from backchannel.errors import (
    BackchannelError,
    CallbackGone,
    CallCancelled,
    CallError,
    ChannelClosed,
    CodecError,
    CredentialsNotSent,
    DeadlineExceeded,
    DecodeError,
    EncodeError,
    InvalidArguments,
    LocalProtocolError,
    MessageTooLarge,
    MethodNotFound,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    ServiceNotFound,
    ShuttingDown,
    StreamBroken,
    TooManyCallbacks,
    TransportError,
    Unauthenticated,
    UnknownCallback,
)
from backchannel.exports import DEFAULT_CALLBACK_LIMIT
from backchannel.interface import Argument, Method, interface, method
from backchannel.server import AsyncServer, Server
from backchannel.settings import DEFAULT_TIMEOUT, Keepalive, Limits

__all__ = [
    "DEFAULT_CALLBACK_LIMIT",
    "DEFAULT_TIMEOUT",
    "Argument",
    "AsyncClient",
    "AsyncServer",
    "Authenticator",
    "BackchannelError",
    "CallCancelled",
    "CallError",
    "CallbackGone",
    "ChannelClosed",
    "Client",
    "CodecError",
    "Config",
    "ConfigError",
    "CredentialsNotSent",
    "DeadlineExceeded",
    "DecodeError",
    "EncodeError",
    "InvalidArguments",
    "Keepalive",
    "Limits",
    "LocalProtocolError",
    "MessageTooLarge",
    "Method",
    "MethodNotFound",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "ReverseProxy",
    "Server",
    "ServiceNotFound",
    "ShuttingDown",
    "StreamBroken",
    "TooManyCallbacks",
    "TransportError",
    "Unauthenticated",
    "UnknownCallback",
    "bearer_tokens",
    "current_identity",
    "gather",
    "interface",
    "load_config",
    "method",
]
