"""Filters end to end (docs/filters.md): on the consumer and the provider, around forward
calls and callbacks, with the sync and the asyncio API, on both transports: their order,
reading and changing the call, short-circuits, error mapping."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from filtered import FILTERED_METHODS, Filtered, SyncImpl, rig

import backchannel
from backchannel.errors import InvalidArguments
from backchannel.rpc.filters import Invocation, Proceed, chain_of
from backchannel.v1 import envelope_pb2 as pb

pytestmark = pytest.mark.usefixtures("transport")

FLAVOURS = ["sync", "async"]


class Recorder(backchannel.Filter):
    """Notes each invocation it sees, in a log shared by several filters."""

    def __init__(self, name: str, log: list[tuple[Any, ...]]) -> None:
        self.name = name
        self.log = log

    async def filter(self, invocation: Invocation, proceed: Proceed) -> Any:
        self.log.append((self.name, invocation.side, invocation.kind, invocation.method))
        result = await proceed(invocation)
        self.log.append((self.name, "done", invocation.method))
        return result


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_order_on_both_sides_forward_and_callbacks(flavour: str) -> None:
    log: list[tuple[Any, ...]] = []
    consumer = [Recorder("c1", log), Recorder("c2", log)]
    provider = [Recorder("p1", log), Recorder("p2", log)]
    with rig(flavour, server={"filters": provider}, client={"filters": consumer}) as r:
        assert r.call("say", "hi") == "hi|-"
        assert log == [
            ("c1", "consumer", "call", "say"),
            ("c2", "consumer", "call", "say"),
            ("p1", "provider", "call", "say"),
            ("p2", "provider", "call", "say"),
            ("p2", "done", "say"),
            ("p1", "done", "say"),
            ("c2", "done", "say"),
            ("c1", "done", "say"),
        ]
        log.clear()
        assert r.call("subscribe", r.watcher("a"), "x") == "a:x|-"
        seen = [entry for entry in log if entry[1] != "done"]
        assert seen == [
            ("c1", "consumer", "call", "subscribe"),
            ("c2", "consumer", "call", "subscribe"),
            ("p1", "provider", "call", "subscribe"),
            ("p2", "provider", "call", "subscribe"),
            ("p1", "provider", "callback", "seen"),  # the provider's callback, out
            ("p2", "provider", "callback", "seen"),
            ("c1", "consumer", "callback", "seen"),  # ... and the consumer running it
            ("c2", "consumer", "callback", "seen"),
        ]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_arguments_changed_on_each_side(flavour: str) -> None:
    async def upper(invocation: Invocation, proceed: Proceed) -> Any:
        if invocation.kind == "call":
            invocation.args[-1] = invocation.args[-1].upper()
        return await proceed(invocation)

    async def bang(invocation: Invocation, proceed: Proceed) -> Any:
        invocation.args = [*invocation.args[:-1], invocation.args[-1] + "!"]
        return await proceed(invocation)

    with rig(flavour, server={"filters": [bang]}, client={"filters": [upper]}) as r:
        assert r.call("say", "hi") == "HI!|-"
        # the callback's argument: "!" added by the provider's filter on its way out
        assert r.call("subscribe", r.watcher("a"), "x") == "a:X!!|-"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_short_circuit_and_results_changed(flavour: str) -> None:
    log: list[tuple[Any, ...]] = []

    class Cache(backchannel.Filter):
        async def filter(self, invocation: Invocation, proceed: Proceed) -> Any:
            if invocation.args and invocation.args[-1] == "cached":
                return "from cache"  # the call goes no further
            return await proceed(invocation)

    class Refuse(backchannel.Filter):
        def before(self, invocation: Invocation) -> None:  # plain method: sync users
            if invocation.args and invocation.args[-1] == "forbidden":
                raise PermissionError("no")

        def after(self, invocation: Invocation, result: Any) -> Any:
            return f"<{result}>"

    with rig(
        flavour,
        server={"filters": [Recorder("p", log), Refuse()]},
        client={"filters": [Cache()]},
    ) as r:
        assert r.call("say", "cached") == "from cache"
        assert log == []  # never reached the provider
        assert r.call("say", "ok") == "<ok|->"
        with pytest.raises(PermissionError, match="no"):
            r.call("say", "forbidden")
        # the callback is refused on the provider's side, before it is sent
        with pytest.raises(PermissionError, match="no"):
            r.call("subscribe", r.watcher("a"), "forbidden")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_errors_mapped(flavour: str) -> None:
    class Provider(backchannel.Filter):
        def error(self, invocation: Invocation, exc: Exception) -> Any:
            if isinstance(exc, ValueError) and str(exc) == "recover":
                return "recovered"
            raise InvalidArguments(f"mapped: {exc}") from exc

    class Consumer(backchannel.Filter):
        def error(self, invocation: Invocation, exc: Exception) -> Any:
            if isinstance(exc, InvalidArguments):
                raise LookupError(str(exc)) from exc
            raise exc

    with rig(flavour, server={"filters": [Provider()]}, client={"filters": [Consumer()]}) as r:
        assert r.call("fail", "recover") == "recovered"
        with pytest.raises(LookupError, match="mapped: boom"):
            r.call("fail", "boom")
        assert r.call("say", "still") == "still|-"  # the stream goes on


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_filters_set_attachments(flavour: str) -> None:
    async def tenant(invocation: Invocation, proceed: Proceed) -> Any:
        if invocation.side == "consumer" and invocation.kind == "call":
            invocation.attachments["tenant"] = "from-filter"
        if invocation.side == "provider" and invocation.kind == "call":
            seen = invocation.attachments.get("tenant")
            invocation.attachments["tenant"] = f"{seen}+provider"
        return await proceed(invocation)

    with rig(flavour, server={"filters": [tenant]}, client={"filters": [tenant]}) as r:
        assert r.call("say", "hi") == "hi|from-filter+provider"
        assert r.call("say", "hi", attach={"other": "x"}) == "hi|from-filter+provider"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_per_reference_and_per_export_filters_run_inside(flavour: str) -> None:
    log: list[tuple[Any, ...]] = []
    with rig(
        flavour,
        server={"filters": [Recorder("server", log)]},
        client={"filters": [Recorder("client", log)]},
        export={"filters": [Recorder("export", log)]},
    ) as r:
        ref = r.reference(filters=[Recorder("reference", log)])
        r.call("say", "hi", ref=ref)
        assert [entry[0] for entry in log if entry[1] != "done"] == [
            "client",
            "reference",
            "server",
            "export",
        ]
        log.clear()
        r.call("say", "hi")  # the other reference: no reference filter
        assert [entry[0] for entry in log if entry[1] != "done"] == ["client", "server", "export"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_gather_calls_each_go_through_filters(flavour: str) -> None:
    log: list[tuple[Any, ...]] = []

    async def mark(invocation: Invocation, proceed: Proceed) -> Any:
        if invocation.kind == "callback":
            log.append((invocation.side, invocation.args[0]))
            invocation.args[0] = invocation.args[0] + f"@{invocation.side[0]}"
        return await proceed(invocation)

    with rig(flavour, server={"filters": [mark]}, client={"filters": [mark]}) as r:
        for name in "abc":
            r.call("subscribe", r.watcher(name), "init")
        log.clear()
        outcomes = r.call("notify_all", "go")
        assert outcomes == ["a:go@p@c|-", "b:go@p@c|-", "c:go@p@c|-"]
        assert sorted(log) == [("consumer", "go@p")] * 3 + [("provider", "go")] * 3


def test_filters_checked() -> None:
    with pytest.raises(TypeError, match=r"filters\[1\] is a int"):
        chain_of([Recorder("a", []), 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"filters\[0\]"):
        backchannel.Client("127.0.0.1:1", filters=["nope"])  # type: ignore[list-item]


def test_provider_filters_see_unary_invoke() -> None:
    log: list[tuple[Any, ...]] = []
    peers: list[str] = []

    async def peer(invocation: Invocation, proceed: Proceed) -> Any:
        peers.append(invocation.peer)
        return await proceed(invocation)

    with backchannel.Server("127.0.0.1:0", filters=[Recorder("p", log), peer]) as server:
        server.export(Filtered, SyncImpl(), methods=FILTERED_METHODS)
        channel = grpc.insecure_channel(server.address)
        try:
            invoke = channel.unary_unary(
                "/backchannel.v1.Envelope/Invoke",
                request_serializer=pb.Call.SerializeToString,
                response_deserializer=pb.Result.FromString,
            )
            result = invoke(
                pb.Call(service="test.Filtered", method="say", json_args='["u"]'), timeout=10
            )
        finally:
            channel.close()
    assert json.loads(result.json) == "u|-"
    assert log == [("p", "provider", "call", "say"), ("p", "done", "say")]
    assert peers and "127.0.0.1" in peers[0]
