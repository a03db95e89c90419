"""Filters end to end (docs/filters.md): on the consumer and the provider, around forward
calls and callbacks, with the sync and the asyncio API, on both transports: their order,
reading and changing the call, short-circuits, error mapping."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import grpc
import pytest
from conftest import run
from filtered import FILTERED_METHODS, AsyncImpl, Filtered, SyncImpl, SyncWatcher, rig
from helpers import wait_until

import backchannel
from backchannel.errors import InvalidArguments
from backchannel.rpc import attachments
from backchannel.rpc.filters import Invocation, Proceed, chain_of
from backchannel.transport.handoff import inbox
from backchannel.transport.portal import LoopThread
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


class AdminsOnly(backchannel.Filter):
    """Refuses forward calls (not callbacks) that do not carry role=admin."""

    def before(self, invocation: Invocation) -> None:
        if invocation.kind == "call" and invocation.attachments.get("role") != "admin":
            raise PermissionError("admins only")


async def short_circuit(invocation: Invocation, proceed: Proceed) -> Any:
    if invocation.kind == "call" and invocation.attachments.get("role") != "admin":
        return "refused"  # without proceeding
    return await proceed(invocation)


ADMIN = {"role": "admin"}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("refusal", ["raises", "returns"])
def test_a_call_refused_by_a_filter_leaves_no_listener(flavour: str, refusal: str) -> None:
    """Refused calls register none of their listeners, on either side, and count nothing
    against the export's limit (callbacks=2: three refusals, then two subscribes pass)."""
    refuse: Any = AdminsOnly() if refusal == "raises" else short_circuit
    with rig(flavour, server={"filters": [refuse]}, export={"callbacks": 2}) as r:
        for _ in range(3):
            if refusal == "raises":
                with pytest.raises(PermissionError, match="admins only"):
                    r.call("subscribe", r.watcher(), "x")
            else:
                assert r.call("subscribe", r.watcher(), "x") == "refused"
        wait_until(lambda: r._client.callback_count == 0, 5, "the refused listeners dropped")
        assert r.provider_proxies() == 0
        assert r.call("subscribe", r.watcher("a"), "x", attach=ADMIN) == "a:x|-"
        assert r.call("subscribe", r.watcher("b"), "x", attach=ADMIN) == "b:x|-"
        assert r._client.callback_count == 2
        assert r.provider_proxies() == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_remover_refused_by_a_filter_keeps_the_listener(flavour: str) -> None:
    with rig(flavour, server={"filters": [AdminsOnly()]}) as r:
        watcher = r.watcher("a")
        assert r.call("subscribe", watcher, "x", attach=ADMIN) == "a:x|-"
        with pytest.raises(PermissionError, match="admins only"):
            r.call("unsubscribe", watcher)
        assert r.call("notify_all", "go", attach=ADMIN) == ["a:go|-"]  # still there
        assert r._client.callback_count == 1
        assert r.provider_proxies() == 1
        assert r.call("unsubscribe", watcher, attach=ADMIN) == 0  # let through: removed
        wait_until(lambda: r._client.callback_count == 0, 5, "the removed listener dropped")
        assert r.provider_proxies() == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_filters_change_a_callback_s_attachments_on_both_sides(flavour: str) -> None:
    async def provider(invocation: Invocation, proceed: Proceed) -> Any:
        if invocation.kind == "callback":  # what the callback is sent with
            invocation.attachments["tenant"] = "p"
        return await proceed(invocation)

    async def consumer(invocation: Invocation, proceed: Proceed) -> Any:
        if invocation.kind == "callback":  # what the listener reads
            invocation.attachments["tenant"] = invocation.attachments.get("tenant", "") + "+c"
        return await proceed(invocation)

    with rig(flavour, server={"filters": [provider]}) as r:
        assert r.call("subscribe", r.watcher("a"), "x") == "a:x|p"
        assert r.call("notify_all", "go") == ["a:go|p"]
    with rig(flavour, client={"filters": [consumer]}) as r:
        assert r.call("subscribe", r.watcher("a"), "x") == "a:x|+c"
    with rig(flavour, server={"filters": [provider]}, client={"filters": [consumer]}) as r:
        assert r.call("subscribe", r.watcher("a"), "x") == "a:x|p+c"
        assert r.call("notify_all", "go") == ["a:go|p+c"]


def test_filter_classes_and_plain_functions_are_refused_clearly() -> None:
    with pytest.raises(TypeError, match=r"filters\[0\] is the class AdminsOnly.*AdminsOnly\(\)"):
        chain_of([AdminsOnly])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="is the class AdminsOnly"):
        backchannel.Client("127.0.0.1:1", filters=[AdminsOnly])  # type: ignore[list-item]

    def plain(invocation: Invocation, proceed: Proceed) -> Any:
        return "not awaitable"

    (link,) = chain_of([plain])
    invocation = Invocation("consumer", "call", "s", "m", [], {})

    async def never(invocation: Invocation) -> Any:
        raise AssertionError("not reached")

    with pytest.raises(TypeError, match=r"filters\[0\] \(.*plain\) returned a str, not an"):
        run(link(invocation, never))

    def forwarding(invocation: Invocation, proceed: Proceed) -> Any:
        return proceed(invocation)  # a plain def returning the awaitable: fine

    async def answer(invocation: Invocation) -> Any:
        return 42

    (link,) = chain_of([forwarding])
    assert run(link(invocation, answer)) == 42

    class Plain(backchannel.Filter):
        def filter(self, invocation: Invocation, proceed: Proceed) -> Any:
            return None

    (link,) = chain_of([Plain()])
    with pytest.raises(TypeError, match=r"filters\[0\] \(.*Plain.filter\) returned a NoneType"):
        run(link(invocation, never))


