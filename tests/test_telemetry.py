"""OpenTelemetry: spans per call on both sides, trace context in the envelope, metrics.

Real gRPC on 127.0.0.1 with the SDK's in-memory exporters; the providers are given to
backchannel with ``telemetry.configure`` so nothing global leaks between tests.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import run
from helpers import CheckedThread, wait_until
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from services import Echo, EchoImpl, Nobody

import backchannel
from backchannel import Argument, Method, telemetry
from backchannel.v1 import envelope_pb2 as pb

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

SRC = Path(__file__).resolve().parent.parent / "src"


@backchannel.interface("com.callback.CallbackListener")
class CallbackListener:
    def changed(self, msg: str) -> None: ...


@backchannel.interface("com.callback.CallbackService")
class CallbackService:
    def addListener(self, key: str, listener: CallbackListener) -> None: ...


class CallbackServiceImpl:
    """The seed's provider: notifies a new listener at once; ``push`` notifies later."""

    def __init__(self) -> None:
        self.listeners: dict[str, Any] = {}

    def addListener(self, key: str, listener: Any) -> None:
        self.listeners[key] = listener
        listener.changed("Changed: at once")

    def push(self, key: str) -> None:
        self.listeners[key].changed("Changed: later")


class Printer(CallbackListener):
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.spans: list[trace.Span] = []

    def changed(self, msg: str) -> None:
        self.spans.append(trace.get_current_span())
        self.messages.append(msg)


CALLBACK_METHODS = [Method("addListener", arguments=[Argument(index=1, callback=True)])]


class Traces:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])

    def spans(self, count: int) -> list[ReadableSpan]:
        """The finished spans, once there are ``count`` of them (server spans end on the
        other side's loop, a moment after the caller has its result)."""
        wait_until(lambda: len(self.exporter.get_finished_spans()) >= count, 5, f"{count} spans")
        return list(self.exporter.get_finished_spans())

    def metrics(self) -> dict[str, list[Any]]:
        """Metric name -> its data points."""
        found: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)
        return found


@pytest.fixture
def traces() -> Iterator[Traces]:
    found = Traces()
    telemetry.configure(tracer_provider=found.provider, meter_provider=found.meters)
    try:
        yield found
    finally:
        telemetry.configure()
        found.meters.shutdown()


