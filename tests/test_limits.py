"""Back-pressure and message size limits: safe defaults, clear errors, nothing lost."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from typing import Any

import grpc
import pytest
from conftest import RawStream, run
from helpers import wait_until
from notifier import Listener
from services import Echo, EchoImpl

import backchannel
from backchannel import Argument, Keepalive, Limits, Method
from backchannel.settings import (
    MAX_GRPC_SECONDS,
    MAX_MESSAGE_SIZE_LIMIT,
    MIN_KEEPALIVE_TIME,
)
from backchannel.transport.grpcio.options import channel_options, server_options
from backchannel.v1 import envelope_pb2 as pb

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


def test_defaults_are_safe() -> None:
    limits = Limits()
    assert limits.max_calls_in_flight == 1000
    assert limits.max_message_size == 4 * 1024 * 1024
    with pytest.raises(ValueError, match="max_calls_in_flight"):
        Limits(max_calls_in_flight=0)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("handshake_timeout", math.inf, "finite"),
        ("handshake_timeout", math.nan, "finite"),
        ("handshake_timeout", 1e7, "<= 2.14748e+06"),  # gRPC's C int of milliseconds
        ("handshake_timeout", -1.0, "> 0"),
        ("handshake_timeout", "10", "number of seconds"),
        ("max_write_stall", math.inf, "finite"),
        ("max_write_stall", 0, "> 0"),
        ("max_streams", 2.5, "must be an int"),
        ("max_streams", True, "must be an int"),
        ("max_streams", 0, ">= 1"),
        ("max_faults", 100.0, "must be an int"),
        ("max_faults", 0, ">= 1"),
        ("max_calls_in_flight", 1.5, "must be an int"),
        ("max_message_size", 4e6, "must be an int"),
        ("max_message_size", 2**31, "between 1024 and"),
        ("max_queued_bytes", 3.3e7, "must be an int"),
    ],
)
def test_each_bad_limit_is_refused_by_its_own_name_and_value(
    field: str, value: object, words: str
) -> None:
    """One message per field, naming it and the value given, at construction (not an
    OverflowError from gRPC when the server starts)."""
    with pytest.raises(ValueError) as caught:
        Limits(**{field: value})  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"Limits.{field} must" in message, message
    assert repr(value) in message, message
    assert words in message, message
    other = "max_write_stall" if field == "handshake_timeout" else "handshake_timeout"
    assert other not in message, message  # that one field, not a combined message


def test_the_longest_handshake_timeout_grpc_takes_starts_a_server() -> None:
    """The bound is gRPC's: a handshake timeout at it starts a server and serves."""
    limits = Limits(handshake_timeout=(2**31 - 1) / 1000)
    with backchannel.Server(limits=limits) as server:
        server.export(Echo, EchoImpl())
        with backchannel.Client(server.address) as client:
            assert client.reference(Echo).echo(5) == 5


@pytest.mark.parametrize(("field", "value"), [("time", math.inf), ("timeout", 1e7)])
def test_a_keepalive_grpc_cannot_take_is_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"keepalive {field} must be finite"):
        backchannel.Keepalive(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "values", "message"),
    [
        (
            Limits,
            {"max_write_stall": math.inf},
            "Limits.max_write_stall must be finite, > 0 seconds, got inf",
        ),
        (
            Limits,
            {"handshake_timeout": 0},
            "Limits.handshake_timeout must be finite, > 0 seconds and <= 2.14748e+06, got 0",
        ),
        (
            Limits,
            {"handshake_timeout": "10"},
            "Limits.handshake_timeout must be a number of seconds, got '10'",
        ),
        (Limits, {"max_queued_bytes": 0}, "Limits.max_queued_bytes must be >= 1, got 0"),
        (Limits, {"max_streams": True}, "Limits.max_streams must be an int, got True"),
        (
            Limits,
            {"max_message_size": 1023},
            "Limits.max_message_size must be between 1024 and 2147418111, got 1023",
        ),
        (
            Limits,
            {"max_message_size": 8192, "max_queued_bytes": 8191},
            "max_queued_bytes must be >= max_message_size (a stream must be able to queue one "
            "message of the largest size), got Limits(max_calls_in_flight=1000, "
            "max_message_size=8192, max_queued_bytes=8191, max_write_stall=30.0, "
            "handshake_timeout=10.0, max_streams=4096, max_faults=100, "
            "max_attachment_bytes=8192, max_waiting_one_way=10000)",
        ),
        (
            Keepalive,
            {"time": 0.05},
            "keepalive time must be >= 0.1 s (MIN_KEEPALIVE_TIME), "
            "got Keepalive(time=0.05, timeout=5.0)",
        ),
        (
            Keepalive,
            {"time": 1e7},
            "keepalive time must be finite, > 0 seconds and <= 2.14748e+06, got 10000000.0",
        ),
        (
            Keepalive,
            {"timeout": -1},
            "keepalive timeout must be finite, > 0 seconds and <= 2.14748e+06, got -1",
        ),
    ],
)
def test_a_bad_setting_is_refused_with_this_exact_message(
    kind: type, values: dict[str, object], message: str
) -> None:
    """The whole text a user reads: the field, what it must be, the bound (none for a
    time with no upper bound) and the value given."""
    with pytest.raises(ValueError) as caught:
        kind(**values)
    assert str(caught.value) == message