def test_callback_filters_run_in_the_context_of_the_thread_that_called() -> None:
    """Two pusher threads whose calls the provider's loop takes in one batch: each one's
    filters see its own attachments (the batch runs in the first poster's context)."""
    seen: list[tuple[str, str]] = []

    async def record(invocation: Invocation, proceed: Proceed) -> Any:
        if invocation.kind == "callback":
            carried = attachments.outgoing()
            seen.append((invocation.attachments.get("who", ""), (carried or {}).get("who", "")))
        return await proceed(invocation)

    with rig("sync", server={"filters": [record]}) as r:
        r.call("subscribe", r.watcher("a"), "init")
        r.call("subscribe", r.watcher("b"), "init")
        seen.clear()
        first, second = r.impl.listeners
        loop = first._table.session.loop
        gate = threading.Event()
        loop.call_soon_threadsafe(gate.wait, 10)  # the loop takes both posts in one batch
        box = inbox(loop)

        def push(proxy: Any, who: str) -> None:
            with backchannel.attach(who=who):
                proxy.seen(who)

        threads = [
            threading.Thread(target=push, args=(p, w)) for p, w in ((first, "1"), (second, "2"))
        ]
        try:
            threads[0].start()
            wait_until(lambda: len(box._posted) == 1, 5, "the first call posted")
            threads[1].start()
            wait_until(lambda: len(box._posted) == 2, 5, "the second call posted")
        finally:
            gate.set()
            for thread in threads:
                thread.join(10)
    assert sorted(seen) == [("1", "1"), ("2", "2")]  # before: ("2", "1"), ("2", "2")


def test_gather_over_two_servers_sends_each_stream_as_its_filters_say() -> None:
    """Listeners of two providers in one process, one with filters: a gather over both
    takes each provider's filters (or Multicast, without them) for its own listeners."""

    async def mark(invocation: Invocation, proceed: Proceed) -> Any:
        if invocation.kind == "callback":
            invocation.args[0] = invocation.args[0] + "@p"
        return await proceed(invocation)

    loop = LoopThread("two-providers")
    impls = [AsyncImpl(), AsyncImpl()]

    async def start() -> list[backchannel.AsyncServer]:
        servers = [
            backchannel.AsyncServer("127.0.0.1:0"),
            backchannel.AsyncServer("127.0.0.1:0", filters=[mark]),
        ]
        for server, impl in zip(servers, impls, strict=True):
            server.export(Filtered, impl, methods=FILTERED_METHODS)
            await server.start()
        return servers

    servers = loop.run(start())
    try:
        with (
            backchannel.Client(servers[0].address) as plain,
            backchannel.Client(servers[1].address) as filtered,
        ):
            plain.reference(Filtered, methods=FILTERED_METHODS).subscribe(SyncWatcher("a"), "x")
            ref = filtered.reference(Filtered, methods=FILTERED_METHODS)
            for name in "bc":
                ref.subscribe(SyncWatcher(name), "x")
            proxies = impls[0].listeners + impls[1].listeners
            outcomes = backchannel.gather(proxy.seen("go") for proxy in proxies)
            assert outcomes == ["a:go|-", "b:go@p|-", "c:go@p|-"]  # before: "b:go|-", ...
    finally:

        async def stop() -> None:
            for server in servers:
                await server.stop()

        loop.run(asyncio.wait_for(stop(), 10))
        loop.close()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_listener_taken_while_filters_wait_is_taken_once(flavour: str) -> None:
    """Listeners are registered as the table is when the method runs: one listener passed
    in two calls, the first held in a filter while the second takes it, is one proxy,
    counted once against the limit (callbacks=1)."""
    gate, held = threading.Event(), threading.Event()

    async def hold(invocation: Invocation, proceed: Proceed) -> Any:
        if invocation.kind == "call" and invocation.attachments.get("hold"):
            held.set()
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, 10)
        return await proceed(invocation)

    with rig(flavour, server={"filters": [hold]}, export={"callbacks": 1}) as r:
        watcher = r.watcher("a")
        outcome: list[Any] = []

        def first() -> None:
            try:
                outcome.append(r.call("subscribe", watcher, "x", attach={"hold": "1"}))
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=first)
        thread.start()
        try:
            assert held.wait(5)
            assert r.call("subscribe", watcher, "y") == "a:y|-"
        finally:
            gate.set()
            thread.join(10)
        assert outcome == ["a:x|-"]
        first_proxy, second_proxy = r.impl.listeners
        assert first_proxy is second_proxy  # before: two proxies, the first not in the table
        assert r.provider_proxies() == 1
        assert r.call("unsubscribe", watcher) == 1
        wait_until(lambda: r.provider_proxies() == 0, 5, "the listener removed")
        wait_until(lambda: r._client.callback_count == 0, 5, "the listener dropped")
        # counted once: its place is free again (before: TooManyCallbacks)
        assert r.call("subscribe", r.watcher("b"), "z") == "b:z|-"
