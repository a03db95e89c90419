"""Values nested to the limit and past it, strs that are not UTF-8, Batches that do not
parse: every call is answered, with its own clear error, and no stream is torn down."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import run
from helpers import Link, raw_stream

import backchannel
from backchannel import Argument, Method
from backchannel.errors import DecodeError, EncodeError, RemoteProtocolError
from backchannel.transport.receiver import parse_frame
from backchannel.transport.writer import coalesce
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec
from backchannel.wire.frames import varint
from backchannel.wire.protocol import Connection, ResultReceived

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

LIMIT = codec.MAX_NESTING
BAD_NAME = "report-\udcff.txt"  # what os.listdir gives for a file name that is no UTF-8


@backchannel.interface("test.Namer")
class Namer:
    def name(self) -> str: ...


@backchannel.interface("test.Hostile")
class Hostile:
    def echo(self, value: Any) -> Any: ...
    def fail_with(self, value: Any) -> None: ...
    def name(self) -> str: ...
    def aname(self) -> str: ...
    def fail_name(self) -> None: ...
    def afail_name(self) -> None: ...
    def ask(self, namer: Namer) -> str: ...


class HostileImpl:
    def echo(self, value: Any) -> Any:
        return value

    def fail_with(self, value: Any) -> None:
        raise ValueError(value)

    def name(self) -> str:
        return BAD_NAME

    async def aname(self) -> str:
        return BAD_NAME  # at once: served eagerly, inside the provider's reader

    def fail_name(self) -> None:
        raise FileNotFoundError(f"no such file: {BAD_NAME}", BAD_NAME)

    async def afail_name(self) -> None:
        raise FileNotFoundError(f"no such file: {BAD_NAME}", BAD_NAME)

    def ask(self, namer: Any) -> str:
        try:
            return f"got {namer.name()!r}"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"


class BadNamer:
    def name(self) -> str:
        return BAD_NAME


METHODS = [Method("ask", arguments=[Argument(index=0, callback=True)])]


@pytest.fixture
def hostile() -> Iterator[backchannel.Server]:
    with backchannel.Server("127.0.0.1:0", callback_timeout=10) as server:
        server.export(Hostile, HostileImpl(), methods=METHODS)
        yield server


def lists(depth: int, leaf: Any = "leaf") -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def dicts(depth: int, leaf: Any = "leaf") -> Any:
    for level in range(depth):
        leaf = {f"k{level}": leaf}
    return leaf


# ----------------------------------------------------------------- nesting


def test_32_concurrent_calls_at_the_limit_echo_back_and_one_past_it_is_refused_alone(
    hostile: backchannel.Server,
) -> None:
    """The 32 calls go out together (one Batch); at the limit they all come back equal,
    also as an exception's args (Frame > Batch > Frame > Result > Error > Value); one
    past it raises EncodeError at its caller, naming the path and the limit."""

    async def body() -> None:
        async with backchannel.AsyncClient(hostile.address, timeout=None) as client:
            service = client.reference(Hostile)
            at_limit = [lists(LIMIT, i) if i % 2 else dicts(LIMIT, i) for i in range(32)]
            echoed = await asyncio.wait_for(
                asyncio.gather(*(service.echo(value) for value in at_limit)), 10
            )
            assert echoed == at_limit
            raised = await asyncio.wait_for(
                asyncio.gather(*(service.fail_with(v) for v in at_limit), return_exceptions=True),
                10,
            )
            assert [type(exc) for exc in raised] == [ValueError] * 32
            assert [exc.args[0] for exc in raised] == at_limit

            past = [lists(LIMIT + 1) if i == 7 else dicts(LIMIT, i) for i in range(32)]
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(service.echo(v) for v in past), return_exceptions=True), 10
            )
            refused = outcomes.pop(7)
            assert isinstance(refused, EncodeError), refused
            message = str(refused)
            assert message.startswith("argument 0 'value' of test.Hostile.echo()[0][0]"), message
            assert f"nested deeper than {LIMIT} levels (the nesting limit" in message
            assert outcomes == past[:7] + past[8:]
            assert await service.echo("after") == "after"  # the stream is fine

    run(body())


def test_a_value_nested_past_the_limit_cannot_come_back_either() -> None:
    """The limit holds on decoding too: a peer with a larger one gets a DecodeError."""
    value = pb.Value(string_value="leaf")
    for _ in range(LIMIT + 1):
        value = pb.Value(list_value=pb.ValueList(items=[value]))
    with pytest.raises(DecodeError, match=r"the result\[0\]\[0\].*codec.MAX_NESTING"):
        codec.decode(value, "the result")


def test_the_deepest_frame_the_codec_makes_parses_inside_a_batch() -> None:
    """Dicts cost three protobuf levels each: at the limit, error args in a Batch with a
    callback reference at the bottom stay well under upb's 100."""
    ref = pb.CallbackRef(id=1, interface="test.Namer")
    deepest = codec.encode(dicts(LIMIT, object()), "x", lambda obj, where: ref)
    result = pb.Result(id=1, error=pb.Error(type="ValueError", args=[deepest]))
    frames = [pb.Frame(result=result), pb.Frame(call=pb.Call(id=2, method="m"))]
    (message,) = coalesce([frame.SerializeToString() for frame in frames])
    parsed = parse_frame(message)
    assert isinstance(parsed, pb.Frame) and len(parsed.batch.frames) == 2
    assert parsed.batch.frames[0] == frames[0]
    with pytest.raises(EncodeError, match="nesting limit"):  # and none can be deeper
        codec.encode(dicts(LIMIT + 1, object()), "x", lambda obj, where: ref)


