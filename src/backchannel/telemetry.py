"""OpenTelemetry traces and metrics of backchannel calls (``pip install backchannel[otel]``).

One job: turn the calls a session sends and runs into spans and measurements that follow
the OpenTelemetry RPC semantic conventions (v1.45.0, see docs/observability.md), and
carry the trace context inside the envelope (``Call.trace_context``, W3C Trace Context).

The rest of the library calls in at a few marked places, each behind ``if
telemetry.AVAILABLE:`` so that without opentelemetry-api installed a hook costs one
attribute test and nothing from ``opentelemetry`` is imported. Installed but with no
tracer provider and no meter provider configured (the API's default proxies), every
hook returns after one provider check: nothing is allocated or propagated.

Providers are OpenTelemetry's global ones unless :func:`configure` names others (tests
do, to keep their exporters to themselves).
"""

from __future__ import annotations

import contextvars
import functools
import ipaddress
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from backchannel.errors import RemoteError
from backchannel.wire import codec

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.metrics import _internal as metrics_internal
    from opentelemetry.propagators.textmap import Getter, Setter
    from opentelemetry.util.types import AttributeValue
except ImportError:  # the otel extra is not installed: every hook stays off
    AVAILABLE = False
else:
    AVAILABLE = True

from backchannel.v1 import envelope_pb2 as pb

if TYPE_CHECKING:
    from backchannel.transport.session import Session

T = TypeVar("T")

#: the semantic conventions followed, as a schema URL on the tracer and meter
SCHEMA_URL = "https://opentelemetry.io/schemas/1.45.0"
#: ``rpc.system.name`` of every span and measurement
SYSTEM = "backchannel"
#: remembered listener spans per stream, for links; the oldest go first past this
MAX_LINKS = 4096
# server-side codes that mean the server failed (the rest are the caller's mistakes), as
# in the conventions for gRPC
_SERVER_FAULTS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE"}
)


# ---------------------------------------------------------------- configuration


@dataclass
class _Instruments:
    client_duration: Any
    server_duration: Any


@dataclass
class _State:
    tracer_provider: Any = None  # configured explicitly, else OpenTelemetry's global one
    meter_provider: Any = None
    tracer: Any = None  # resolved from a real provider, then kept
    instruments: _Instruments | None = None


_state = _State()
_state_lock = threading.Lock()
# a provider named by environment variable is made on first use of the global getter
_TRACER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
_METER_FROM_ENV = "OTEL_PYTHON_METER_PROVIDER" in os.environ


