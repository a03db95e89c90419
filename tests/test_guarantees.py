"""Documented guarantees that had no test of their own (issue 17, point 4), each over real
gRPC on 127.0.0.1: the order of calls to one listener past the consumer's in-flight
limit, the time bound of ``stop(grace=S)``, health NOT_SERVING on stop, and the
``RuntimeError`` of a blocking call from a sync ``Client``'s own event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Any

import grpc
import pytest
from conftest import run
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import CheckedThread
from services import Echo, EchoImpl

import backchannel
from backchannel import Argument, Limits, Method

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


@backchannel.interface("test.Ordered")
class OrderedListener:
    """A listener the provider calls many times at once."""

    def changed(self, n: int) -> int: ...


@backchannel.interface("test.Pusher")
class Pusher:
    """Keeps one listener; ``push`` makes ``count`` calls to it at once."""

    def subscribe(self, listener: OrderedListener) -> None: ...
    def push(self, count: int) -> list[int]: ...


class PusherImpl:
    def __init__(self) -> None:
        self.listener: Any = None

    def subscribe(self, listener: Any) -> None:
        self.listener = listener

    async def push(self, count: int) -> list[int]:
        # on the provider's loop: the calls are sent (or queued for a slot) in this order
        return list(await asyncio.gather(*(self.listener.changed(n) for n in range(count))))


PUSHER_METHODS = [Method("subscribe", arguments=[Argument(index=0, callback=True)])]


class RecordingListener:
    def __init__(self) -> None:
        self.received: list[int] = []

    async def changed(self, n: int) -> int:
        self.received.append(n)
        await asyncio.sleep(0.005)  # held a moment: the calls behind it must queue
        return n


def test_calls_to_one_listener_past_the_consumers_in_flight_limit_keep_their_order() -> None:
    """docs/reliability.md, *Limits*: past the peer's limit new calls wait "until one
    finishes, in order", callbacks included; docs/callbacks.md: calls to one instance run
    "in the order the provider made them, even when it has many in flight"."""
    listener = RecordingListener()
    with backchannel.Server("127.0.0.1:0", callback_timeout=10) as server:
        server.export(Pusher, PusherImpl(), methods=PUSHER_METHODS)

        async def body() -> None:
            limits = Limits(max_calls_in_flight=2)  # 40 calls: 38 wait for a slot
            async with backchannel.AsyncClient(server.address, limits=limits, timeout=10) as client:
                pusher = client.reference(Pusher)
                await pusher.subscribe(listener)
                assert await pusher.push(40) == list(range(40))

        run(body())
    assert listener.received == list(range(40))


class HeldImpl(EchoImpl):
    """EchoImpl whose ``sync_wait`` holds its thread until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def sync_wait(self, seconds: float) -> str:
        self.started.set()
        self.release.wait(seconds)
        return "done"


def test_running_calls_get_at_most_the_grace_period() -> None:
    """docs/reliability.md, *Graceful shutdown*: calls already running finish "for up to
    S seconds; then the streams end" - no sooner, and no later."""
    impl = EchoImpl()
    server = backchannel.Server("127.0.0.1:0")
    server.export(Echo, impl)
    server.start()
    grace = 0.5

    async def body() -> None:
        async with backchannel.AsyncClient(server.address, timeout=30) as client:
            running = asyncio.ensure_future(client.reference(Echo).wait(10.0))
            assert await asyncio.to_thread(impl.started.wait, 5)
            began = time.monotonic()
            await asyncio.to_thread(server.stop, grace)
            took = time.monotonic() - began
            assert grace * 0.9 <= took < grace + 3.0, f"stop(grace={grace}) took {took:.2f} s"
            # the call did not finish: it was cancelled on the provider and failed here
            assert await asyncio.to_thread(impl.cancelled.wait, 5)
            with pytest.raises(backchannel.BackchannelError):
                await asyncio.wait_for(running, 5)

    try:
        run(body())
    finally:
        server.stop()


def _watch(address: str, service: str) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    return channel, stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=5)


def test_health_goes_not_serving_as_soon_as_stop_begins() -> None:
    """docs/reliability.md, *Graceful shutdown*: ``stop(grace=S)`` tells every consumer
    go-away "and the health service NOT_SERVING", while running calls still finish."""
    impl = HeldImpl()
    server = backchannel.Server("127.0.0.1:0")
    server.export(Echo, impl)
    server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    watches = [_watch(server.address, name) for name in ("", "backchannel.v1.Envelope")]
    stopping: CheckedThread | None = None
    try:
        with (
            backchannel.Client(server.address, timeout=30) as client,
            concurrent.futures.ThreadPoolExecutor(1) as caller,
        ):
            for _channel, watch in watches:
                assert next(watch).status == serving
            running = caller.submit(client.reference(Echo).sync_wait, 20.0)
            assert impl.started.wait(5)
            stopping = CheckedThread(server.stop, 10, name="stopping")
            stopping.start()
            for _channel, watch in watches:  # each watch's next answer: the change
                assert next(watch).status == not_serving
            assert not running.done()  # during the grace period, the call still running
            impl.release.set()
            assert running.result(5) == "done"
            stopping.check(10)
    finally:
        impl.release.set()
        for channel, watch in watches:
            watch.cancel()
            channel.close()
        if stopping is not None:
            stopping.join(10)
        server.stop()


@backchannel.interface("test.Asker")
class Asker:
    """The provider calls the listener it is given; ``echo`` is what the listener calls."""

    def ask(self, listener: OrderedListener) -> Any: ...
    def echo(self, n: int) -> int: ...


class AskerImpl:
    def ask(self, listener: Any) -> Any:
        return listener.changed(1)

    def echo(self, n: int) -> int:
        return n


@pytest.mark.timeout(15)  # the bug this catches deadlocks the client's loop: no answer
def test_an_async_listener_of_a_sync_client_that_calls_the_provider_gets_runtime_error() -> None:
    """docs/callbacks.md: on a sync ``Client`` an ``async def`` listener runs on the
    client's own loop and "cannot call the provider through the sync client (a blocking
    call from that loop would wait for itself, and raises a ``RuntimeError`` saying
    so)"."""
    methods = [Method("ask", arguments=[Argument(index=0, callback=True)])]
    with backchannel.Server("127.0.0.1:0", callback_timeout=10) as server:
        server.export(Asker, AskerImpl(), methods=methods)
        client = backchannel.Client(server.address, timeout=5)
        asker = client.reference(Asker)
        errors: list[BaseException] = []
        on_loop: list[bool] = []

        class AsyncListener:
            async def changed(self, n: int) -> int:
                on_loop.append(client._portal.in_loop_thread())
                try:
                    return asker.echo(n)
                except RuntimeError as exc:
                    errors.append(exc)
                    return -1

        assert asker.ask(AsyncListener()) == -1
        assert on_loop == [True]
        assert len(errors) == 1
        assert "own event loop thread" in str(errors[0])
        assert asker.echo(7) == 7  # the client goes on
        client.close()
