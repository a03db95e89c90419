"""What grpclib gets from backchannel's settings: its ``Configuration`` (keepalive, flow
control windows), the TLS contexts a channel or a server takes as ``credentials``, and
the addresses it binds and connects to."""

from __future__ import annotations

import socket
import ssl

from grpclib.config import Configuration

from backchannel.settings import MIN_KEEPALIVE_TIME, Keepalive, Limits

#: what a message may exceed max_message_size by before the transport refuses it from
#: its prefix (as on grpcio): the session refuses those between with a clearer error
SLACK = 64 * 1024


def wire_limit(limits: Limits) -> int:
    """The largest message a stream takes before refusing it from its length prefix."""
    return limits.max_message_size + SLACK


def configuration(keepalive: Keepalive | None) -> Configuration:
    """grpclib's configuration for a channel or a server with this keepalive: a ping
    every ``time`` seconds, with or without calls, unanswered within ``timeout``
    seconds ends the connection."""
    if keepalive is None:
        return Configuration(_keepalive_time=None)
    return Configuration(
        _keepalive_time=keepalive.time,
        _keepalive_timeout=keepalive.timeout,
        _keepalive_permit_without_calls=True,
        _http2_max_pings_without_data=0,
        # grpclib skips a ping sent sooner than this after the last: a little under the
        # keepalive time, so timer jitter never skips one
        _http2_min_sent_ping_interval_without_data=max(MIN_KEEPALIVE_TIME, keepalive.time) * 0.5,
    )


def _wrong_credentials(credentials: object, what: str) -> TypeError:
    kind = f"{type(credentials).__module__}.{type(credentials).__qualname__}"
    hint = ", which is for transport='grpcio'" if kind.startswith("grpc") else ""
    return TypeError(
        f"transport 'grpclib' takes an ssl.SSLContext as credentials= ({what}), got {kind}{hint}"
    )


def client_tls(credentials: object | None) -> ssl.SSLContext | None:
    """The TLS context of a consumer's channel (None: plaintext), with ALPN ``h2``."""
    if credentials is None:
        return None
    if not isinstance(credentials, ssl.SSLContext):
        raise _wrong_credentials(
            credentials,
            "e.g. ssl.create_default_context(cafile=...), with load_cert_chain(...) for mutual TLS",
        )
    credentials.set_alpn_protocols(["h2"])
    return credentials


def verifies_server(context: ssl.SSLContext | None) -> bool:
    """Whether a consumer's TLS context proves whom it talks to: it checks the
    provider's certificate and its host name. One that does not (e.g.
    ``ssl._create_unverified_context()``) counts as plaintext for the token rule:
    anyone on the way could pose as the provider and read the token."""
    return context is not None and context.verify_mode != ssl.CERT_NONE and context.check_hostname


def server_tls(credentials: object | None) -> ssl.SSLContext | None:
    """The TLS context of a provider (None: plaintext), with ALPN ``h2``."""
    if credentials is None:
        return None
    if not isinstance(credentials, ssl.SSLContext):
        raise _wrong_credentials(
            credentials,
            "e.g. ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) with "
            "load_cert_chain(...); verify_mode=CERT_REQUIRED and load_verify_locations(...) "
            "for mutual TLS",
        )
    credentials.set_alpn_protocols(["h2"])
    return credentials


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as host and port; ValueError naming it."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"an address is host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def listening_socket(address: str) -> socket.socket:
    """A socket bound to ``address``, listening: every interface, IPv4 and IPv6, for
    ``[::]``, ``::`` or ``0.0.0.0`` ... as grpc binds them; OSError when it cannot."""
    host, port = split_address(address)
    if host in ("", "::", "*") and socket.has_dualstack_ipv6():
        return socket.create_server(
            ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128
        )
    if host in ("", "*"):
        host = "0.0.0.0"
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, where = infos[0]
    return socket.create_server(where[:2], family=family, backlog=128)
