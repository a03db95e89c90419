"""The answers docs/protocol.md gives to the questions a Node.js implementer had to guess
(its section 20) hold on the wire: raw frames over a real stream to a provider exporting
the seed's CallbackService (examples/callback/callback_service.py), on both transports.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import RawStream, run

import backchannel
from backchannel import Argument, Method
from backchannel.v1 import envelope_pb2 as pb

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

SERVICE = "com.callback.CallbackService"
LISTENER = "com.callback.CallbackListener"


def _seed() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "examples" / "callback" / "callback_service.py"
    spec = importlib.util.spec_from_file_location("callback_service", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed = _seed()


@backchannel.interface("spec.Burst")
class Burst:
    """Calls one listener several times at once, without waiting in between."""

    async def burst(self, listener: Any, times: int) -> None: ...


class BurstImpl:
    async def burst(self, listener: Any, times: int) -> None:
        await asyncio.gather(*(listener.changed(str(n)) for n in range(times)))


class SeedImpl(seed.CallbackServiceImpl):  # type: ignore[misc,name-defined]
    """The seed's implementation, telling when an addListener has returned."""

    def __init__(self) -> None:
        super().__init__(interval=3600)  # no timed pushes during a test
        self.returned = threading.Event()

    def addListener(self, key: str, listener: Any) -> None:
        try:
            super().addListener(key, listener)
        finally:
            self.returned.set()


@pytest.fixture(scope="module")
def impl() -> SeedImpl:
    return SeedImpl()


@pytest.fixture(scope="module")
def address(transport: str, impl: SeedImpl) -> Iterator[str]:
    with backchannel.Server("127.0.0.1:0", callback_timeout=10) as server:
        server.export(
            seed.CallbackService,
            impl,
            callbacks=1000,
            methods=[
                Method("addListener", arguments=[Argument(index=1, callback=True)]),
                Method("removeListener", arguments=[Argument(index=1, callback=False)]),
            ],
        )
        server.export(Burst, BurstImpl(), methods=[Method("burst", arguments=[Argument(0)])])
        yield server.address


def listener(callback_id: int, interface: str = LISTENER) -> pb.Value:
    return pb.Value(callback_value=pb.CallbackRef(id=callback_id, interface=interface))


def text(value: str) -> pb.Value:
    return pb.Value(string_value=value)


def call(call_id: int, method: str, *args: pb.Value, service: str = SERVICE) -> pb.Frame:
    return pb.Frame(call=pb.Call(id=call_id, service=service, method=method, args=args))


def answer(call_id: int) -> pb.Frame:
    return pb.Frame(result=pb.Result(id=call_id, value=pb.Value(null_value=0)))


async def kind(stream: RawStream) -> tuple[str, Any]:
    frame = await stream.recv()
    which = frame.WhichOneof("kind")
    assert which is not None
    return which, getattr(frame, which)


async def add(stream: RawStream, call_id: int, ref: pb.Value) -> pb.Call:
    """addListener("foo.bar", ref), answering the callback it makes; the callback."""
    await stream.send(call(call_id, "addListener", text("foo.bar"), ref))
    which, callback = await kind(stream)
    assert which == "call", callback
    await stream.send(answer(callback.id))
    which, result = await kind(stream)
    assert (which, result.id, result.WhichOneof("outcome")) == ("result", call_id, "value")
    return callback  # type: ignore[no-any-return]


def scenario(address: str, body: Any) -> None:
    async def main() -> None:
        stream = RawStream(address)
        try:
            await body(stream)
        finally:
            await stream.close()

    run(main())


def test_8_a_call_before_hello_gets_failed_precondition_and_a_cancel_of_an_unknown_id_nothing(
    address: str,
) -> None:
    async def body(stream: RawStream) -> None:
        await stream.send(call(5, "addListener", text("foo.bar"), listener(7)))
        which, result = await kind(stream)
        assert (which, result.id) == ("result", 5)
        assert (result.error.code, result.error.type) == (
            pb.FAILED_PRECONDITION,
            "backchannel.RemoteProtocolError",
        )
        await stream.hello()
        await stream.send(pb.Frame(cancel=pb.Cancel(id=99, reason="never sent")))
        await stream.send(call(1, "noSuchMethod"))
        which, result = await kind(stream)  # no Fault came before it
        assert (which, result.id) == ("result", 1)

    scenario(address, body)


def test_6_an_unknown_method_is_unimplemented_and_an_unknown_service_not_found(
    address: str,
) -> None:
    async def body(stream: RawStream) -> None:
        await stream.hello()
        await stream.send(call(1, "noSuchMethod"))
        error = (await stream.recv()).result.error
        assert (error.code, error.type) == (pb.UNIMPLEMENTED, "backchannel.MethodNotFound")
        await stream.send(call(2, "addListener", service="com.callback.Nobody"))
        error = (await stream.recv()).result.error
        assert (error.code, error.type) == (pb.NOT_FOUND, "backchannel.ServiceNotFound")

    scenario(address, body)


