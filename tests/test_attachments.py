"""Call attachments end to end (docs/attachments.md): set by the caller, read by the
callee, carried into callbacks and nested calls when the side says so, size-limited on
both sides; sync and asyncio, both transports, Connect and Invoke (grpcurl)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import RawStream, run
from filtered import FILTERED_METHODS, Filtered, SyncImpl, rig
from helpers import wait_until
from test_grpcurl import grpcurl

import backchannel
from backchannel.errors import InvalidArguments
from backchannel.rpc.attachments import Attachments
from backchannel.transport.session import Session
from backchannel.v1 import envelope_pb2 as pb

pytestmark = pytest.mark.usefixtures("transport")

FLAVOURS = ["sync", "async"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_callee_reads_what_the_caller_attached(flavour: str) -> None:
    with rig(flavour) as r:
        assert r.call("say", "hi", attach={"tenant": "t1"}) == "hi|t1"
        assert r.call("say", "hi") == "hi|-"  # only inside the with block
        # a listener's call: nothing attached, nothing read
        assert r.call("subscribe", r.watcher("a"), "x", attach={"tenant": "t1"}) == "a:x|-"


def test_attach_nests_and_is_per_thread() -> None:
    with rig("sync") as r:
        with backchannel.attach(tenant="outer", a="1"), backchannel.attach(tenant="inner"):
            assert dict(backchannel.attachments()) == {}  # the caller's own: not a call
            assert r.call("say", "x") == "x|inner"
        results: dict[str, str] = {}
        barrier = threading.Barrier(2, timeout=10)

        def caller(tenant: str) -> None:
            with backchannel.attach(tenant=tenant):
                barrier.wait()
                results[tenant] = r.call("say", tenant)

        threads = [threading.Thread(target=caller, args=(name,)) for name in ("p", "q")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert results == {"p": "p|p", "q": "q|q"}
        assert r.call("say", "after") == "after|-"


def test_attachments_are_read_only_and_checked() -> None:
    assert dict(backchannel.attachments()) == {}
    seen = Attachments({"k": "v"})
    with pytest.raises(TypeError):
        seen["k"] = "w"  # type: ignore[index]
    for bad in ("", "tab\there", "é"):
        with pytest.raises(InvalidArguments, match="printable ASCII"):
            with backchannel.attach({bad: "v"}):
                pass
    with pytest.raises(InvalidArguments, match="values are str"):
        with backchannel.attach(n=1):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="Limits.max_attachment_bytes"):
        backchannel.Limits(max_attachment_bytes=-1)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_sender_refuses_attachments_over_its_limit(flavour: str) -> None:
    with rig(flavour, client={"limits": backchannel.Limits(max_attachment_bytes=100)}) as r:
        with pytest.raises(InvalidArguments, match=r"over the limit of 100 bytes"):
            r.call("say", "x", attach={"k": "v" * 100})
        assert r.call("say", "x", attach={"k": "v" * 99}) == "x|-"  # 100 bytes: allowed
    big = {"tenant": "v" * (8 * 1024)}  # the default: 8 KiB, keys included
    with rig(flavour) as r:
        with pytest.raises(InvalidArguments, match="Limits.max_attachment_bytes"):
            r.call("say", "x", attach=big)
        assert r.call("say", "x") == "x|-"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_refused_call_s_callbacks_are_released(flavour: str) -> None:
    """The receiver's limit is lower than the sender's: the call is refused before its
    listener is taken, and the consumer is told to drop it."""
    raised = {"limits": backchannel.Limits(max_attachment_bytes=16 * 1024)}
    with rig(flavour, client=raised) as r:
        with pytest.raises(InvalidArguments, match="Limits.max_attachment_bytes"):
            r.call("subscribe", r.watcher(), "x", attach={"k": "v" * 9000})
        wait_until(lambda: r._client.callback_count == 0, 5, "the refused listener dropped")
        assert r.call("say", "x", attach={"tenant": "ok"}) == "x|ok"


def test_a_raw_call_over_the_limit_is_refused_and_the_stream_goes_on(
    server: backchannel.Server,
) -> None:
    """A hostile sender: what it sends is refused call by call, the stream serves on."""

    async def scenario() -> list[str]:
        stream = RawStream(server.address)
        messages = []
        try:
            await stream.hello()
            for call_id, attached in (
                (1, {"tenant": "v" * (8 * 1024)}),
                (3, {"bad\x01key": "v"}),
            ):
                call = pb.Call(
                    id=call_id,
                    service="test.Echo",
                    method="echo",
                    args=[pb.Value(int_value=1)],
                    attachments=attached,
                )
                await stream.send(pb.Frame(call=call))
                frame = await stream.recv()
                assert frame.result.id == call_id
                assert frame.result.error.code == pb.INVALID_ARGUMENT
                assert frame.result.error.type == "backchannel.InvalidArguments"
                messages.append(frame.result.error.message)
            result = await stream.call_echo(5, 42)  # the same stream serves on
            assert result.value.int_value == 42
        finally:
            await stream.close()
        return messages

    over, bad_key = run(scenario())
    assert "over the limit of 8192 bytes (Limits.max_attachment_bytes)" in over
    assert "not printable ASCII" in bad_key


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_propagated_into_callbacks_when_the_server_says_so(
    flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    multicast: list[dict[str, str]] = []  # the attachments of each Multicast frame's call
    start_multicast = Session.start_multicast

    def noted(self: Session, call: pb.Call, *args: Any, **kwargs: Any) -> Any:
        multicast.append(dict(call.attachments))
        return start_multicast(self, call, *args, **kwargs)

    monkeypatch.setattr(Session, "start_multicast", noted)
    with rig(flavour) as r:  # not by default
        assert r.call("subscribe", r.watcher("a"), "x", attach={"tenant": "t1"}) == "a:x|-"
    with rig(flavour, server={"propagate_attachments": True}) as r:
        assert r.call("subscribe", r.watcher("a"), "x", attach={"tenant": "t1"}) == "a:x|t1"
        r.call("subscribe", r.watcher("b"), "x")
        # gather: one Multicast frame to both listeners, its call carrying them
        assert r.call("notify_all", "go", attach={"tenant": "t2"}) == ["a:go|t2", "b:go|t2"]
        assert multicast == [{"tenant": "t2"}]  # one frame, carrying them once
    with rig(flavour, server={"propagate_attachments": ["other"]}) as r:  # these keys only
        assert r.call("subscribe", r.watcher("a"), "x", attach={"tenant": "t1"}) == "a:x|-"
    with rig(flavour, server={"propagate_attachments": ["tenant"]}) as r:
        assert r.call("subscribe", r.watcher("a"), "x", attach={"tenant": "t1"}) == "a:x|t1"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_propagated_into_nested_calls(flavour: str) -> None:
    with rig(flavour, server={"propagate_attachments": True}) as r:
        # the provider's method calls this same provider through a client of its own
        assert r.call("forward", r.address, "n", attach={"tenant": "t3"}) == "n|t3"
    with rig(flavour) as r:
        assert r.call("forward", r.address, "n", attach={"tenant": "t3"}) == "n|-"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_propagated_by_the_client_into_a_listener_s_calls(flavour: str) -> None:
    """consumer -> provider -> listener -> provider: each hop carries them on when the
    side that received the call propagates."""
    both = {"propagate_attachments": True}
    with rig(flavour, server=both, client=both) as r:
        assert r.call("subscribe", r.relay(), "n", attach={"tenant": "t6"}) == "n|t6"
    with rig(flavour, server=both) as r:  # the client does not: the listener's call is bare
        assert r.call("subscribe", r.relay(), "n", attach={"tenant": "t6"}) == "n|-"


@pytest.fixture
def filtered_address() -> Iterator[str]:
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Filtered, SyncImpl(), methods=FILTERED_METHODS)
        yield server.address


def test_invoke_carries_them(filtered_address: str) -> None:
    channel = grpc.insecure_channel(filtered_address)
    try:
        invoke = channel.unary_unary(
            "/backchannel.v1.Envelope/Invoke",
            request_serializer=pb.Call.SerializeToString,
            response_deserializer=pb.Result.FromString,
        )
        call = pb.Call(
            service="test.Filtered", method="say", json_args='["u"]', attachments={"tenant": "t4"}
        )
        result = invoke(call, timeout=10)
        assert json.loads(result.json) == "u|t4"
    finally:
        channel.close()


def test_grpcurl_sets_them(filtered_address: str) -> None:
    call = {
        "service": "test.Filtered",
        "method": "say",
        "json_args": '["g"]',
        "attachments": {"tenant": "t5"},
    }
    out = grpcurl(filtered_address, "backchannel.v1.Envelope/Invoke", data=json.dumps(call))
    assert json.loads(json.loads(out.stdout)["json"]) == "g|t5", out.stderr
