"""Forward calls end to end over loopback, sync and asyncio: values, errors, identity."""

from __future__ import annotations

import enum
from typing import Any

import pytest
from conftest import run
from google.protobuf import timestamp_pb2
from services import Echo, EchoImpl, OutOfStock

import backchannel

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    2,
    -(2**63),
    2**63 - 1,
    1.5,
    float("inf"),
    "",
    "héllo ✓",
    b"\x00\xff",
    [],
    [1, "two", 3.0, None, [b"4"]],
    {"a": 1, "nested": {"list": [True, {"x": b"y"}]}},
    timestamp_pb2.Timestamp(seconds=1700000000, nanos=5),  # a generated protobuf message
    [timestamp_pb2.Timestamp(seconds=-1), {"when": timestamp_pb2.Timestamp()}],
]


def value_id(value: Any) -> str:
    """A one-line test id (a message's repr is its multi-line text format)."""
    if isinstance(value, timestamp_pb2.Timestamp):
        return f"Timestamp({value.seconds},{value.nanos})"
    if isinstance(value, list):
        return f"[{', '.join(map(value_id, value))}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {value_id(v)}" for k, v in value.items()) + "}"
    return repr(value)


@pytest.mark.parametrize("value", VALUES, ids=value_id)
def test_every_value_kind_round_trips_sync(client: backchannel.Client, value: Any) -> None:
    echo = client.reference(Echo)
    result = echo.echo(value)
    assert result == value
    assert type(result) is type(value)


def test_tuple_arrives_as_list_and_int_stays_int(client: backchannel.Client) -> None:
    echo = client.reference(Echo)
    assert echo.echo((1, 2)) == [1, 2]
    two = echo.echo(2)
    assert two == 2 and type(two) is int


def test_an_int_enum_argument_arrives_as_an_int_of_its_value(client: backchannel.Client) -> None:
    class Priority(enum.IntEnum):
        HUGE = 2**53 + 1  # a float cannot hold it

    echo = client.reference(Echo)
    result = echo.echo(Priority.HUGE)
    assert type(result) is int and result == 2**53 + 1
    total = echo.add(Priority.HUGE, 1)  # the provider adds what it received
    assert type(total) is int and total == 2**53 + 2


def test_protobuf_message_round_trips_as_its_own_class(client: backchannel.Client) -> None:
    stamp = timestamp_pb2.Timestamp(seconds=1700000000, nanos=5)
    result = client.reference(Echo).echo({"when": stamp})
    assert isinstance(result["when"], timestamp_pb2.Timestamp)
    assert result["when"] == stamp


def test_every_value_kind_round_trips_async(server: backchannel.Server) -> None:
    async def body() -> None:
        async with backchannel.AsyncClient(server.address) as client:
            echo = client.reference(Echo)
            for value in VALUES:
                result = await echo.echo(value)
                assert result == value and type(result) is type(value)

    run(body())


def test_protobuf_message_round_trips_as_its_own_class_async(server: backchannel.Server) -> None:
    async def body() -> None:
        stamp = timestamp_pb2.Timestamp(seconds=1700000000, nanos=5)
        async with backchannel.AsyncClient(server.address) as client:
            result = await client.reference(Echo).echo({"when": stamp, "bare": stamp})
        assert isinstance(result["when"], timestamp_pb2.Timestamp) and result["when"] == stamp
        assert type(result["bare"]) is timestamp_pb2.Timestamp and result["bare"] == stamp

    run(body())


def test_keyword_and_default_arguments(client: backchannel.Client) -> None:
    echo = client.reference(Echo)
    assert echo.greet("Dubbo") == "Hello, Dubbo!"
    assert echo.greet("grpc", greeting="Hi") == "Hi, grpc!"
    assert echo.add(b=2, a=40) == 42


def test_unsendable_argument_is_a_type_error_before_anything_is_sent(
    client: backchannel.Client, echo_impl: EchoImpl
) -> None:
    echo = client.reference(Echo)
    with pytest.raises(TypeError, match=r"argument 0 'value' of test\.Echo\.echo\(\).*object"):
        echo.echo(object())
    with pytest.raises(TypeError, match=r"argument 0 'value'.*\[1\]\['k'\]"):
        echo.echo([1, {"k": {1, 2}}])
    assert echo_impl.calls == 0
    assert echo.echo(1) == 1  # nothing broke


def test_unsendable_argument_is_a_type_error_before_anything_is_sent_async(
    server: backchannel.Server, echo_impl: EchoImpl
) -> None:
    async def body() -> None:
        async with backchannel.AsyncClient(server.address) as client:
            echo = client.reference(Echo)
            with pytest.raises(TypeError, match=r"argument 0 'value' of test\.Echo\.echo\(\)"):
                await echo.echo(object())
            with pytest.raises(TypeError, match=r"argument 1 'greeting'.*\['k'\]"):
                await echo.greet("name", greeting={"k": {1, 2}})
            assert echo_impl.calls == 0
            assert await echo.echo(1) == 1  # nothing broke

    run(body())


def test_wrong_argument_count_fails_on_the_consumer(client: backchannel.Client) -> None:
    echo = client.reference(Echo)
    with pytest.raises(backchannel.InvalidArguments, match=r"test\.Echo\.add\(\) takes 2"):
        echo.add(1)  # type: ignore[call-arg]