def test_7_the_callback_interface_name_is_informational(address: str) -> None:
    async def body(stream: RawStream) -> None:
        await stream.hello()
        for call_id, name in enumerate(["", "wrong.Name", LISTENER], start=1):
            callback = await add(stream, call_id, listener(10 + call_id, name))
            assert (callback.callback_id, callback.method) == (10 + call_id, "changed")

    scenario(address, body)


def test_4_a_remover_carries_the_existing_id_and_its_release_comes_before_the_result(
    address: str,
) -> None:
    async def body(stream: RawStream) -> None:
        await stream.hello()
        await add(stream, 1, listener(7))
        await stream.send(call(2, "removeListener", text("foo.bar"), listener(7, "")))
        assert await kind(stream) == ("release", pb.Release(callback_id=7))
        which, result = await kind(stream)
        assert (which, result.id, result.WhichOneof("outcome")) == ("result", 2, "value")
        # an id that is not live (a new one, or the one just removed): UnknownCallback
        for call_id, callback_id in [(3, 8), (4, 7)]:
            await stream.send(call(call_id, "removeListener", text("k"), listener(callback_id)))
            which, result = await kind(stream)
            assert (which, result.id) == ("result", call_id)
            assert (result.error.code, result.error.type) == (
                pb.NOT_FOUND,
                "backchannel.UnknownCallback",
            )

    scenario(address, body)


def test_3_a_call_refused_after_reading_its_arguments_releases_them_first_one_refused_unread_not(
    address: str,
) -> None:
    async def body(stream: RawStream) -> None:
        await stream.hello()
        extra = pb.Value(int_value=1)
        await stream.send(call(1, "addListener", text("foo.bar"), listener(7), extra))
        assert await kind(stream) == ("release", pb.Release(callback_id=7))
        which, result = await kind(stream)
        assert (which, result.id) == ("result", 1)
        assert (result.error.code, result.error.type) == (
            pb.INVALID_ARGUMENT,
            "backchannel.InvalidArguments",
        )
        # refused unread (no such service): no Release; the consumer drops its instance
        await stream.send(call(2, "addListener", text("k"), listener(8), service="x.Nobody"))
        which, result = await kind(stream)
        assert (which, result.id, result.error.type) == (
            "result",
            2,
            "backchannel.ServiceNotFound",
        )

    scenario(address, body)


def test_5_a_listener_answers_gone_with_callback_gone_and_the_provider_forgets_it(
    address: str,
) -> None:
    async def body(stream: RawStream) -> None:
        await stream.hello()
        await stream.send(call(1, "addListener", text("foo.bar"), listener(7)))
        which, callback = await kind(stream)
        assert (which, callback.callback_id) == ("call", 7)
        gone = pb.Error(code=pb.NOT_FOUND, type="backchannel.CallbackGone", message="gone")
        await stream.send(pb.Frame(result=pb.Result(id=callback.id, error=gone)))
        which, result = await kind(stream)  # the seed's addListener raised it on
        assert (which, result.id, result.error.type) == ("result", 1, "backchannel.CallbackGone")
        await stream.send(call(2, "removeListener", text("foo.bar"), listener(7)))
        which, result = await kind(stream)
        assert (which, result.id, result.error.type) == (
            "result",
            2,
            "backchannel.UnknownCallback",
        )

    scenario(address, body)


def test_2_after_a_cancel_no_result_follows_even_when_the_method_returns(
    address: str, impl: SeedImpl
) -> None:
    async def body(stream: RawStream) -> None:
        await stream.hello()
        impl.returned.clear()
        await stream.send(call(1, "addListener", text("foo.bar"), listener(7)))
        which, callback = await kind(stream)
        assert which == "call"
        await stream.send(pb.Frame(cancel=pb.Cancel(id=1, reason="gave up")))
        await stream.send(answer(callback.id))  # addListener goes on, and returns
        assert await asyncio.to_thread(impl.returned.wait, 5)
        for call_id in (2, 3):  # round trips after it returned: no Result for call 1
            await stream.send(call(call_id, "noSuchMethod"))
            which, result = await kind(stream)
            assert (which, result.id) == ("result", call_id)

    scenario(address, body)


def test_1_the_provider_sends_the_next_call_to_a_listener_before_the_previous_is_answered(
    address: str,
) -> None:
    async def body(stream: RawStream) -> None:
        await stream.hello()
        args = (listener(7), pb.Value(int_value=3))
        await stream.send(call(1, "burst", *args, service="spec.Burst"))
        calls = [await kind(stream) for _ in range(3)]  # none answered yet
        assert [(which, c.callback_id, c.parent_id) for which, c in calls] == [("call", 7, 1)] * 3
        assert [c.args[0].string_value for _, c in calls] == ["0", "1", "2"]
        for _, c in calls:
            await stream.send(answer(c.id))
        which, result = await kind(stream)
        assert (which, result.id, result.WhichOneof("outcome")) == ("result", 1, "value")

    scenario(address, body)