def configure(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Use these providers for backchannel's spans and metrics instead of the global ones.

    ``configure()`` with no argument goes back to the global providers. Meant for tests
    and for applications that keep several providers; most set the global provider
    (``opentelemetry.trace.set_tracer_provider``) and need not call this.
    """
    global _state
    with _state_lock:
        _state = _State(tracer_provider, meter_provider)


def _tracer() -> Any:
    """The tracer, or None while no real tracer provider is configured."""
    state = _state
    if state.tracer is not None:
        return state.tracer
    provider = state.tracer_provider
    if provider is None:
        # the API's own getter reads os.environ on every call (~1 µs): while no global
        # provider is set, its module variable says so for the cost of a look-up
        if trace._TRACER_PROVIDER is None and not _TRACER_FROM_ENV:
            return None
        provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None  # the API's default: nobody collects spans
    state.tracer = provider.get_tracer("backchannel", _version(), schema_url=SCHEMA_URL)
    return state.tracer


def collecting() -> bool:
    """True when a tracer or meter provider is configured (spans or metrics are kept).

    The hot paths ask this before wrapping a call: with OpenTelemetry installed and no
    provider, a call then costs two look-ups, not a wrapper coroutine and its frame."""
    state = _state
    if state.tracer is not None or state.instruments is not None:
        return True
    return _tracer() is not None or _instruments() is not None


def _instruments() -> _Instruments | None:
    """The instruments, or None while no real meter provider is configured."""
    state = _state
    if state.instruments is not None:
        return state.instruments
    provider = state.meter_provider
    if provider is None:
        if metrics_internal._METER_PROVIDER is None and not _METER_FROM_ENV:
            return None  # as for the tracer: no global provider set
        provider = metrics.get_meter_provider()
    # the API's default before a provider is set is a private _ProxyMeterProvider
    if isinstance(provider, metrics.NoOpMeterProvider) or type(provider).__name__.startswith(
        "_Proxy"
    ):
        return None
    with _state_lock:
        if state.instruments is None:
            state.instruments = _make_instruments(provider)
    return state.instruments


def _make_instruments(provider: Any) -> _Instruments:
    meter = provider.get_meter("backchannel", _version(), schema_url=SCHEMA_URL)
    meter.create_observable_gauge(
        "backchannel.streams.open",
        [_observe(_streams)],
        unit="{stream}",
        description="Connect streams open, by backchannel.role of this side",
    )
    meter.create_observable_gauge(
        "backchannel.callbacks.live",
        [_observe(_live_callbacks)],
        unit="{instance}",
        description="Live callback instances, by export (rpc.service, group, version)",
    )
    meter.create_observable_gauge(
        "backchannel.calls.in_flight",
        [_observe(_in_flight)],
        unit="{call}",
        description="Calls sent and not answered (outgoing) or received and running (incoming)",
    )
    meter.create_observable_gauge(
        "backchannel.calls.waiting",
        [_observe(_waiting)],
        unit="{call}",
        description="Calls waiting for an in-flight slot (max_calls_in_flight) to be sent",
    )
    return _Instruments(
        client_duration=meter.create_histogram(
            "rpc.client.call.duration", unit="s", description="Duration of outgoing calls"
        ),
        server_duration=meter.create_histogram(
            "rpc.server.call.duration", unit="s", description="Duration of incoming calls"
        ),
    )


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("backchannel")
    except PackageNotFoundError:
        return "0"


# ---------------------------------------------------------------- carrying context


if AVAILABLE:  # (the base classes exist only then)

    class _CallSetter(Setter[Any]):
        """Writes propagation headers into ``Call.trace_context``."""

        def set(self, carrier: Any, key: str, value: str) -> None:
            carrier[key] = value

    class _CallGetter(Getter[Any]):
        """Reads propagation headers from ``Call.trace_context`` (keys as sent, lower-case)."""

        def get(self, carrier: Any, key: str) -> list[str] | None:
            value = carrier.get(key) or carrier.get(key.lower())
            return [value] if value else None

        def keys(self, carrier: Any) -> list[str]:
            return list(carrier.keys())

    _SETTER: Setter[Any] = _CallSetter()
    _GETTER: Getter[Any] = _CallGetter()


def carry(function: Callable[..., T]) -> Callable[..., T]:
    """``function``, to run in another thread in the caller's context (its current span).

    Unchanged while tracing is off; each returned function may run once.
    """
    if _tracer() is None:
        return function
    return functools.partial(contextvars.copy_context().run, function)


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


# ---------------------------------------------------------------- outcomes


def _outcome(exc: BaseException | None, cancelled: bool = False) -> tuple[str, str | None]:
    """(rpc.response.status_code, error.type) of a call's outcome."""
    if cancelled:
        return "CANCELLED", "backchannel.CallCancelled"
    if exc is None:
        return "OK", None
    code = "UNKNOWN"
    for cls in type(exc).__mro__:
        if cls in codec._CODES:
            code = pb.Code.Name(codec._CODES[cls])
            break
    if isinstance(exc, RemoteError):
        return code, exc.type_name
    return code, codec.ErrorTypes.name_of(type(exc))


def _finish(
    span: Any,
    exc: BaseException | None,
    cancelled: bool,
    client: bool,
    attributes: dict[str, AttributeValue],
) -> None:
    """Record an outcome on a span (None: metrics only) and in the metric attributes."""
    code, error_type = _outcome(exc, cancelled)
    attributes["rpc.response.status_code"] = code
    if error_type is not None:
        attributes["error.type"] = error_type
    if span is None:
        return
    span.set_attribute("rpc.response.status_code", code)
    if error_type is None:
        return
    span.set_attribute("error.type", error_type)
    if client or code in _SERVER_FAULTS:
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc) if exc else code))
    if exc is not None:
        span.record_exception(exc)


_METRIC_KEYS = frozenset(
    {
        "rpc.system.name",
        "rpc.method",
        "rpc.response.status_code",
        "error.type",
        "server.address",
        "server.port",
    }
)


def _measure(histogram: Any, started: float, attributes: Mapping[str, AttributeValue]) -> None:
    kept = {key: value for key, value in attributes.items() if key in _METRIC_KEYS}
    histogram.record(time.perf_counter() - started, kept)


