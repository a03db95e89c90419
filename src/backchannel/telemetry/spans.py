"""The spans and durations of calls: a client span per call sent (:func:`sending`), a
server span per call run (:func:`serve`), the span a notify-wrapped call opens around its
hooks (:func:`hooks_sync`, :func:`hooks_async`), and each call's outcome recorded as the
OpenTelemetry RPC conventions say. Imported only when OpenTelemetry is installed.
"""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.util.types import AttributeValue

from backchannel.errors import RemoteError
from backchannel.telemetry.providers import _instruments, _tracer
from backchannel.telemetry.streams import (
    _attributes,
    _describe_stream,
    _names,
    _remember_listeners,
    _Stream,
    _stream,
)
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec

if TYPE_CHECKING:
    from backchannel.transport.session import Session

T = TypeVar("T")

# server-side codes that mean the server failed (the rest are the caller's mistakes), as
# in the conventions for gRPC
_SERVER_FAULTS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE"}
)


# ---------------------------------------------------------------- carrying context


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
