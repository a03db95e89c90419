"""Which tracer and meter backchannel reports to (:func:`configure`, else OpenTelemetry's
global providers), whether anybody collects at all (:func:`collecting`), and the
instruments: two duration histograms, and the gauges read from the tracked sessions.

Importable without OpenTelemetry: :data:`AVAILABLE` is then False, and nothing else
here may be called but :func:`configure`.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from backchannel.telemetry.streams import _by_session, _streams_lock

try:
    from opentelemetry import metrics, trace
    from opentelemetry.metrics import _internal as metrics_internal
except ImportError:  # the otel extra is not installed: every hook stays off
    AVAILABLE = False
else:
    AVAILABLE = True

if TYPE_CHECKING:
    from backchannel.transport.session import Session

T = TypeVar("T")

#: the semantic conventions followed, as a schema URL on the tracer and meter
SCHEMA_URL = "https://opentelemetry.io/schemas/1.45.0"


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


def carry(function: Callable[..., T]) -> Callable[..., T]:
    """``function``, to run in another thread in the caller's context (its current span).

    Unchanged while tracing is off; each returned function may run once.
    """
    if _tracer() is None:
        return function
    return functools.partial(contextvars.copy_context().run, function)


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