def one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    matching = [s for s in spans if s.name == name and s.kind is kind]
    assert len(matching) == 1, [(s.name, s.kind) for s in spans]
    return matching[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def test_the_seeds_callback_scenario_is_one_trace(traces: Traces) -> None:
    impl = CallbackServiceImpl()
    app = traces.provider.get_tracer("app")
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(CallbackService, impl, methods=CALLBACK_METHODS)
        port = server.port
        with backchannel.Client(server.address) as client:
            printer = Printer()
            service = client.reference(CallbackService, methods=CALLBACK_METHODS)
            with app.start_as_current_span("request") as request:
                service.addListener("foo.bar", printer)
            spans = traces.spans(5)
            assert printer.messages == ["Changed: at once"]

    add_client = one(spans, "com.callback.CallbackService/addListener", SpanKind.CLIENT)
    add_server = one(spans, "com.callback.CallbackService/addListener", SpanKind.SERVER)
    changed_client = one(spans, "com.callback.CallbackListener/changed", SpanKind.CLIENT)
    changed_server = one(spans, "com.callback.CallbackListener/changed", SpanKind.SERVER)
    # one trace: the application's span > consumer's call > provider's run > its callback
    # > the consumer running it
    assert {trace_id(s) for s in spans} == {request.get_span_context().trace_id}
    assert parent_of(add_client) == request.get_span_context().span_id
    assert parent_of(add_server) == span_id(add_client)
    assert parent_of(changed_client) == span_id(add_server)
    assert parent_of(changed_server) == span_id(changed_client)
    assert add_server.parent is not None and add_server.parent.is_remote
    # the listener's code ran inside the consumer's span of the callback
    assert printer.spans[0].get_span_context().span_id == span_id(changed_server)

    assert add_client.attributes is not None
    assert dict(add_client.attributes) == {
        "rpc.system.name": "backchannel",
        "rpc.method": "com.callback.CallbackService/addListener",
        "rpc.response.status_code": "OK",
        "server.address": "127.0.0.1",
        "server.port": port,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": port,
        "network.transport": "tcp",
    }
    assert add_server.attributes is not None
    assert add_server.attributes["server.port"] == port
    assert add_server.attributes["network.peer.address"] == "127.0.0.1"
    assert isinstance(add_server.attributes["network.peer.port"], int)
    # roles swapped: the callback's server is the consumer, the provider's peer
    assert changed_client.attributes is not None
    assert changed_client.attributes["server.port"] == add_server.attributes["network.peer.port"]
    assert changed_client.attributes["rpc.method"] == "com.callback.CallbackListener/changed"
    assert changed_client.attributes["rpc.response.status_code"] == "OK"
    assert "backchannel.callback_id" in changed_client.attributes
    assert changed_server.attributes is not None
    assert changed_server.attributes["network.peer.port"] == port
    # each side's callback span links to that side's span of the call that passed it
    assert [link.context.span_id for link in changed_client.links] == [span_id(add_server)]
    assert [link.context.span_id for link in changed_server.links] == [span_id(add_client)]
    for span in spans:
        assert span.status.status_code is not StatusCode.ERROR


def test_a_later_callback_links_to_the_call_that_passed_its_listener(traces: Traces) -> None:
    impl = CallbackServiceImpl()
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(CallbackService, impl, methods=CALLBACK_METHODS)
        with backchannel.Client(server.address) as client:
            printer = Printer()
            client.reference(CallbackService, methods=CALLBACK_METHODS).addListener("k", printer)
            traces.spans(4)
            traces.exporter.clear()
            pusher = CheckedThread(impl.push, "k")  # no span around it
            pusher.start()
            pusher.check(5)
            spans = traces.spans(2)
    changed_client = one(spans, "com.callback.CallbackListener/changed", SpanKind.CLIENT)
    changed_server = one(spans, "com.callback.CallbackListener/changed", SpanKind.SERVER)
    assert changed_client.parent is None  # a trace of its own...
    assert parent_of(changed_server) == span_id(changed_client)
    (link,) = changed_client.links  # ...linked to the provider's addListener span
    assert link.context.trace_id != trace_id(changed_client)


def test_a_failed_call_has_an_error_status(traces: Traces, echo_impl: EchoImpl) -> None:
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Echo, echo_impl)
        with backchannel.Client(server.address) as client:
            echo = client.reference(Echo)
            with pytest.raises(ValueError, match="bad input"):
                echo.fail("ValueError", "bad input")
            spans = traces.spans(2)
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        span = one(spans, "test.Echo/fail", kind)
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["error.type"] == "ValueError"
        assert span.attributes["rpc.response.status_code"] == "UNKNOWN"
        assert [event.name for event in span.events] == ["exception"]


def test_the_caller_s_mistake_is_an_error_for_the_client_only(traces: Traces) -> None:
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Echo, EchoImpl())
        with backchannel.Client(server.address) as client:
            with pytest.raises(backchannel.ServiceNotFound):
                client.reference(Nobody).ping()
            spans = traces.spans(2)
    client_span = one(spans, "test.Nobody/ping", SpanKind.CLIENT)
    server_span = one(spans, "test.Nobody/ping", SpanKind.SERVER)
    assert client_span.status.status_code is StatusCode.ERROR
    assert server_span.status.status_code is StatusCode.UNSET  # as for gRPC's NOT_FOUND
    for span in (client_span, server_span):
        assert span.attributes is not None
        assert span.attributes["error.type"] == "backchannel.ServiceNotFound"
        assert span.attributes["rpc.response.status_code"] == "NOT_FOUND"


@backchannel.interface("test.Counter")
class Counter:
    def count(self, listener: CallbackListener, depth: int) -> int: ...
    def bump(self, depth: int) -> int: ...