def open_consumer() -> Connection[str]:
    link = Link()
    link.open()
    return link.consumer


def test_a_call_too_deep_for_protobuf_is_answered_not_lost() -> None:
    """A Call built by hand too deep for protobuf to parse (the codec never makes one) is
    sent as it is: serializing checks no depth. The receiver cannot parse it, finds its
    id in the bytes and answers it with an error, which frees the sender's slot."""
    link = Link()
    link.open()
    call = pb.Call(service="test.Echo", method="echo")
    value = call.args.add()
    for _ in range(60):  # built in place: copying it would already fail
        value = value.list_value.items.add()
    value.int_value = 1
    call_id = link.consumer.send_call(call, "token")
    (data,) = link.consumer.take_encoded()
    piece = parse_frame(data)
    assert not isinstance(piece, pb.Frame) and piece.call_id == call_id  # type: ignore[union-attr]
    link.provider.receive_unparseable(
        piece.size,  # type: ignore[union-attr]
        piece.reason,  # type: ignore[union-attr]
        call_id=piece.call_id,  # type: ignore[union-attr]
    )
    (answer,) = link.provider.take_outbox()
    (answered,) = link.consumer.receive(answer)
    assert isinstance(answered, ResultReceived) and answered.token == "token"
    error = codec.decode_error(answered.result.error, codec.ErrorTypes())
    assert isinstance(error, RemoteProtocolError)
    assert f"call {call_id} could not be read" in str(error)
    assert link.consumer.pending_outgoing == 0


# -------------------------------------------------- Batches that do not parse


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return bytes([number << 3 | 2]) + varint(len(payload)) + payload


def deep_value(depth: int) -> bytes:
    """A Value that is ``depth`` lists deep, as bytes (protobuf could not build it)."""
    value = pb.Value(int_value=1).SerializeToString()
    for _ in range(depth):
        value = field(7, field(1, value))  # Value.list_value > ValueList.items
    return value


def echo_call(call_id: int, arg: bytes) -> bytes:
    """A Frame holding a Call of test.Hostile.echo with one argument, as bytes."""
    call = pb.Call(id=call_id, service="test.Hostile", method="echo").SerializeToString()
    return field(3, call + field(6, arg))


def batch(*frames: bytes) -> bytes:
    return field(8, b"".join(field(1, frame) for frame in frames))


async def answers(call: Any, count: int) -> tuple[dict[int, pb.Result], list[pb.Fault]]:
    """The next ``count`` Results and Faults, batches unpacked, within a bound."""
    results: dict[int, pb.Result] = {}
    faults: list[pb.Fault] = []
    while len(results) + len(faults) < count:
        frame = await asyncio.wait_for(call.read(), 5)
        for inner in frame.batch.frames if frame.HasField("batch") else [frame]:
            if inner.HasField("result"):
                results[inner.result.id] = inner.result
            else:
                faults.append(inner.fault)
    return results, faults


def test_every_call_in_a_batch_too_deep_to_parse_is_answered(
    hostile: backchannel.Server,
) -> None:
    """49 lists parse in a lone frame but not two levels deeper in a Batch; 60 parse in
    neither; a method name that is no UTF-8 does not parse either. Each such call gets
    its own error, the good calls beside them their values, and the stream goes on."""
    good = pb.Value(string_value="good").SerializeToString()
    bad_utf8 = field(3, b"\x08\x05" + field(5, b"\xff\xfe"))  # Call id 5, its method no UTF-8
    message = batch(
        echo_call(1, good),
        echo_call(2, deep_value(49)),  # parses alone: refused by the codec's limit
        echo_call(3, deep_value(60)),  # does not parse even alone
        echo_call(4, good),
        bad_utf8,
        field(4, field(2, deep_value(60))),  # a Result (no id) that does not parse
    )
    with pytest.raises(Exception):  # noqa: B017  protobuf's own DecodeError: too deep
        pb.Frame.FromString(message)

    async def body() -> None:
        channel, call = await raw_stream(hostile.address)
        try:
            await call.write(message)
            results, faults = await answers(call, 6)
            assert sorted(results) == [1, 2, 3, 4, 5]
            assert results[1].value.string_value == results[4].value.string_value == "good"
            assert results[2].error.type == "backchannel.DecodeError"
            assert f"nested deeper than {LIMIT} levels" in results[2].error.message
            for call_id in (3, 5):
                error = results[call_id].error
                assert error.code == pb.INVALID_ARGUMENT, error
                assert error.type == "backchannel.RemoteProtocolError"
                assert error.message.startswith(f"call {call_id} could not be read: a message")
            assert "Depth" in results[3].error.message or "depth" in results[3].error.message
            assert [f.call_id for f in faults] == [0]  # the Result nobody can be told of
            # a lone frame too deep: its call is answered too
            await call.write(echo_call(6, deep_value(60)))
            results, _ = await answers(call, 1)
            assert results[6].error.type == "backchannel.RemoteProtocolError"
            await call.write(echo_call(7, good))
            results, _ = await answers(call, 1)
            assert results[7].value.string_value == "good"
        finally:
            call.cancel()
            await channel.close()

    run(body())


