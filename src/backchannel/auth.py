"""Who a consumer is: a pluggable authenticator on the provider, and a bearer-token helper.

The provider's authenticator sees the metadata a consumer's stream (or ``Invoke``) opened
with, and returns an identity (any object) or raises :class:`Unauthenticated`, which
refuses the stream. Provider code reads the identity of the consumer it is serving with
:func:`current_identity`, during a call.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Awaitable, Callable, Mapping
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