def test_a_reentrant_chain_on_asyncio_is_one_trace(traces: Traces) -> None:
    """consumer count() > provider > listener changed() > consumer bump() > provider."""

    class CounterImpl:
        async def count(self, listener: Any, depth: int) -> int:
            await listener.changed(f"depth {depth}")
            return depth

        async def bump(self, depth: int) -> int:
            return depth + 1

    methods = [Method("count", arguments=[Argument(index=0, callback=True)])]

    async def body() -> list[ReadableSpan]:
        async with backchannel.AsyncServer("127.0.0.1:0") as server:
            server.export(Counter, CounterImpl(), methods=methods)
            async with backchannel.AsyncClient(server.address) as client:
                counter = client.reference(Counter, methods=methods)
                bumped: list[int] = []

                class Reentrant(CallbackListener):
                    async def changed(self, msg: str) -> None:  # type: ignore[override]
                        bumped.append(await counter.bump(1))

                assert await counter.count(Reentrant(), 3) == 3
                assert bumped == [2]
                await asyncio.to_thread(traces.spans, 6)
        return list(traces.exporter.get_finished_spans())

    spans = run(body())
    assert len({trace_id(s) for s in spans}) == 1
    bump_client = one(spans, "test.Counter/bump", SpanKind.CLIENT)
    changed_server = one(spans, "com.callback.CallbackListener/changed", SpanKind.SERVER)
    bump_server = one(spans, "test.Counter/bump", SpanKind.SERVER)
    assert parent_of(bump_client) == span_id(changed_server)
    assert parent_of(bump_server) == span_id(bump_client)


def test_notify_hooks_run_inside_the_call_s_span(traces: Traces, echo_impl: EchoImpl) -> None:
    seen: dict[str, int] = {}

    def hook(kind: str) -> Any:
        def record(*args: Any) -> None:
            seen[kind] = trace.get_current_span().get_span_context().span_id

        return record

    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Echo, echo_impl)
        with backchannel.Client(server.address) as client:
            methods = [
                Method("echo", oninvoke=hook("oninvoke"), onreturn=hook("onreturn")),
                Method("greet", async_=True, onreturn=hook("onreturn async")),
            ]
            echo = client.reference(Echo, methods=methods)
            assert echo.echo(1) == 1
            assert echo.greet("you").result(5) == "Hello, you!"  # type: ignore[attr-defined]
            spans = traces.spans(4)
    echo_span = one(spans, "test.Echo/echo", SpanKind.CLIENT)
    greet_span = one(spans, "test.Echo/greet", SpanKind.CLIENT)
    assert seen == {
        "oninvoke": span_id(echo_span),
        "onreturn": span_id(echo_span),
        "onreturn async": span_id(greet_span),
    }
    assert echo_span.attributes is not None
    assert echo_span.attributes["rpc.response.status_code"] == "OK"
    server_span = one(spans, "test.Echo/echo", SpanKind.SERVER)
    assert parent_of(server_span) == span_id(echo_span)


def test_a_trace_context_set_by_hand_is_joined(traces: Traces) -> None:
    """What a grpcurl user does: Invoke with trace_context holding a traceparent."""
    trace_hex, parent_hex = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Echo, EchoImpl())
        with grpc.insecure_channel(server.address) as channel:
            invoke = channel.unary_unary(
                "/backchannel.v1.Envelope/Invoke",
                request_serializer=pb.Call.SerializeToString,
                response_deserializer=pb.Result.FromString,
            )
            call = pb.Call(service="test.Echo", method="add", json_args="[2, 3]")
            call.trace_context["traceparent"] = f"00-{trace_hex}-{parent_hex}-01"
            result = invoke(call, timeout=5)
        assert result.json == "5"
        (span,) = traces.spans(1)
    assert span.kind is SpanKind.SERVER and span.name == "test.Echo/add"
    assert trace_id(span) == int(trace_hex, 16)
    assert parent_of(span) == int(parent_hex, 16)
    assert span.attributes is not None and span.attributes["rpc.system.name"] == "backchannel"


