"""What the spans of one session share: its side and addresses (tracked when it starts),
the listener spans its callbacks link to, and each call's name and attributes.

Needs nothing of OpenTelemetry at run time (its types only)."""

from __future__ import annotations

import ipaddress
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backchannel.v1 import envelope_pb2 as pb

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from backchannel.transport.session import Session

#: ``rpc.system.name`` of every span and measurement
SYSTEM = "backchannel"
#: remembered listener spans per stream, for links; the oldest go first past this
MAX_LINKS = 4096


# ---------------------------------------------------------------- per stream


@dataclass
class _Stream:
    """What the spans of one session share: its side, addresses, and listener spans."""

    role: str  # "consumer" or "provider"
    peer: dict[str, AttributeValue]  # network.peer.* of the other end
    server: dict[str, AttributeValue]  # server.* of the provider
    # callback id -> (listener interface, the span of the forward call that passed it)
    listeners: dict[int, tuple[str, Any]] = field(default_factory=dict)


_streams_lock = threading.Lock()
_by_session: weakref.WeakKeyDictionary[Session, _Stream] = weakref.WeakKeyDictionary()


def track(session: Session, server_address: str) -> None:
    """A session started; ``server_address`` is the provider's ``host:port``.

    Its calls get its addresses as attributes, and the gauges count it.
    """
    stream = _describe_stream(session.connection.role.value, session.peer, server_address)
    with _streams_lock:
        _by_session[session] = stream


def _stream(session: Session) -> _Stream:
    stream = _by_session.get(session)
    if stream is None:  # a session nobody tracked (tests): what its peer name says
        track(session, session.peer if session.connection.role.value == "consumer" else "")
        stream = _by_session[session]
    return stream


def _describe_stream(role: str, peer: str, server_address: str) -> _Stream:
    server = _host_port("server", server_address)
    if role == "consumer":  # the peer is the provider, named by the address dialled
        host, port = server.get("server.address"), server.get("server.port")
        remote: dict[str, AttributeValue] = {}
        if isinstance(host, str) and _is_ip(host):  # no DNS look-up for an attribute
            remote = {"network.peer.address": host}
            if port is not None:
                remote["network.peer.port"] = port
    else:  # grpc's peer name of the consumer: "ipv4:127.0.0.1:54321", "ipv6:[::1]:5"
        remote = _host_port("network.peer", peer.partition(":")[2] if ":" in peer else peer)
    remote["network.transport"] = "tcp"
    return _Stream(role, remote, server)


def _host_port(prefix: str, address: str) -> dict[str, AttributeValue]:
    host, _, port = address.rpartition(":")
    if not host:
        return {}
    found: dict[str, AttributeValue] = {f"{prefix}.address": host.strip("[]")}
    if port.isdigit():
        found[f"{prefix}.port"] = int(port)
    return found


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _remember_listeners(stream: _Stream, call: pb.Call, span: Any) -> None:
    """Keep the span of a forward call for each listener it passes, for links."""
    for value in call.args:
        if value.WhichOneof("kind") == "callback_value":
            ref = value.callback_value
            stream.listeners[ref.id] = (ref.interface, span.get_span_context())
            if len(stream.listeners) > MAX_LINKS:
                del stream.listeners[next(iter(stream.listeners))]


def _names(stream: _Stream | None, call: pb.Call) -> tuple[str, str, Any]:
    """(span name, rpc.method, the link) of a call: ``{service}/{method}``; a callback's
    service is its listener's interface."""
    if not call.callback_id:
        full = f"{call.service}/{call.method}"
        return full, full, None
    interface, link = "", None
    if stream is not None and (known := stream.listeners.get(call.callback_id)) is not None:
        interface, link = known
    full = f"{interface or 'callback'}/{call.method}"
    return full, full, link


def _attributes(
    stream: _Stream | None, call: pb.Call, method: str, client: bool
) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {"rpc.system.name": SYSTEM, "rpc.method": method}
    if stream is not None:
        if not call.callback_id:  # a forward call: its server is the provider
            attributes.update(stream.server)
        elif client:  # a callback's server is the consumer (roles swapped): the peer
            attributes.update(_as_server(stream.peer))
        # (a consumer running a callback has no listening address to report)
        attributes.update(stream.peer)
    if call.group:
        attributes["backchannel.group"] = call.group
    if call.version:
        attributes["backchannel.version"] = call.version
    if call.callback_id:
        attributes["backchannel.callback_id"] = call.callback_id
    return attributes


def _as_server(peer: Mapping[str, AttributeValue]) -> dict[str, AttributeValue]:
    found: dict[str, AttributeValue] = {}
    if "network.peer.address" in peer:
        found["server.address"] = peer["network.peer.address"]
    if "network.peer.port" in peer:
        found["server.port"] = peer["network.peer.port"]
    return found