# ---------------------------------------------------------------- client side


@dataclass
class _Opened:
    """A client span opened early, around a call's event-notify hooks (see :func:`hooks_sync`)."""

    span: Any
    service: str
    method: str
    taken: bool = False


#: the span a notify wrapper opened for the call it is about to make
_OPENED: contextvars.ContextVar[_Opened | None] = contextvars.ContextVar(
    "backchannel_opened_span", default=None
)


def sending(session: Session, call: pb.Call, future: Awaitable[Any]) -> None:
    """A call is about to be sent on ``session``: a client span for it (a child of the
    caller's current span), its context into ``call.trace_context``, and its duration
    measured when ``future`` (its outcome) is done."""
    tracer = _tracer()
    instruments = _instruments()
    if tracer is None and instruments is None:
        return
    stream = _stream(session)
    name, method, link = _names(stream, call)
    attributes = _attributes(stream, call, method, client=True)
    span = None
    owned = True  # False: a notify wrapper ends it, after the hooks
    if tracer is not None:
        opened = _OPENED.get()
        if (
            opened is not None
            and not opened.taken
            and (opened.service, opened.method, call.callback_id) == (call.service, call.method, 0)
        ):
            opened.taken, span, owned = True, opened.span, False
            span.set_attributes(attributes)
        if span is None:
            links = [trace.Link(link)] if link is not None else None
            span = tracer.start_span(
                name, kind=trace.SpanKind.CLIENT, attributes=attributes, links=links
            )
        propagate.inject(
            call.trace_context, context=trace.set_span_in_context(span), setter=_SETTER
        )
        if not call.callback_id:
            _remember_listeners(stream, call, span)
    started = time.perf_counter()

    def done(outcome: Any) -> None:
        cancelled = outcome.cancelled()
        exc = None if cancelled else outcome.exception()
        _finish(span, exc, cancelled, True, attributes)
        if span is not None and owned:
            span.end()
        if instruments is not None:
            _measure(instruments.client_duration, started, attributes)

    future.add_done_callback(done)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- server side