def test_metrics_durations_and_gauges(traces: Traces) -> None:
    impl = CallbackServiceImpl()
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(CallbackService, impl, methods=CALLBACK_METHODS)
        with backchannel.Client(server.address) as client:
            client.reference(CallbackService, methods=CALLBACK_METHODS).addListener("k", Printer())
            traces.spans(4)
            found = traces.metrics()
    durations = {
        (p.attributes["rpc.method"], name): p
        for name in ("rpc.client.call.duration", "rpc.server.call.duration")
        for p in found[name]
    }
    for method in (
        "com.callback.CallbackService/addListener",
        "com.callback.CallbackListener/changed",
    ):
        for name in ("rpc.client.call.duration", "rpc.server.call.duration"):
            point = durations[(method, name)]
            assert point.count == 1
            assert 0 < point.sum < 5  # seconds
            assert point.attributes["rpc.response.status_code"] == "OK"
    streams = {p.attributes["backchannel.role"]: p.value for p in found["backchannel.streams.open"]}
    assert streams == {"consumer": 1, "provider": 1}
    live = {
        (p.attributes["backchannel.role"], p.attributes["rpc.service"]): p.value
        for p in found["backchannel.callbacks.live"]
    }
    assert live == {
        ("consumer", "com.callback.CallbackService"): 1,
        ("provider", "com.callback.CallbackService"): 1,
    }
    assert {p.value for p in found["backchannel.calls.in_flight"]} == {0}
    assert {p.value for p in found["backchannel.calls.waiting"]} == {0}


def test_calls_waiting_for_a_slot_are_counted(traces: Traces, echo_impl: EchoImpl) -> None:
    limits = backchannel.Limits(max_calls_in_flight=1)
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Echo, echo_impl)
        with backchannel.Client(server.address, limits=limits, timeout=10) as client:
            echo = client.reference(Echo, methods=[Method("tracked", async_=True)])
            first = echo.tracked(0.5)  # type: ignore[func-returns-value]
            assert echo_impl.wait_running(1)
            second = echo.tracked(0.0)  # type: ignore[func-returns-value]

            def gauges() -> dict[tuple[str, str], int]:
                points = traces.metrics()
                found = {
                    ("waiting", p.attributes["backchannel.role"]): p.value
                    for p in points["backchannel.calls.waiting"]
                }
                for p in points["backchannel.calls.in_flight"]:
                    found[
                        (p.attributes["backchannel.direction"], p.attributes["backchannel.role"])
                    ] = p.value
                return found

            wait_until(lambda: gauges()[("waiting", "consumer")] == 1, 5, "one call waiting")
            now = gauges()
            assert now[("outgoing", "consumer")] == 1
            assert now[("incoming", "provider")] == 1
            first.result(5)  # type: ignore[attr-defined]
            second.result(5)  # type: ignore[attr-defined]


BLOCKER = textwrap.dedent(
    """
    import sys

    class NoOpenTelemetry:
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"{name} is blocked: OpenTelemetry is not installed here")
            return None

    sys.meta_path.insert(0, NoOpenTelemetry())
    """
)

WITHOUT_OTEL = BLOCKER + textwrap.dedent(
    """
    import backchannel
    from backchannel import Argument, Method, telemetry

    @backchannel.interface("com.callback.CallbackListener")
    class CallbackListener:
        def changed(self, msg): ...

    @backchannel.interface("com.callback.CallbackService")
    class CallbackService:
        def addListener(self, key, listener): ...

    class Impl:
        def addListener(self, key, listener):
            listener.changed("Changed: " + key)

    class Printer(CallbackListener):
        def __init__(self):
            self.messages = []

        def changed(self, msg):
            self.messages.append(msg)

    methods = [Method("addListener", arguments=[Argument(index=1, callback=True)])]
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(CallbackService, Impl(), methods=methods)
        with backchannel.Client(server.address) as client:
            printer = Printer()
            client.reference(CallbackService, methods=methods).addListener("k", printer)
            assert printer.messages == ["Changed: k"], printer.messages
    assert not telemetry.AVAILABLE
    loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
    assert not loaded, loaded
    print("ok without opentelemetry")
    """
)


def test_nothing_breaks_without_opentelemetry() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_OTEL],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok without opentelemetry"


def test_no_provider_configured_means_no_work() -> None:
    """Installed, but no SDK provider set: the hooks return before doing anything."""
    assert telemetry.AVAILABLE
    assert telemetry._tracer() is None and telemetry._instruments() is None
    call = pb.Call(service="test.Echo", method="echo")

    def untouched() -> None:
        raise AssertionError("no span may be started")

    assert telemetry.carry(untouched) is untouched
    assert not call.trace_context
