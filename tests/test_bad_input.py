"""Every bad input gets a clear error naming what was wrong; nothing else is lost.

Mistakes a well-behaved client cannot make are sent as raw frames over a real stream.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import RawStream, run
from services import Echo, EchoWithExtra, Nobody

import backchannel
from backchannel.v1 import envelope_pb2 as pb

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


def test_unknown_service_group_version_and_method(client: backchannel.Client) -> None:
    with pytest.raises(backchannel.ServiceNotFound, match="no service 'test.Nobody'"):
        client.reference(Nobody).ping()
    with pytest.raises(backchannel.ServiceNotFound, match="group='us'.*exported as"):
        client.reference(Echo, group="us", version="1.0.0").echo(1)
    with pytest.raises(backchannel.ServiceNotFound, match="version='9'"):
        client.reference(Echo, group="cn", version="9").echo(1)
    with pytest.raises(backchannel.MethodNotFound, match="no method 'missing'.*echo"):
        client.reference(EchoWithExtra).missing()
    assert client.reference(Echo).echo("still fine") == "still fine"


def raw_test(server: backchannel.Server, scenario: object) -> None:
    """Run a raw-frame scenario while a well-behaved client calls away on its own stream."""

    async def body() -> None:
        stream = RawStream(server.address)
        async with backchannel.AsyncClient(server.address) as good:
            echo = good.reference(Echo)
            background = asyncio.gather(*(echo.add(i, 1) for i in range(200)))
            try:
                await scenario(stream)  # type: ignore[operator]
                result = await stream.call_echo(999, 7)  # the bad stream still serves calls
                assert result.value.int_value == 7
            finally:
                await stream.close()
            assert await background == [i + 1 for i in range(200)]

    run(body())


def test_wrong_number_of_arguments(server: backchannel.Server) -> None:
    async def scenario(stream: RawStream) -> None:
        await stream.hello()
        args = [pb.Value(int_value=1)] * 3
        await stream.send(
            pb.Frame(call=pb.Call(id=1, service="test.Echo", method="add", args=args))
        )
        result = (await stream.recv()).result
        assert result.id == 1
        assert result.error.code == pb.INVALID_ARGUMENT
        assert "test.Echo.add() takes 2 arguments (a, b), got 3" in result.error.message

    raw_test(server, scenario)


def test_undecodable_value(server: backchannel.Server) -> None:
    async def scenario(stream: RawStream) -> None:
        await stream.hello()
        call = pb.Call(id=1, service="test.Echo", method="echo", args=[pb.Value()])
        await stream.send(pb.Frame(call=call))
        result = (await stream.recv()).result
        assert result.error.code == pb.INVALID_ARGUMENT
        assert "argument 0 of test.Echo.echo()" in result.error.message
        assert "empty Value" in result.error.message

    raw_test(server, scenario)


def test_callback_reference_where_none_is_declared(server: backchannel.Server) -> None:
    async def scenario(stream: RawStream) -> None:
        await stream.hello()
        ref = pb.Value(callback_value=pb.CallbackRef(id=5, interface="x.Listener"))
        await stream.send(
            pb.Frame(call=pb.Call(id=1, service="test.Echo", method="echo", args=[ref]))
        )
        result = (await stream.recv()).result
        assert "no callback argument is declared" in result.error.message

    raw_test(server, scenario)


def test_result_for_unknown_call_id(server: backchannel.Server) -> None:
    async def scenario(stream: RawStream) -> None:
        await stream.hello()
        await stream.send(pb.Frame(result=pb.Result(id=42, value=pb.Value(int_value=1))))
        fault = (await stream.recv()).fault
        assert fault.call_id == 42
        assert "result for unknown call id 42" in fault.message

    raw_test(server, scenario)


def test_duplicate_call_id(server: backchannel.Server) -> None:
    async def scenario(stream: RawStream) -> None:
        await stream.hello()
        slow = pb.Call(id=7, service="test.Echo", method="wait", args=[pb.Value(double_value=0.5)])
        await stream.send(pb.Frame(call=slow))
        await stream.send(pb.Frame(call=slow))
        fault = (await stream.recv()).fault
        assert fault.call_id == 7 and "duplicate call id 7" in fault.message
        first = (await stream.recv()).result  # the first call still finishes
        assert first.id == 7 and first.value.string_value == "done"

    raw_test(server, scenario)


def test_frames_before_the_handshake(server: backchannel.Server) -> None:
    async def scenario(stream: RawStream) -> None:
        call = pb.Call(id=3, service="test.Echo", method="echo", args=[pb.Value(int_value=1)])
        await stream.send(pb.Frame(call=call))
        result = (await stream.recv()).result
        assert result.id == 3 and result.error.code == pb.FAILED_PRECONDITION
        assert "send a hello frame before call 3" in result.error.message
        await stream.send(pb.Frame(cancel=pb.Cancel(id=3)))
        assert "unexpected cancel frame before the handshake" in (await stream.recv()).fault.message
        await stream.hello()

    raw_test(server, scenario)


def test_unknown_frame_kind(server: backchannel.Server) -> None:
    async def scenario(stream: RawStream) -> None:
        await stream.hello()
        await stream.send(pb.Frame())  # what a frame of an unknown (newer) kind parses to
        assert "no kind set" in (await stream.recv()).fault.message

    raw_test(server, scenario)


def test_unsupported_protocol_version(server: backchannel.Server) -> None:
    async def scenario(stream: RawStream) -> None:
        await stream.send(pb.Frame(hello=pb.Hello(protocol_version=99)))
        assert "unsupported protocol version 99" in (await stream.recv()).fault.message
        await stream.hello()

    raw_test(server, scenario)


def test_unknown_service_over_raw_frames(server: backchannel.Server) -> None:
    async def scenario(stream: RawStream) -> None:
        await stream.hello()
        await stream.send(pb.Frame(call=pb.Call(id=1, service="x.Y", method="z")))
        error = (await stream.recv()).result.error
        assert error.code == pb.NOT_FOUND and error.type == "backchannel.ServiceNotFound"
        assert "no service 'x.Y'" in error.message

    raw_test(server, scenario)


def test_half_close_ends_the_stream_and_cancels_what_was_running(
    server: backchannel.Server, echo_impl: object
) -> None:
    async def body() -> None:
        stream = RawStream(server.address)
        await stream.hello()
        call = pb.Call(id=1, service="test.Echo", method="wait", args=[pb.Value(double_value=30)])
        await stream.send(pb.Frame(call=call))
        assert await asyncio.to_thread(echo_impl.started.wait, 2)  # type: ignore[attr-defined]
        await stream.call.done_writing()
        with pytest.raises(EOFError):
            await stream.recv(timeout=2)  # the provider ended the stream promptly
        assert await asyncio.to_thread(echo_impl.cancelled.wait, 2)  # type: ignore[attr-defined]
        await stream.close()

    run(body())
    assert server._core.session_count == 0


def test_abandoned_stream_is_noticed(server: backchannel.Server, echo_impl: object) -> None:
    async def body() -> None:
        stream = RawStream(server.address)
        await stream.hello()
        call = pb.Call(id=1, service="test.Echo", method="wait", args=[pb.Value(double_value=30)])
        await stream.send(pb.Frame(call=call))
        assert await asyncio.to_thread(echo_impl.started.wait, 2)  # type: ignore[attr-defined]
        await stream.close()  # cancels the RPC: what a dying consumer looks like
        assert await asyncio.to_thread(echo_impl.cancelled.wait, 2)  # type: ignore[attr-defined]

    run(body())