async def serve(
    session: Session | None,
    call: pb.Call,
    dispatch: Callable[[pb.Call], Awaitable[pb.Value]],
    peer: str = "",
    server_address: str = "",
) -> pb.Value:
    """Run ``dispatch(call)`` inside a server span, a child of the caller's span in
    ``call.trace_context`` (a root span when it has none), and measure its duration.

    ``session`` is None for the unary Invoke, whose ``peer`` (grpc's name of the caller)
    and ``server_address`` describe it instead.
    """
    tracer = _tracer()
    instruments = _instruments()
    if tracer is None and instruments is None:
        return await dispatch(call)
    if session is not None:
        stream: _Stream | None = _stream(session)
    else:
        stream = _describe_stream("provider", peer, server_address)
    name, method, link = _names(stream, call)
    attributes = _attributes(stream, call, method, client=False)
    _OPENED.set(None)  # this call's own context: nothing opened by a caller applies here
    span = None
    token = None
    if tracer is not None:
        # a fresh base: the reader's context (inherited from whoever opened the stream)
        # is not this call's parent
        parent = propagate.extract(
            call.trace_context, context=otel_context.Context(), getter=_GETTER
        )
        links = [trace.Link(link)] if link is not None else None
        span = tracer.start_span(
            name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes, links=links
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        if stream is not None and not call.callback_id:
            _remember_listeners(stream, call, span)
    started = time.perf_counter()
    exc: BaseException | None = None
    try:
        return await dispatch(call)
    except BaseException as failure:
        exc = failure
        raise
    finally:
        if token is not None:
            otel_context.detach(token)
        cancelled = exc is not None and not isinstance(exc, Exception)  # CancelledError
        _finish(span, None if cancelled else exc, cancelled, False, attributes)
        if span is not None:
            span.end()
        if instruments is not None:
            _measure(instruments.server_duration, started, attributes)


# ---------------------------------------------------------------- event notify


def _open(service: str, method: str) -> tuple[_Opened | None, Any]:
    """Open the client span of a call with notify hooks: (it, context token), or Nones."""
    tracer = _tracer()
    if tracer is None:
        return None, None
    span = tracer.start_span(f"{service}/{method}", kind=trace.SpanKind.CLIENT)
    token = otel_context.attach(trace.set_span_in_context(span))
    opened = _Opened(span, service, method)
    _OPENED.set(opened)
    return opened, token


def _close(opened: _Opened | None, token: Any, exc: BaseException | None = None) -> None:
    if token is not None:
        otel_context.detach(token)
        _OPENED.set(None)
    if opened is None:
        return
    if exc is not None and not opened.taken:
        # it failed before the call was made (a bad argument): record that instead
        _finish(opened.span, exc, False, True, {})
    opened.span.end()


def hooks_sync(service: str, method: str, call: Callable[..., Any]) -> Callable[..., Any]:
    """The sync client's notify-wrapped ``call``, run inside the call's span: the hooks
    (``oninvoke`` before, ``onreturn``/``onthrow`` after) see it as their current span.
    A returned future (``async_=True``) ends the span when it is done."""

    @functools.wraps(call)
    def traced(*args: Any, **kwargs: Any) -> Any:
        opened, token = _open(service, method)
        try:
            result = call(*args, **kwargs)
        except BaseException as exc:
            _close(opened, token, exc)
            raise
        if opened is not None and hasattr(result, "add_done_callback"):
            _close(None, token)  # the caller goes on; the span ends with the future
            result.add_done_callback(lambda done: _close(opened, None))
            return result
        _close(opened, token)
        return result

    return traced


def hooks_async(
    service: str, method: str, run: Callable[..., Coroutine[Any, Any, T]]
) -> Callable[..., Coroutine[Any, Any, T]]:
    """The asyncio client's notify-wrapped coroutine ``run``, inside the call's span."""

    @functools.wraps(run)
    async def traced(*args: Any, **kwargs: Any) -> T:
        opened, token = _open(service, method)
        try:
            result = await run(*args, **kwargs)
        except BaseException as exc:
            _close(opened, token, exc)
            raise
        _close(opened, token)
        return result

    return traced


# ---------------------------------------------------------------- gauges


def _observe(read: Callable[[list[Session]], Iterable[tuple[int, dict[str, Any]]]]) -> Any:
    def callback(options: Any) -> Iterator[Any]:
        with _streams_lock:
            sessions = [s for s in _by_session if s.cause is None]
        for value, attributes in read(sessions):
            yield metrics.Observation(value, attributes)

    return callback


def _role(session: Session) -> str:
    return str(session.connection.role.value)


def _streams(sessions: list[Session]) -> Iterable[tuple[int, dict[str, Any]]]:
    counts: dict[str, int] = {"consumer": 0, "provider": 0}
    for session in sessions:
        counts[_role(session)] = counts.get(_role(session), 0) + 1
    return [(count, {"backchannel.role": role}) for role, count in counts.items()]


def _live_callbacks(sessions: list[Session]) -> Iterable[tuple[int, dict[str, Any]]]:
    totals: dict[tuple[str, tuple[str, str, str]], int] = {}
    for session in sessions:
        table = getattr(session.dispatcher, "callbacks", None)
        for key, live in dict(getattr(table, "_per_service", {})).items():
            totals[(_role(session), key)] = totals.get((_role(session), key), 0) + live
    found = []
    for (role, (service, group, version)), live in totals.items():
        attributes = {"backchannel.role": role, "rpc.service": service}
        if group:
            attributes["backchannel.group"] = group
        if version:
            attributes["backchannel.version"] = version
        found.append((live, attributes))
    return found


def _in_flight(sessions: list[Session]) -> Iterable[tuple[int, dict[str, Any]]]:
    totals: dict[tuple[str, str], int] = {}
    for session in sessions:
        role = _role(session)
        for direction, count in (
            ("outgoing", session.connection.pending_outgoing),
            ("incoming", session.connection.pending_incoming),
        ):
            totals[(role, direction)] = totals.get((role, direction), 0) + count
    return [
        (count, {"backchannel.role": role, "backchannel.direction": direction})
        for (role, direction), count in totals.items()
    ]


def _waiting(sessions: list[Session]) -> Iterable[tuple[int, dict[str, Any]]]:
    totals: dict[str, int] = {}
    for session in sessions:
        totals[_role(session)] = totals.get(_role(session), 0) + len(session._waiting)
    return [(count, {"backchannel.role": role}) for role, count in totals.items()]
