"""backchannel: Dubbo-style parameter callbacks and event notify for Python, on gRPC.

Declare an interface, export an implementation on a :class:`Server` (or
:class:`AsyncServer`), and call it through a :class:`Client` (or :class:`AsyncClient`)
reference; every call of a consumer travels on one long-lived gRPC stream.

Importing ``backchannel`` loads none of its layers: each public name below is imported from
its module on first use (PEP 562), so that ``import backchannel.wire.protocol`` stays free of
asyncio and grpc (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from backchannel.rpc.attachments import attach, attachments
    from backchannel.rpc.exports import DEFAULT_CALLBACK_LIMIT
    from backchannel.rpc.filters import Filter, Invocation
    from backchannel.rpc.gather import gather, gather_each
    from backchannel.rpc.interface import Argument, Interface, Method, interface, method
    from backchannel.rpc.provider import Peer
    from backchannel.rpc.provider_callbacks import ReverseProxy
    from backchannel.server import AsyncServer, Server
    from backchannel.settings import DEFAULT_TIMEOUT, Keepalive, Limits
    from backchannel.transport.auth import Authenticator, bearer_tokens, current_identity

#: where each public name lives
_HOMES = {
    "Argument": "backchannel.rpc.interface",
    "AsyncClient": "backchannel.client",
    "AsyncServer": "backchannel.server",
    "Authenticator": "backchannel.transport.auth",
    "BackchannelError": "backchannel.errors",
    "CallCancelled": "backchannel.errors",
    "CallError": "backchannel.errors",
    "CallbackGone": "backchannel.errors",
    "ChannelClosed": "backchannel.errors",
    "Client": "backchannel.client",
    "CodecError": "backchannel.errors",
    "Config": "backchannel.config",
    "ConfigError": "backchannel.config",
    "CredentialsNotSent": "backchannel.errors",
    "DEFAULT_CALLBACK_LIMIT": "backchannel.rpc.exports",
    "DEFAULT_TIMEOUT": "backchannel.settings",
    "DeadlineExceeded": "backchannel.errors",
    "DecodeError": "backchannel.errors",
    "EncodeError": "backchannel.errors",
    "Filter": "backchannel.rpc.filters",
    "Invocation": "backchannel.rpc.filters",
    "Interface": "backchannel.rpc.interface",
    "InvalidArguments": "backchannel.errors",
    "Keepalive": "backchannel.settings",
    "Limits": "backchannel.settings",
    "LocalProtocolError": "backchannel.errors",
    "MessageTooLarge": "backchannel.errors",
    "Method": "backchannel.rpc.interface",
    "MethodNotFound": "backchannel.errors",
    "Peer": "backchannel.rpc.provider",
    "ProtocolError": "backchannel.errors",
    "RemoteError": "backchannel.errors",
    "RemoteProtocolError": "backchannel.errors",
    "ReverseProxy": "backchannel.rpc.provider_callbacks",
    "Server": "backchannel.server",
    "ServiceNotFound": "backchannel.errors",
    "ShuttingDown": "backchannel.errors",
    "StreamBroken": "backchannel.errors",
    "TooManyCallbacks": "backchannel.errors",
    "TransportError": "backchannel.errors",
    "Unauthenticated": "backchannel.errors",
    "UnknownCallback": "backchannel.errors",
    "attach": "backchannel.rpc.attachments",
    "attachments": "backchannel.rpc.attachments",
    "bearer_tokens": "backchannel.transport.auth",
    "current_identity": "backchannel.transport.auth",
    "gather": "backchannel.rpc.gather",
    "gather_each": "backchannel.rpc.gather",
    "interface": "backchannel.rpc.interface",
    "load_config": "backchannel.config",
    "method": "backchannel.rpc.interface",
}

#: the package's modules and layers, loaded on first use as attributes of the package
_SUBMODULES = frozenset(
    {"cli", "client", "cluster", "config", "config_keys", "errors", "rpc", "server"}
    | {"settings", "telemetry", "transport", "v1", "wire"}
)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
    elif name in _SUBMODULES:
        # ``import backchannel`` then ``backchannel.telemetry.configure(...)``: submodules
        # are attributes too, as when this package imported them all at once
        value = importlib.import_module(f"backchannel.{name}")
    else:
        raise AttributeError(f"module 'backchannel' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES, *_SUBMODULES})


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
    "Filter",
    "Interface",
    "InvalidArguments",
    "Invocation",
    "Keepalive",
    "Limits",
    "LocalProtocolError",
    "MessageTooLarge",
    "Method",
    "MethodNotFound",
    "Peer",
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
    "attach",
    "attachments",
    "bearer_tokens",
    "current_identity",
    "gather",
    "gather_each",
    "interface",
    "load_config",
    "method",
]
