"""Text a peer chooses is logged escaped and bounded: a newline in it cannot forge a log line.

A hostile raw consumer against a real provider, and a hostile raw provider (a bare grpc
server speaking frames by hand) against a real AsyncClient, both over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import RawStream, run
from helpers import SERVICES, frames_of
from services import Echo

import backchannel
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire.text import WIRE_TEXT_LIMIT, wire_text

FORGED = "\n2026-01-01 00:00:00 CRITICAL forged"
# a forged line, ANSI colour and a carriage return, then far more than any log line needs
HOSTILE = f"boom{FORGED}\x1b[31m red\x1b[0m\r" + "x" * 5000
#: how the forged line reads once escaped: still recognisable, on the same line
ESCAPED = "boom\\n2026-01-01 00:00:00 CRITICAL forged\\x1b[31m red\\x1b[0m\\r"
#: a logged line: the library's own words around at most one cut wire text, say
BOUND = WIRE_TEXT_LIMIT + 200


def assert_logged_safely(caplog: pytest.LogCaptureFixture, what: str) -> None:
    """No record carries a raw CR, LF or ESC, each is bounded, and ``what`` was logged."""
    messages = [caplog.handler.format(r) for r in caplog.records if r.name == "backchannel"]
    for message in messages:
        assert not {"\n", "\r", "\x1b"} & set(message), message
        assert len(message) < BOUND, message
    assert any(what in m and ESCAPED in m for m in messages), messages


# ------------------------------------------------------------------ the helper


def test_wire_text_escapes_control_characters_repr_style() -> None:
    assert wire_text("a\nb\rc\x1bd\te\u202ef\x00") == "a\\nb\\rc\\x1bd\\te\\u202ef\\x00"


def test_wire_text_keeps_printable_text_and_escapes_a_backslash() -> None:
    assert wire_text("café 中文 'q' \"d\"") == "café 中文 'q' \"d\""
    assert wire_text("a\\nb") == "a\\\\nb"  # a literal backslash-n is not a newline


def test_wire_text_cuts_on_a_character_boundary_with_a_marker() -> None:
    cut = wire_text("\n" * 100, limit=11)
    assert cut == "\\n" * 5 + "...[95 more characters cut]"
    assert wire_text("y" * 1000, limit=10) == "y" * 10 + "...[990 more characters cut]"
    assert wire_text("y" * 10, limit=10) == "y" * 10


def test_wire_text_of_an_exception_is_its_str() -> None:
    assert wire_text(ValueError("bad\nline")) == "bad\\nline"

    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert wire_text(Broken()) == "<unprintable Broken>"


# ----------------------------------------------- a hostile consumer, a real provider


def test_a_consumers_fault_go_away_cancel_and_names_are_logged_escaped(
    server: backchannel.Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="backchannel")

    async def body() -> None:
        raw = RawStream(server.address)
        await raw.hello()
        await raw.send(pb.Frame(fault=pb.Fault(message=HOSTILE)))
        await raw.send(pb.Frame(call=pb.Call(id=7, service=HOSTILE, method=HOSTILE)))
        answer = await raw.recv()
        assert answer.result.error.type == "backchannel.ServiceNotFound"
        await raw.send(pb.Frame(cancel=pb.Cancel(id=7, reason=HOSTILE)))
        await raw.send(pb.Frame(go_away=pb.GoAway(reason=HOSTILE)))
        # the provider handles frames in order: once this is answered, all above was
        assert (await raw.call_echo(8, 1)).value.int_value == 1
        await raw.channel.close()

    run(body())
    assert_logged_safely(caplog, "reports a protocol fault")
    assert_logged_safely(caplog, "is going away")


# ----------------------------------------------- a hostile provider, a real consumer


class _When(logging.Handler):
    """Sets ``event`` when a record saying ``words`` is logged (on the loop's own thread)."""

    def __init__(self, words: str, event: asyncio.Event) -> None:
        super().__init__()
        self.words, self.event = words, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.event.set()


async def _hostile_connect(
    requests: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext[pb.Frame, pb.Frame]
) -> AsyncIterator[pb.Frame]:
    """Welcome; answer the first call after a Fault and a GoAway; then break the stream."""
    async for kind, one in frames_of(requests):
        if kind == "hello":
            yield pb.Frame(welcome=pb.Welcome(protocol_version=1, services=SERVICES))
        elif kind == "call":
            yield pb.Frame(fault=pb.Fault(message=HOSTILE))
            yield pb.Frame(go_away=pb.GoAway(reason=HOSTILE))
            yield pb.Frame(result=pb.Result(id=one.call.id, value=one.call.args[0]))
            await context.abort(grpc.StatusCode.UNAVAILABLE, HOSTILE)


def test_a_providers_fault_go_away_and_status_are_logged_escaped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="backchannel")

    async def body() -> None:
        ended = asyncio.Event()
        when = _When("ended", ended)
        logging.getLogger("backchannel").addHandler(when)
        hostile = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(
            _hostile_connect,
            request_deserializer=pb.Frame.FromString,
            response_serializer=pb.Frame.SerializeToString,
        )
        generic = grpc.method_handlers_generic_handler(
            "backchannel.v1.Envelope", {"Connect": handler}
        )
        hostile.add_generic_rpc_handlers((generic,))
        port = hostile.add_insecure_port("127.0.0.1:0")
        await hostile.start()
        try:
            async with backchannel.AsyncClient(f"127.0.0.1:{port}") as client:
                echo = client.reference(Echo)
                assert await echo.echo(5) == 5  # frames travel before the status
                await asyncio.wait_for(ended.wait(), 5)  # the client logged the break
        finally:
            logging.getLogger("backchannel").removeHandler(when)
            await hostile.stop(0)

    run(body())
    assert_logged_safely(caplog, "reports a protocol fault")
    assert_logged_safely(caplog, "is going away")
    assert_logged_safely(caplog, "ended")