def test_values_at_each_bound_are_accepted() -> None:
    """Every bound is inclusive: a setting exactly at it is taken as given."""
    largest = Limits(max_message_size=MAX_MESSAGE_SIZE_LIMIT, max_queued_bytes=2**31 - 1)
    assert largest.max_message_size == MAX_MESSAGE_SIZE_LIMIT
    # a queue that holds exactly one message of the largest size
    assert Limits(max_message_size=8192, max_queued_bytes=8192).max_queued_bytes == 8192
    smallest = Limits(
        max_calls_in_flight=1,
        max_message_size=1024,
        max_queued_bytes=1024,
        max_write_stall=0.5,
        handshake_timeout=0.5,
        max_streams=1,
        max_faults=1,
    )
    assert (smallest.max_write_stall, smallest.handshake_timeout) == (0.5, 0.5)
    assert Limits(handshake_timeout=MAX_GRPC_SECONDS).handshake_timeout == MAX_GRPC_SECONDS
    assert Keepalive(time=MIN_KEEPALIVE_TIME, timeout=0.5) == Keepalive(0.1, 0.5)
    assert Keepalive(time=MAX_GRPC_SECONDS, timeout=MAX_GRPC_SECONDS).time == MAX_GRPC_SECONDS


def test_settings_become_exactly_these_grpc_options() -> None:
    """gRPC's frame limit sits 64 KiB above max_message_size (so an oversized frame is
    refused by us with a clear error, not by gRPC tearing down the stream); every side
    permits client pings every 50 ms (half MIN_KEEPALIVE_TIME), keepalive or not; a
    Keepalive becomes milliseconds, its timeout bounding every ping, pings allowed with no
    call and no data; a provider also closes a connection still in its handshake after
    handshake_timeout (docs/configuration.md, docs/reliability.md)."""
    limits = Limits(max_message_size=1024 * 1024, handshake_timeout=2.5)
    base = [
        ("grpc.max_send_message_length", 1024 * 1024 + 65536),
        ("grpc.max_receive_message_length", 1024 * 1024 + 65536),
        ("grpc.http2.min_ping_interval_without_data_ms", 50),
        ("grpc.http2.min_time_between_pings_ms", 50),
    ]
    pings = [
        ("grpc.keepalive_time_ms", 3000),
        ("grpc.keepalive_timeout_ms", 2000),
        ("grpc.http2.ping_timeout_ms", 2000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    handshake = [("grpc.server_handshake_timeout_ms", 2500)]
    keepalive = Keepalive(time=3.0, timeout=2.0)
    assert channel_options(limits, None) == base
    assert channel_options(limits, keepalive) == base + pings
    assert server_options(limits, None) == base + handshake
    assert server_options(limits, keepalive) == base + pings + handshake
    # the largest max_message_size is exactly what gRPC takes in its C int
    wire = dict(
        channel_options(
            Limits(max_message_size=MAX_MESSAGE_SIZE_LIMIT, max_queued_bytes=2**31 - 1), None
        )
    )
    assert wire["grpc.max_send_message_length"] == 2**31 - 1


def test_a_sub_millisecond_handshake_timeout_is_one_millisecond_not_zero() -> None:
    """gRPC takes whole milliseconds: 0.4 ms rounds up to 1 ms, never to 0."""
    options = dict(server_options(Limits(handshake_timeout=0.0004), None))
    assert options["grpc.server_handshake_timeout_ms"] == 1


def test_calls_past_the_clients_limit_wait_their_turn() -> None:
    impl = EchoImpl()
    with backchannel.Server() as server:
        server.export(Echo, impl)

        async def body() -> None:
            limits = Limits(max_calls_in_flight=4)
            async with backchannel.AsyncClient(server.address, limits=limits, timeout=10) as client:
                echo = client.reference(Echo)
                results = await asyncio.gather(*(echo.tracked(0.05) for _ in range(20)))
                assert max(results) <= 4

        run(body())
    assert impl.most_running == 4


@backchannel.interface("test.Ordered")
class Ordered:
    def take(self, n: int) -> int: ...


class OrderedImpl:
    """Records the order calls start in; call 0 holds its slot until the gate opens."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.gate = threading.Event()

    def take(self, n: int) -> int:
        self.order.append(n)
        if n == 0:
            self.gate.wait(10)
        return n


def test_calls_past_the_clients_limit_are_sent_in_the_order_they_were_made() -> None:
    # one slot: call 0 holds it while 1..9 queue, each queued before the next is made;
    # then they must reach the provider first-in first-out
    impl = OrderedImpl()
    with backchannel.Server() as server:
        server.export(Ordered, impl)
        limits = Limits(max_calls_in_flight=1)
        with backchannel.Client(server.address, limits=limits, timeout=10) as client:
            ordered = client.reference(Ordered, methods=[Method("take", async_=True)])
            futures = [ordered.take(0)]
            wait_until(lambda: impl.order == [0], 5, "call 0 running")
            session = client._core._session
            assert session is not None
            for n in range(1, 10):
                futures.append(ordered.take(n))
                wait_until(lambda n=n: len(session._waiting) == n, 5, f"call {n} queued")
            impl.gate.set()
            assert [future.result(10) for future in futures] == list(range(10))
    assert impl.order == list(range(10))


def test_the_providers_limit_lowers_the_clients_in_the_handshake() -> None:
    impl = EchoImpl()
    with backchannel.Server(limits=Limits(max_calls_in_flight=2)) as server:
        server.export(Echo, impl)
        with backchannel.Client(server.address, timeout=10) as client:
            echo = client.reference(Echo)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda _: echo.tracked(0.05), range(16)))
    assert impl.most_running == 2 and max(results) == 2


def test_a_peer_that_ignores_the_limit_gets_a_clear_error() -> None:
    with backchannel.Server(limits=Limits(max_calls_in_flight=2)) as server:
        server.export(Echo, EchoImpl())

        async def body() -> None:
            stream = RawStream(server.address)
            welcome = await stream.hello()
            assert welcome.max_calls_in_flight == 2
            for call_id in (1, 2, 3):
                call = pb.Call(
                    id=call_id,
                    service="test.Echo",
                    method="wait",
                    args=[pb.Value(double_value=0.5)],
                )
                await stream.send(pb.Frame(call=call))
            refused = (await stream.recv()).result
            assert refused.id == 3 and refused.error.code == pb.RESOURCE_EXHAUSTED
            assert "runs at most 2 at once" in refused.error.message
            answered = {(await stream.recv()).result.id for _ in range(2)}
            assert answered == {1, 2}
            await stream.close()

        run(body())


def test_one_way_calls_past_the_limit_wait_for_a_slot_and_all_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    impl = CountingEcho()
    with backchannel.Server(limits=Limits(max_calls_in_flight=2)) as server:
        server.export(Echo, impl)

        async def body() -> None:
            stream = RawStream(server.address)
            await stream.hello()
            for call_id in range(1, 6):  # more one-way calls than the limit: they wait
                call = pb.Call(
                    id=call_id,
                    service="test.Echo",
                    method="tracked",
                    args=[pb.Value(double_value=0.1)],
                    one_way=True,
                )
                await stream.send(pb.Frame(call=call))
            assert await asyncio.to_thread(impl.wait_running, 2)
            # a call that wants a result is not refused for them: counted apart
            result = await stream.call_echo(6, 42)
            assert result.value.int_value == 42
            # all five end, never more than two at once, none refused
            assert await asyncio.to_thread(impl.wait_done, 5), f"{impl.done} of 5 ran"
            await stream.close()

        run(body())
    assert impl.most_running == 2
    said = [r.getMessage() for r in caplog.records]
    assert not [line for line in said if "one-way call" in line or "fault" in line], said


class CountingEcho(EchoImpl):
    """Counts the tracked calls that ended."""

    done = 0

    async def tracked(self, seconds: float) -> int:
        try:
            return await super().tracked(seconds)
        finally:
            with self.running_changed:
                self.done += 1
                self.running_changed.notify_all()

    def wait_done(self, count: int, timeout: float = 5) -> bool:
        with self.running_changed:
            return self.running_changed.wait_for(lambda: self.done >= count, timeout)


def test_a_call_over_the_size_limit_fails_before_it_is_sent() -> None:
    impl = EchoImpl()
    with backchannel.Server() as server:
        server.export(Echo, impl)
        limits = Limits(max_message_size=64 * 1024)
        with backchannel.Client(server.address, limits=limits) as client:
            echo = client.reference(Echo)
            with pytest.raises(backchannel.MessageTooLarge, match="limit of 65536 bytes"):
                echo.echo(b"x" * 100_000)
            assert impl.calls == 0
            with pytest.raises(backchannel.MessageTooLarge, match=r"result of test\.Echo\.big"):
                echo.big(100_000)  # the provider learned our limit in the handshake
            assert len(echo.big(1000)) == 1000  # the stream goes on


def test_graceful_stop_finishes_every_call_in_flight() -> None:
    impl = EchoImpl()
    server = backchannel.Server()
    server.export(Echo, impl)
    server.start()

    async def body() -> None:
        async with backchannel.AsyncClient(server.address, timeout=10) as client:
            echo = client.reference(Echo)
            in_flight = [asyncio.ensure_future(echo.tracked(0.3)) for _ in range(50)]
            assert await asyncio.to_thread(impl.wait_running, 50)
            stopping = asyncio.ensure_future(asyncio.to_thread(server.stop, 5))
            assert await asyncio.gather(*in_flight) == [50] * 50  # every one finished
            await stopping
            with pytest.raises((backchannel.ShuttingDown, backchannel.TransportError)):
                await echo.add(1, 2)

    run(body())


def test_new_calls_during_the_grace_period_get_a_clear_error() -> None:
    impl = EchoImpl()
    server = backchannel.Server()
    server.export(Echo, impl)
    server.start()

    async def body() -> None:
        async with backchannel.AsyncClient(server.address, timeout=10) as client:
            echo = client.reference(Echo)
            running = asyncio.ensure_future(echo.wait(0.5))  # outlasts the go-away (ms)
            assert await asyncio.to_thread(impl.started.wait, 5)
            stopping = asyncio.ensure_future(asyncio.to_thread(server.stop, 5))
            # the go-away frame and the refusal of a new stream race with this call: either
            # way the caller hears that the provider is going away
            with pytest.raises(backchannel.BackchannelError, match="shutting down"):
                for _ in range(10_000):  # bounded: the go-away comes within milliseconds
                    await echo.add(1, 2)
            assert await running == "done"
            await stopping

    run(body())


def test_a_stream_authenticated_while_stop_begins_is_told_go_away_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    impl = EchoImpl()
    entered, release = threading.Event(), threading.Event()

    async def authenticate(metadata: Any) -> str:
        if metadata.get("x-late") == "yes":  # held here while stop() tells go-away
            entered.set()
            await asyncio.to_thread(release.wait, 5)
        return "someone"

    server = backchannel.Server(authenticator=authenticate)
    server.export(Echo, impl)
    server.start()

    async def body() -> None:
        early = backchannel.AsyncClient(server.address, timeout=10)
        late = backchannel.AsyncClient(server.address, timeout=10, metadata=[("x-late", "yes")])
        async with early, late:
            running = asyncio.ensure_future(early.reference(Echo).wait(0.5))  # outlasts the rest
            assert await asyncio.to_thread(impl.started.wait, 5)
            late_call = asyncio.ensure_future(late.reference(Echo).add(1, 2))
            assert await asyncio.to_thread(entered.wait, 5)
            stopping = asyncio.ensure_future(asyncio.to_thread(server.stop, 5))
            session = early._session
            assert session is not None
            # stop() told every session (a protocol flag, with no event to wait on)
            await asyncio.to_thread(
                wait_until, lambda: session.connection.peer_going_away, 5, "go-away arrived"
            )
            release.set()  # the late stream joins the sessions now
            with pytest.raises(backchannel.ShuttingDown, match="shutting down"):
                await late_call
            # its go-away came before the Welcome: taken as a go-away, not a mistake
            assert late._session is not None and late._session.connection.peer_going_away
            assert await running == "done"
            await stopping

    run(body())
    assert "protocol mistake" not in caplog.text
    assert "protocol fault" not in caplog.text


@backchannel.interface("test.Fanout")
class Fanout:
    """Listeners by key, and a push to all of them at once."""

    def subscribe(self, key: str, listener: Listener) -> None: ...
    def fanout(self, msg: str) -> int: ...


class FanoutImpl:
    def __init__(self) -> None:
        self.listeners: dict[str, Any] = {}

    def subscribe(self, key: str, listener: Any) -> None:
        self.listeners[key] = listener

    async def fanout(self, msg: str) -> int:
        replies = await asyncio.gather(*(lsnr.changed(msg) for lsnr in self.listeners.values()))
        return len(replies)


class CountingListener:
    """An async listener that counts how many listener calls run at once."""

    running = 0
    most_running = 0
    received: list[str] = []

    def __init__(self, key: str) -> None:
        self.key = key

    async def changed(self, msg: str) -> str:
        cls = CountingListener
        cls.running += 1
        cls.most_running = max(cls.most_running, cls.running)
        try:
            await asyncio.sleep(0.02)
        finally:
            cls.running -= 1
        cls.received.append(self.key)
        return msg


def test_the_consumers_limit_holds_back_the_providers_callbacks() -> None:
    # fresh counts: `make mutate` runs the tests more than once in one process
    CountingListener.running = CountingListener.most_running = 0
    CountingListener.received = []
    methods = [Method("subscribe", arguments=[Argument(index=1, callback=True)])]
    with backchannel.Server(callback_timeout=10) as server:
        server.export(Fanout, FanoutImpl(), methods=methods)

        async def body() -> None:
            limits = Limits(max_calls_in_flight=2)
            async with backchannel.AsyncClient(server.address, limits=limits, timeout=10) as client:
                fanout = client.reference(Fanout)
                for i in range(20):
                    await fanout.subscribe(f"k{i}", CountingListener(f"k{i}"))
                assert await fanout.fanout("hello") == 20  # 20 callbacks pushed at once

        run(body())
    assert CountingListener.most_running == 2  # never more than the consumer's limit
    assert sorted(CountingListener.received) == sorted(f"k{i}" for i in range(20))


def test_a_frame_over_the_size_limit_ends_only_its_own_stream_with_a_clear_error() -> None:
    limits = Limits(max_message_size=64 * 1024)  # gRPC refuses messages over 128 KiB
    with backchannel.Server(limits=limits) as server:
        server.export(Echo, EchoImpl())

        async def body() -> None:
            stream = RawStream(server.address)
            async with backchannel.AsyncClient(server.address, limits=limits) as good:
                echo = good.reference(Echo)
                assert await echo.add(1, 1) == 2
                await stream.hello()
                huge = pb.Value(bytes_value=b"x" * 200_000)  # what no backchannel client sends
                call = pb.Call(id=1, service="test.Echo", method="echo", args=[huge])
                await stream.send(pb.Frame(call=call))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stream.recv()
                assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                details = refused.value.details() or ""
                assert "larger than max" in details and str(64 * 1024 + 64 * 1024) in details
                assert await asyncio.gather(*(echo.add(i, 1) for i in range(50))) == [
                    i + 1 for i in range(50)
                ]  # the other consumer goes on
                await stream.close()

        run(body())


@backchannel.interface("test.Loader")
class Loader:
    def load(self) -> str: ...


class LoaderImpl:
    """Every call awaits one shared future: a resource loaded once, by whoever asks first."""

    def __init__(self) -> None:
        self.loaded: asyncio.Future[str] | None = None
        self.asked = 0

    async def load(self) -> str:
        if self.loaded is None:
            self.loaded = asyncio.get_running_loop().create_future()
        self.asked += 1
        if self.asked == 3:  # loaded once all three wait on it
            asyncio.get_running_loop().call_soon(self.loaded.set_result, "loaded")
        return await self.loaded


def test_concurrent_calls_awaiting_one_shared_future_all_get_its_result() -> None:
    """Three calls at once arrive together; each (run eagerly, then handed to a task of
    its own) awaits the same pending future, and each gets its result (not a
    RuntimeError for a future awaited twice)."""
    with backchannel.Server() as server:
        server.export(Loader, LoaderImpl())

        async def body() -> None:
            async with backchannel.AsyncClient(server.address, timeout=10) as client:
                loader = client.reference(Loader)
                results = await asyncio.gather(*(loader.load() for _ in range(3)))
                assert results == ["loaded", "loaded", "loaded"]

        run(body())