def test_a_result_that_does_not_parse_fails_its_call_and_the_peer_is_told() -> None:
    consumer = open_consumer()
    call_id = consumer.send_call(pb.Call(service="s", method="m"), "token")
    consumer.take_outbox()
    data = field(4, pb.Result(id=call_id).SerializeToString() + field(2, deep_value(60)))
    piece = parse_frame(data)
    assert not isinstance(piece, pb.Frame) and piece.result_id == call_id  # type: ignore[union-attr]
    (failed, _mistake) = consumer.receive_unparseable(
        piece.size,  # type: ignore[union-attr]
        piece.reason,  # type: ignore[union-attr]
        result_id=piece.result_id,  # type: ignore[union-attr]
    )
    assert isinstance(failed, ResultReceived) and failed.token == "token"
    error = codec.decode_error(failed.result.error, codec.ErrorTypes())
    assert isinstance(error, RemoteProtocolError)
    assert str(error).startswith(f"the result of call {call_id} could not be read")
    (fault,) = consumer.take_outbox()
    assert fault.fault.call_id == call_id
    # its Result, should one arrive after all, is dropped quietly
    assert consumer.receive(pb.Frame(result=pb.Result(id=call_id))) == []
    assert consumer.take_outbox() == []


# ------------------------------------------------------ strs that are no UTF-8


def test_results_and_errors_that_are_no_utf8_fail_their_own_call(
    hostile: backchannel.Server,
) -> None:
    """def and async def (served at once, in the reader) alike; with timeout=None, so a
    call never answered would hang: the wait bounds it. A call beside them succeeds."""

    async def body() -> None:
        async with backchannel.AsyncClient(hostile.address, timeout=None) as client:
            service = client.reference(Hostile)
            outcomes = await asyncio.wait_for(
                asyncio.gather(
                    service.name(),
                    service.aname(),
                    service.fail_name(),
                    service.afail_name(),
                    service.echo("beside"),
                    return_exceptions=True,
                ),
                10,
            )
            for method, outcome in zip(["name", "aname"], outcomes[:2], strict=True):
                assert isinstance(outcome, EncodeError), outcome
                assert str(outcome).startswith(f"the result of test.Hostile.{method}(): str is")
                assert "not valid UTF-8 (lone surrogate '\\udcff' at index 7)" in str(outcome)
            for outcome in outcomes[2:4]:
                assert isinstance(outcome, FileNotFoundError), outcome
                assert "no such file: report-\\udcff.txt" in str(outcome)
            assert outcomes[4] == "beside"
            assert await service.echo("after") == "after"  # the stream lived on

    run(body())


def test_arguments_that_are_no_utf8_raise_at_the_caller(hostile: backchannel.Server) -> None:
    with backchannel.Client(hostile.address, timeout=None) as client:
        service = client.reference(Hostile)
        with pytest.raises(EncodeError) as raised:
            service.echo({"files": ["a.txt", BAD_NAME]})
        assert str(raised.value).startswith(
            "argument 0 'value' of test.Hostile.echo()['files'][1]: str is not valid UTF-8"
        )
        with pytest.raises(EncodeError, match=r"echo\(\): dict key 'report-\\udcff.txt'"):
            service.echo({BAD_NAME: 1})
        assert service.echo("after") == "after"


def test_a_listener_result_that_is_no_utf8_is_that_callback_calls_error(
    hostile: backchannel.Server,
) -> None:
    """The listener runs on the consumer: its result fails to encode there, and the
    provider's call to it gets that error (not a timeout: the callback timeout is 10 s)."""
    with backchannel.Client(hostile.address, timeout=5) as client:
        service = client.reference(Hostile, methods=METHODS)
        answer = service.ask(BadNamer())
        assert answer.startswith("EncodeError: the result of "), answer
        assert "str is not valid UTF-8" in answer


def test_texts_this_side_puts_on_the_wire_are_escaped() -> None:
    """Exception messages and tracebacks, Fault, GoAway and Cancel reasons."""
    error = codec.encode_error(OSError(f"gone: {BAD_NAME}"), codec.ErrorTypes(), True)
    assert error.message == "gone: report-\\udcff.txt"
    assert "report-\\udcff.txt" in error.traceback
    connection = open_consumer()
    call_id = connection.send_call(pb.Call(service="s", method="m"), "token")
    connection.send_cancel(call_id, f"because {BAD_NAME}")
    connection.send_go_away(f"bye {BAD_NAME}")
    frames = connection.take_outbox()[1:]
    assert frames[0].cancel.reason == "because report-\\udcff.txt"
    assert frames[1].go_away.reason == "bye report-\\udcff.txt"
