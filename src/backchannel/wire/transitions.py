"""The protocol's roles and states, and its one table of transition rules: what each side
of a stream may receive in each state, and the state a received frame moves it to.
"""

from __future__ import annotations

import enum


class Role(enum.Enum):
    """Which end of the Connect stream a connection is."""

    CONSUMER = "consumer"
    PROVIDER = "provider"


class State(enum.Enum):
    """Where a connection is in its life."""

    HANDSHAKE = "awaiting handshake"
    OPEN = "open"
    CLOSED = "closed"


# What each side may receive in each state: the one table of transition rules.
# A frame kind not listed is answered with a Fault (or, for a Call, an error Result).
ACCEPTS: dict[tuple[Role, State], frozenset[str]] = {
    (Role.PROVIDER, State.HANDSHAKE): frozenset({"hello", "batch"}),
    (Role.CONSUMER, State.HANDSHAKE): frozenset({"welcome", "fault", "batch", "go_away"}),
    (Role.PROVIDER, State.OPEN): frozenset(
        {"call", "result", "cancel", "release", "go_away", "fault", "batch"}
    ),
    # a Multicast goes from provider to consumer only (callbacks to many instances)
    (Role.CONSUMER, State.OPEN): frozenset(
        {"call", "multicast", "result", "cancel", "release", "go_away", "fault", "batch"}
    ),
}
# The state a received frame kind moves a connection to, when it moves it.
MOVES: dict[tuple[Role, State, str], State] = {
    (Role.PROVIDER, State.HANDSHAKE, "hello"): State.OPEN,
    (Role.CONSUMER, State.HANDSHAKE, "welcome"): State.OPEN,
}