def test_unsendable_result_is_a_clear_error(client: backchannel.Client) -> None:
    with pytest.raises(backchannel.EncodeError, match=r"result of test\.Echo\.unsendable"):
        client.reference(Echo).unsendable()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("ValueError", ValueError), ("KeyError", KeyError), ("ZeroDivisionError", ZeroDivisionError)],
)
def test_builtin_exceptions_arrive_as_themselves(
    client: backchannel.Client, kind: str, expected: type[Exception]
) -> None:
    with pytest.raises(expected) as info:
        client.reference(Echo).fail(kind, "bad id 11")
    assert type(info.value) is expected
    assert info.value.args == ("bad id 11",)


def test_registered_exception_arrives_as_itself(server: backchannel.Server) -> None:
    with backchannel.Client(server.address, errors=[OutOfStock]) as client:
        with pytest.raises(OutOfStock, match="no more"):
            client.reference(Echo).fail("OutOfStock", "no more")


def test_unknown_exception_becomes_remote_error_without_traceback(
    client: backchannel.Client,
) -> None:
    with pytest.raises(backchannel.RemoteError) as info:
        client.reference(Echo).fail("Unregistered", "secret")
    assert info.value.type_name == "services.Unregistered"
    assert info.value.remote_message == "secret"
    assert info.value.remote_traceback == ""
    # an unregistered type is not imported: the consumer registered only OutOfStock elsewhere
    with pytest.raises(backchannel.RemoteError):
        client.reference(Echo).fail("OutOfStock", "not registered here")


def test_registered_and_unknown_exceptions_async(server: backchannel.Server) -> None:
    async def body() -> None:
        async with backchannel.AsyncClient(server.address, errors=[OutOfStock]) as client:
            echo = client.reference(Echo)
            with pytest.raises(OutOfStock, match="no more") as registered:
                await echo.fail("OutOfStock", "no more")
            assert type(registered.value) is OutOfStock
            with pytest.raises(backchannel.RemoteError) as unknown:
                await echo.fail("Unregistered", "secret")
            assert unknown.value.type_name == "services.Unregistered"
            assert unknown.value.remote_message == "secret"
            assert unknown.value.remote_traceback == ""
        async with backchannel.AsyncClient(server.address) as bare:
            with pytest.raises(backchannel.RemoteError) as not_here:
                await bare.reference(Echo).fail("OutOfStock", "not registered here")
            assert not_here.value.type_name == "services.OutOfStock"

    run(body())


def test_traceback_travels_only_when_the_provider_opts_in() -> None:
    with backchannel.Server(send_tracebacks=True) as server:
        server.export(Echo, EchoImpl())
        with backchannel.Client(server.address) as client:
            with pytest.raises(backchannel.RemoteError) as info:
                client.reference(Echo).fail("Unregistered", "boom")
    assert "Traceback" in info.value.remote_traceback
    assert "def fail" in info.value.remote_traceback or "raise" in info.value.remote_traceback


def test_group_and_version_exports_coexist(server: backchannel.Server) -> None:
    with backchannel.Client(server.address) as client:
        plain = client.reference(Echo)
        cn = client.reference(Echo, group="cn", version="1.0.0")
        assert plain.echo("a") == "a"
        assert cn.echo("b") == "b"


def test_one_stream_per_client_opened_lazily(server: backchannel.Server) -> None:
    core = server._core
    with backchannel.Client(server.address) as client:
        echo = client.reference(Echo)
        assert core.session_count == 0
        for i in range(20):
            assert echo.add(i, 1) == i + 1
        assert core.session_count == 1


def test_async_provider_and_async_client() -> None:
    async def body() -> None:
        server = backchannel.AsyncServer("127.0.0.1:0")
        server.export(Echo, EchoImpl())
        async with server, backchannel.AsyncClient(server.address) as client:
            echo = client.reference(Echo)
            assert await echo.add(2, 3) == 5
            with pytest.raises(ValueError, match="nope"):
                await echo.fail("ValueError", "nope")

    run(body())


def test_server_start_stop_sync_and_restart_on_new_object() -> None:
    server = backchannel.Server()
    server.export(Echo, EchoImpl())
    server.start()
    with backchannel.Client(server.address) as client:
        assert client.reference(Echo).add(1, 1) == 2
    server.stop()
    server.stop()  # a second stop is harmless


def test_export_mistakes_are_clear_errors() -> None:
    server = backchannel.Server()
    with pytest.raises(TypeError, match="not a backchannel interface"):
        server.export(object, EchoImpl())
    with pytest.raises(TypeError, match=r"does not implement test\.Echo\.echo"):
        server.export(Echo, object())
    server.export(Echo, EchoImpl())
    with pytest.raises(ValueError, match="already exported"):
        server.export(Echo, EchoImpl())
    with pytest.raises(ValueError, match="has no method 'nope'"):
        server.export(Echo, EchoImpl(), group="g", methods=[backchannel.Method("nope")])
    with pytest.raises(ValueError, match="async_, onreturn are consumer settings"):
        hooked = backchannel.Method("echo", async_=True, onreturn=print)
        server.export(Echo, EchoImpl(), group="h", methods=[hooked])
    with pytest.raises(ValueError, match="timeout are consumer settings"):
        server.export(Echo, EchoImpl(), group="t", methods=[backchannel.Method("echo", timeout=2)])


def test_blocking_call_from_the_loop_thread_is_refused() -> None:
    from backchannel.transport.portal import LoopThread

    portal = LoopThread("test")

    async def inner() -> int:
        return 1

    async def outer() -> None:
        with pytest.raises(RuntimeError, match="own event loop thread"):
            portal.run(inner())

    try:
        portal.run(outer())
    finally:
        portal.close()
