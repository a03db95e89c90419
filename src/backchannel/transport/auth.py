"""Who a consumer is: a pluggable authenticator on the provider, a bearer-token helper,
and the consumer's rule for where its token may go.

The provider's authenticator sees the metadata a consumer's stream (or ``Invoke``) opened
with, and returns an identity (any object) or raises :class:`Unauthenticated`, which
refuses the stream. Provider code reads the identity of the consumer it is serving with
:func:`current_identity`, during a call.

A consumer sends its token (``authorization`` metadata) only where nobody on the way
can read it, as gRPC does with call credentials: over TLS, whose server certificate gRPC
verifies, or to a loopback address; anywhere else unless the application opts in with
``send_token_over_plaintext=True`` (:func:`token_refusal`).
"""

from __future__ import annotations

import contextvars
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from backchannel.errors import Unauthenticated

#: metadata -> identity; may be a coroutine function; raises Unauthenticated to refuse
Authenticator = Callable[[Mapping[str, str]], Any | Awaitable[Any]]

_IDENTITY: contextvars.ContextVar[object] = contextvars.ContextVar("backchannel_identity")


def current_identity() -> Any:
    """The identity the authenticator gave the consumer whose call is running now.

    None when the provider has no authenticator; a LookupError outside a call.
    """
    try:
        return _IDENTITY.get()
    except LookupError:
        raise LookupError("current_identity() is only known while a call is running") from None


def set_identity(identity: object) -> None:
    """Record the identity for the calls of the stream being served (the server does)."""
    _IDENTITY.set(identity)


def bearer_tokens(tokens: Mapping[str, object]) -> Authenticator:
    """An authenticator accepting ``authorization: Bearer <token>`` for the given tokens.

    ``tokens`` maps each accepted token to the identity its holder gets.
    """
    accepted = dict(tokens)

    def authenticate(metadata: Mapping[str, str]) -> object:
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("no bearer token: send metadata 'authorization: Bearer <token>'")
        for known, identity in accepted.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return identity
        raise Unauthenticated("the bearer token is not valid")

    return authenticate


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends to authenticate with ``token``."""
    return (("authorization", f"Bearer {token}"),)


#: metadata keys whose value is a credential: never sent in plaintext to another host
CREDENTIAL_KEYS = frozenset({"authorization"})
#: the client setting that sends credentials over plaintext all the same
PLAINTEXT_OPT_IN = "send_token_over_plaintext=True"
# gRPC target schemes that never leave the machine
_LOCAL_SCHEMES = ("unix:", "unix-abstract:")


def carries_credentials(metadata: Iterable[tuple[str, str]]) -> bool:
    """Whether ``metadata`` holds a credential (an ``authorization`` entry)."""
    return any(key.lower() in CREDENTIAL_KEYS for key, _value in metadata)


def is_loopback(address: str) -> bool:
    """Whether a gRPC target never leaves this machine: a host of 127.0.0.0/8, ``::1``
    or ``localhost`` (``host:port``, ``[::1]:port``, ``dns:``, ``ipv4:``/``ipv6:``
    lists whose every address is loopback), or a Unix socket. Anything not understood
    is not loopback."""
    if address.startswith(_LOCAL_SCHEMES):
        return True
    if address.startswith(("ipv4:", "ipv6:")):
        hosts = [_host(item) for item in address.partition(":")[2].split(",")]
        return bool(hosts) and all(_loopback_host(host) for host in hosts)
    if address.startswith("dns:"):
        rest = address[len("dns:") :]
        if rest.startswith("//"):  # dns://[authority]/host:port
            rest = rest[2:].partition("/")[2]
        address = rest
    return _loopback_host(_host(address))


def _host(address: str) -> str:
    host, colon, _port = address.rpartition(":")
    if not colon:
        host = address
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return "" if ":" in host else host  # an IPv6 address must be bracketed before a port


def _loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it could resolve anywhere
        return False


def token_refusal(addresses: Iterable[str]) -> str:
    """Why the token is not sent to ``addresses`` (plaintext, not loopback), naming the
    settings that would allow it."""
    listed = list(addresses)
    what = (
        "the connection would be plaintext (or TLS that does not verify the provider) and "
        "the address is not loopback"
        if len(listed) == 1
        else "the connections would be plaintext (or TLS that does not verify the provider) "
        "and the addresses are not loopback"
    )
    return (
        f"not sending the token (authorization metadata) to {', '.join(listed)}: {what}, "
        "so anyone on the way could read it; give credentials=grpc.ssl_channel_credentials"
        "(...) (transport 'grpcio') or a verifying ssl.SSLContext (transport 'grpclib') for "
        f"TLS, or set {PLAINTEXT_OPT_IN} to send it anyway"
    )
