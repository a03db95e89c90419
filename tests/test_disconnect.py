"""Learning that a listener's consumer went away: a reverse proxy's ``on_gone`` hooks,
``await proxy.gone()`` and ``proxy.wait_gone()``, for each way an instance ends (the
consumer released it, its stream ended, the provider dropped it); the provider's
``on_connect``/``on_disconnect`` hooks; and the chat room example forgetting a member
whose consumer process was SIGKILLed, with no polling.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import run
from helpers import consumer_process, read_line
from notifier import (
    NOTIFIER_METHODS,
    AsyncRecorder,
    Listener,
    Notifier,
    NotifierImpl,
    SyncRecorder,
)

import backchannel
from backchannel import Argument
from backchannel.rpc import hooks

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

#: the bound on every wait for something that happens at once (loopback, loaded machine)
SOON = 5.0
#: how soon a SIGKILLed member must be forgotten (the issue's bound)
PROMPTLY = 2.0

CHAT = Path(__file__).resolve().parent.parent / "examples" / "chat"


@backchannel.interface("test.gone.Watched")
class Watched:
    @backchannel.method(arguments=[Argument(index=0)])
    def watch(self, listener: Listener) -> None: ...

    @backchannel.method(arguments=[Argument(index=0, callback=False)])
    def unwatch(self, listener: Listener) -> None: ...

    def drop(self) -> None: ...


class WatchedImpl:
    """Hands each proxy it gets to the test; ``drop`` releases the last one (from a
    thread of the provider's pool, as a plain method runs)."""

    def __init__(self) -> None:
        self.proxies: queue.Queue[Any] = queue.Queue()
        self.last: Any = None

    def watch(self, listener: Any) -> None:
        self.last = listener
        self.proxies.put(listener)

    def unwatch(self, listener: Any) -> None:
        pass

    def drop(self) -> None:
        self.last.release()


class AsyncWatchedImpl(WatchedImpl):
    """The same on the loop: ``drop`` releases from the event loop's thread."""

    async def watch(self, listener: Any) -> None:  # type: ignore[override]
        super().watch(listener)

    async def unwatch(self, listener: Any) -> None:  # type: ignore[override]
        pass

    async def drop(self) -> None:  # type: ignore[override]
        self.last.release()


class Told:
    """What hooks were called with, and in which thread; ``event`` is set by the first."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str]] = []
        self.event = threading.Event()
        self.loops: list[asyncio.AbstractEventLoop | None] = []

    def __call__(self, arg: Any) -> None:
        self.calls.append((arg, threading.current_thread().name))
        self.event.set()

    async def hook(self, arg: Any) -> None:  # an async def hook
        self.loops.append(asyncio.get_running_loop())
        self(arg)

    def wait(self) -> Any:
        assert self.event.wait(SOON), "the hook was not called"
        return self.calls[0][0]


@pytest.fixture
def served() -> Iterator[tuple[backchannel.Server, WatchedImpl]]:
    impl = WatchedImpl()
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Watched, impl)
        yield server, impl


def _watched(
    served: tuple[backchannel.Server, WatchedImpl],
) -> tuple[backchannel.Client, Any, SyncRecorder, Any]:
    server, impl = served
    client = backchannel.Client(server.address)
    ref = client.reference(Watched)
    listener = SyncRecorder()
    ref.watch(listener)
    return client, ref, listener, impl.proxies.get(timeout=SOON)


# ---- the three ways an instance ends, each seen by on_gone, gone() and wait_gone()


def test_consumer_release_tells_hook_waiter_and_thread(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    client, _ref, listener, proxy = _watched(served)
    with client:
        told = Told()
        proxy.on_gone(told)
        assert not told.event.is_set() and proxy.alive and proxy.gone_reason is None
        client.release(listener)
        assert told.wait() is proxy
        assert proxy.wait_gone(SOON) and not proxy.alive
        assert proxy.gone_reason == "released by the consumer"
        # told by the loop: a plain hook runs on the provider's pool, never on the loop
        assert told.calls[0][1].startswith("backchannel-provider"), told.calls
        assert len(told.calls) == 1
        assert proxy._watchers is None  # nothing held once told


def test_remover_method_ends_it_as_released_by_the_consumer(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    client, ref, listener, proxy = _watched(served)
    with client:
        told = Told()
        proxy.on_gone(told)
        ref.unwatch(listener)
        told.wait()
        assert proxy.gone_reason == "released by the consumer"


def test_stream_end_tells_every_hook_once(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    client, _ref, _listener, proxy = _watched(served)
    first, second = Told(), Told()
    proxy.on_gone(first)
    proxy.on_gone(second)
    client.close()
    assert first.wait() is proxy and second.wait() is proxy
    reason = proxy.gone_reason
    assert reason is not None and reason.startswith("the stream ended"), reason
    assert len(first.calls) == len(second.calls) == 1


def test_provider_release_from_a_thread_runs_the_hook_in_that_thread(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    client, _ref, _listener, proxy = _watched(served)
    with client:
        told = Told()
        proxy.on_gone(told)
        proxy.release()
        # in the releasing thread, before release() returned
        assert told.calls == [(proxy, threading.current_thread().name)]
        assert proxy.gone_reason == "released by the provider"


def test_provider_release_by_a_pool_method(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    client, ref, _listener, proxy = _watched(served)
    with client:
        told = Told()
        proxy.on_gone(told)
        ref.drop()  # the plain method releases it from a pool thread: the hook runs there
        assert told.wait() is proxy
        assert told.calls[0][1].startswith("backchannel-provider")
        assert proxy.gone_reason == "released by the provider"


def test_provider_release_on_the_loop_hands_plain_hooks_to_the_pool() -> None:
    async def body() -> None:
        impl = AsyncWatchedImpl()
        async with backchannel.AsyncServer("127.0.0.1:0") as server:
            server.export(Watched, impl)
            async with backchannel.AsyncClient(server.address) as client:
                ref = client.reference(Watched)
                await ref.watch(AsyncRecorder())
                proxy = impl.proxies.get(timeout=SOON)
                told = Told()
                proxy.on_gone(told)
                gone = asyncio.ensure_future(proxy.gone())
                await ref.drop()
                assert await asyncio.wait_for(gone, SOON) == "released by the provider"
                await asyncio.to_thread(told.wait)
                assert told.calls[0][1].startswith("backchannel-provider"), told.calls

    run(body())


# ---- a hook added late, a hook that raises, an async hook, a hook taken back


def test_hook_added_after_the_end_runs_at_once(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    client, _ref, _listener, proxy = _watched(served)
    client.close()
    assert proxy.wait_gone(SOON)
    told = Told()
    take_back = proxy.on_gone(told)
    assert told.calls == [(proxy, threading.current_thread().name)]  # before it returned
    take_back()  # a no-op now
    assert proxy.wait_gone(0) is True


def test_async_hook_added_after_the_end_runs_on_the_providers_loop(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    server, _impl = served
    client, _ref, _listener, proxy = _watched(served)
    client.close()
    assert proxy.wait_gone(SOON)
    told = Told()
    proxy.on_gone(told.hook)
    assert told.wait() is proxy
    assert told.loops == [server._core._loop]


def test_async_hook_runs_on_the_providers_loop(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    server, _impl = served
    client, _ref, listener, proxy = _watched(served)
    with client:
        told = Told()
        proxy.on_gone(told.hook)
        client.release(listener)
        assert told.wait() is proxy
        assert told.loops == [server._core._loop]


def test_raising_hook_is_logged_once_and_the_others_still_run(
    served: tuple[backchannel.Server, WatchedImpl],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hooks, "_windows", {})  # what an earlier run logged is forgotten

    def broken_hook(proxy: Any) -> None:
        raise RuntimeError(f"hook bug for {proxy.callback_id}")

    server, impl = served
    with backchannel.Client(server.address) as client:
        ref = client.reference(Watched)
        proxies = []
        told = [Told() for _ in range(3)]
        for i in range(3):
            ref.watch(SyncRecorder())
            proxy = impl.proxies.get(timeout=SOON)
            proxy.on_gone(broken_hook)
            proxy.on_gone(told[i])
            proxies.append(proxy)
        with caplog.at_level(logging.DEBUG, logger="backchannel"):
            for proxy in proxies:
                proxy.release()  # in this thread: the hook raises here, swallowed
            for one in told:
                one.wait()
        failures = [r for r in caplog.records if "broken_hook" in r.getMessage()]
        errors = [r for r in failures if r.levelno >= logging.ERROR]
        assert len(failures) == 3, [r.getMessage() for r in failures]
        assert len(errors) == 1  # one traceback, then DEBUG lines
        assert errors[0].exc_info is not None
        ref.watch(SyncRecorder())  # the stream goes on
        assert impl.proxies.get(timeout=SOON).alive


def test_raising_async_hook_is_logged(served: tuple[backchannel.Server, WatchedImpl]) -> None:
    failed = threading.Event()

    class Watcher(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "async_broken_hook" in record.getMessage():
                failed.set()

    async def async_broken_hook(proxy: Any) -> None:
        raise RuntimeError("async hook bug")

    client, _ref, listener, proxy = _watched(served)
    watcher = Watcher(logging.DEBUG)
    logging.getLogger("backchannel").addHandler(watcher)
    previous = logging.getLogger("backchannel").level
    logging.getLogger("backchannel").setLevel(logging.DEBUG)
    try:
        with client:
            proxy.on_gone(async_broken_hook)
            client.release(listener)
            assert failed.wait(SOON), "the async hook's failure was not logged"
    finally:
        logging.getLogger("backchannel").removeHandler(watcher)
        logging.getLogger("backchannel").setLevel(previous)


def test_hook_names_in_logs_see_through_partials() -> None:
    def forget(room: str, proxy: Any) -> None: ...

    named = hooks.name(functools.partial(forget, "lobby"))
    assert named == f"{__name__}.{forget.__qualname__}", named
    assert hooks.name(Told()) == f"{__name__}.Told"


def test_hook_taken_back_is_not_called(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    client, _ref, _listener, proxy = _watched(served)
    taken, kept = Told(), Told()
    take_back = proxy.on_gone(taken)
    proxy.on_gone(kept)
    take_back()
    client.close()
    kept.wait()
    assert taken.calls == []


# ---- waiting: bounded, and a cancelled wait leaves nothing behind


def test_wait_gone_times_out_on_a_live_instance(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    client, _ref, _listener, proxy = _watched(served)
    with client:
        started = time.monotonic()
        assert proxy.wait_gone(0.2) is False
        assert 0.15 < time.monotonic() - started < SOON
        assert proxy.alive


def test_gone_awaited_from_another_loop_and_cancelled(
    served: tuple[backchannel.Server, WatchedImpl],
) -> None:
    client, _ref, listener, proxy = _watched(served)

    async def body() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proxy.gone(), 0.1)
        assert not proxy._watchers  # the cancelled wait took itself back
        waiting = asyncio.ensure_future(proxy.gone())  # on this test's own loop
        await _until(lambda: bool(proxy._watchers), "the waiter to register")
        await asyncio.to_thread(client.release, listener)
        assert await asyncio.wait_for(waiting, SOON) == "released by the consumer"
        assert await proxy.gone() == "released by the consumer"  # at once, once gone

    with client:
        run(body())


# ---- the provider's hooks on a consumer's stream


def test_on_connect_and_on_disconnect_sync() -> None:
    connected, disconnected = Told(), Told()
    tokens = backchannel.bearer_tokens({"secret": "alice-identity"})
    with backchannel.Server(
        "127.0.0.1:0",
        authenticator=tokens,
        on_connect=connected,
        on_disconnect=disconnected,
    ) as server:
        server.export(Watched, WatchedImpl())
        with backchannel.Client(server.address, application="chat:alice", token="secret") as c:
            c.reference(Watched).watch(SyncRecorder())
            peer = connected.wait()
            assert isinstance(peer, backchannel.Peer)
            assert peer.identity == "alice-identity"
            assert peer.application == "chat:alice"
            assert peer.reason is None
            assert "127.0.0.1" in peer.address
            assert not disconnected.event.is_set()
        gone = disconnected.wait()
        assert gone.address == peer.address and gone.identity == "alice-identity"
        assert gone.application == "chat:alice"
        assert gone.reason and "closed the stream" in gone.reason, gone.reason
        assert len(connected.calls) == len(disconnected.calls) == 1
        assert connected.calls[0][1].startswith("backchannel-provider")


def test_on_disconnect_async_and_when_the_provider_stops() -> None:
    async def body() -> None:
        disconnected = asyncio.Event()
        peers: list[backchannel.Peer] = []
        connected: list[backchannel.Peer] = []

        async def on_connect(peer: backchannel.Peer) -> None:
            connected.append(peer)

        async def on_disconnect(peer: backchannel.Peer) -> None:
            assert asyncio.get_running_loop() is loop
            peers.append(peer)
            disconnected.set()

        loop = asyncio.get_running_loop()
        server = backchannel.AsyncServer(
            "127.0.0.1:0", on_connect=on_connect, on_disconnect=on_disconnect
        )
        server.export(Watched, AsyncWatchedImpl())
        await server.start()
        client = backchannel.AsyncClient(server.address)
        try:
            await client.reference(Watched).watch(AsyncRecorder())
            await server.stop()
            await asyncio.wait_for(disconnected.wait(), SOON)
        finally:
            await client.close()
        assert len(connected) == 1 and connected[0].application == ""
        assert connected[0].identity is None
        assert [peer.reason for peer in peers] == ["the provider stopped"]

    run(body())


def test_a_stream_that_never_says_hello_calls_neither_hook() -> None:
    connected, disconnected = Told(), Told()
    limits = backchannel.Limits(handshake_timeout=0.2)
    with backchannel.Server(
        "127.0.0.1:0", limits=limits, on_connect=connected, on_disconnect=disconnected
    ) as server:
        server.export(Watched, WatchedImpl())
        ended = threading.Event()
        with backchannel.Client(server.address) as client:
            client.reference(Watched).watch(SyncRecorder())
            connected.wait()
        disconnected.wait()
        # a raw stream that sends nothing: the provider ends it (no Hello within 0.2 s)
        silent = _silent_stream(server.address, ended)
        assert ended.wait(SOON), "the silent stream was not ended"
        silent.join(SOON)
        assert len(connected.calls) == len(disconnected.calls) == 1


# ---- the chat room example: a member SIGKILLed is forgotten within 2 s, no polling


def load_chat() -> ModuleType:
    """examples/chat/chat_service.py, loaded from its file."""
    name = "chat_example_service"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CHAT / "chat_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_chat_room_forgets_a_killed_idle_member_promptly() -> None:
    chat = load_chat()

    async def body() -> None:
        loop = asyncio.get_running_loop()
        left: asyncio.Queue[tuple[str, str, float]] = asyncio.Queue()
        disconnected: asyncio.Queue[backchannel.Peer] = asyncio.Queue()
        room = chat.ChatRoom(on_leave=lambda n, r: left.put_nowait((n, r, time.monotonic())))
        server = backchannel.AsyncServer(
            "127.0.0.1:0",
            on_disconnect=lambda peer: loop.call_soon_threadsafe(disconnected.put_nowait, peer),
        )
        server.export(chat.Room, room)
        async with server:
            command = [sys.executable, str(CHAT / "consumer.py"), server.address, "idle"]
            member = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=CHAT
            )
            try:
                line = await asyncio.to_thread(read_line, member, 15, "the chat member")
                assert line == "joined; in the room: idle", line
                assert await room.who() == ["idle"]
                async with backchannel.AsyncClient(server.address) as client:
                    others = client.reference(chat.Room)
                    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

                    class Other:
                        async def heard(self, who: str, text: str) -> None:
                            heard.put_nowait((who, text))

                    assert await others.join("other", Other()) == ["idle", "other"]
                    member.kill()  # SIGKILL: the member's consumer says nothing
                    killed = time.monotonic()
                    name, reason, when = await asyncio.wait_for(left.get(), PROMPTLY)
                    assert when - killed < PROMPTLY
                    assert name == "idle" and reason.startswith("the stream ended"), reason
                    assert await room.who() == ["other"]
                    peer = await asyncio.wait_for(disconnected.get(), PROMPTLY)
                    assert peer.application == "chat:idle"
                    # the room told the others
                    while (news := await asyncio.wait_for(heard.get(), SOON))[1] != (
                        f"idle left ({reason})"
                    ):
                        assert news[0] == "*", news
            finally:
                member.kill()
                member.wait(SOON)

    run(body())


@pytest.mark.parametrize("mode", ["sync", "asyncio"])
def test_a_sync_provider_hears_of_every_listener_of_a_killed_consumer(mode: str) -> None:
    count = 3
    impl = NotifierImpl(greet=False)
    gone: queue.Queue[tuple[Any, str]] = queue.Queue()
    disconnected = Told()
    with backchannel.Server("127.0.0.1:0", on_disconnect=disconnected) as server:
        server.export(Notifier, impl, methods=NOTIFIER_METHODS)
        with consumer_process(server.address, count, mode) as member:
            proxies = [impl.listeners[f"k{i}"] for i in range(count)]
            for proxy in proxies:  # plain hooks: run on the provider's pool when told
                proxy.on_gone(lambda proxy: gone.put((proxy, threading.current_thread().name)))
            member.kill()
            killed = time.monotonic()
            told = [gone.get(timeout=PROMPTLY) for _ in range(count)]
            assert time.monotonic() - killed < PROMPTLY
            assert {id(proxy) for proxy, _ in told} == {id(proxy) for proxy in proxies}
            assert all(name.startswith("backchannel-provider") for _, name in told), told
            peer = disconnected.wait()
            assert peer.reason, peer


# ---- helpers


async def _until(condition: Any, what: str) -> None:
    """Wait (bounded by SOON) until ``condition()`` holds: a state nothing signals."""
    deadline = time.monotonic() + SOON
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def _silent_stream(address: str, ended: threading.Event) -> threading.Thread:
    """A Connect stream (over the transport under test's peer, grpcio) that sends no
    Hello; ``ended`` is set when the provider ends it."""
    import grpc

    def hold() -> None:
        channel = grpc.insecure_channel(address)
        call = channel.stream_stream(
            "/backchannel.v1.Envelope/Connect",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        requests: queue.Queue[bytes | None] = queue.Queue()
        stream = call(iter(requests.get, None))
        try:
            for _ in stream:
                pass
        except grpc.RpcError:
            pass
        finally:
            ended.set()
            requests.put(None)
            channel.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread


# ---- review fixes: hooks when the provider stops, their order, waits on the loop,
# ---- reserved names, the log window


class Slow:
    """A hook that takes a while (plain: sleeps its thread; async: awaits), recording in
    which thread each call ran and what it was called with."""

    def __init__(self, kind: str, seconds: float = 0.2) -> None:
        self.kind = kind
        self.seconds = seconds
        self.lock = threading.Lock()
        self.ran: list[tuple[str, str]] = []  # (what it got, thread name), when it returned

    def _record(self, arg: Any) -> None:
        with self.lock:
            self.ran.append((type(arg).__name__, threading.current_thread().name))

    def plain(self, arg: Any) -> None:
        time.sleep(self.seconds)  # slow work, not a sync point
        self._record(arg)

    async def coroutine(self, arg: Any) -> None:
        await asyncio.sleep(self.seconds)
        self._record(arg)

    @property
    def hook(self) -> Any:
        return self.plain if self.kind == "plain" else self.coroutine


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_sync_server_stop_runs_every_hook_off_the_loop(kind: str) -> None:
    """Before the fix: with max_workers=2 only 2 of the plain on_gone hooks ran (the pool
    was shut with the rest queued), a plain on_disconnect could run on the loop or not at
    all, and async hooks died with the loop (0 completed)."""
    count = 6
    slow = Slow(kind)
    impl = WatchedImpl()
    server = backchannel.Server("127.0.0.1:0", max_workers=2, on_disconnect=slow.hook)
    server.export(Watched, impl)
    server.start()
    client = backchannel.Client(server.address)
    try:
        ref = client.reference(Watched)
        for _ in range(count):
            ref.watch(SyncRecorder())
            impl.proxies.get(timeout=SOON).on_gone(slow.hook)
        server.stop()  # the stream ends: every hook runs before stop() returns
        ran = list(slow.ran)
    finally:
        client.close()
        server.stop()
    assert sorted(name for name, _ in ran) == ["Peer"] + ["ReverseProxy"] * count, ran
    if kind == "plain":  # never on the loop's thread (it would hold stop() up)
        assert not any(thread == "backchannel-server" for _, thread in ran), ran


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_async_server_stop_runs_every_hook_off_the_loop(kind: str) -> None:
    count = 6
    slow = Slow(kind)

    async def body() -> None:
        impl = AsyncWatchedImpl()
        server = backchannel.AsyncServer("127.0.0.1:0", max_workers=2, on_disconnect=slow.hook)
        server.export(Watched, impl)
        await server.start()
        client = backchannel.AsyncClient(server.address)
        try:
            ref = client.reference(Watched)
            for _ in range(count):
                await ref.watch(AsyncRecorder())
                impl.proxies.get(timeout=SOON).on_gone(slow.hook)
            await server.stop()
            ran = list(slow.ran)
        finally:
            await client.close()
        assert sorted(name for name, _ in ran) == ["Peer"] + ["ReverseProxy"] * count, ran
        if kind == "plain":
            loop_thread = threading.current_thread().name
            assert not any(thread == loop_thread for _, thread in ran), ran

    run(body())


def test_stop_abandons_a_hook_that_never_returns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from backchannel.rpc import provider

    monkeypatch.setattr(provider, "HOOK_GRACE", 0.3)
    release = threading.Event()
    entered = threading.Event()

    def stuck(peer: Any) -> None:
        entered.set()
        release.wait(SOON)  # never returns while stop() waits

    try:
        with caplog.at_level(logging.WARNING, logger="backchannel"):
            server = backchannel.Server("127.0.0.1:0", on_disconnect=stuck)
            server.export(Watched, WatchedImpl())
            server.start()
            with backchannel.Client(server.address) as client:
                client.reference(Watched).watch(SyncRecorder())
                started = time.monotonic()
                server.stop()
                took = time.monotonic() - started
        assert entered.is_set()
        assert 0.25 < took < SOON, took
        abandoned = [r for r in caplog.records if "still running" in r.getMessage()]
        assert len(abandoned) == 1, [r.getMessage() for r in caplog.records]
    finally:
        release.set()


@pytest.mark.parametrize("connect_kind", ["plain", "async"])
def test_on_disconnect_starts_after_on_connect_returned(connect_kind: str) -> None:
    """Before the fix: both plain hooks went to the pool unordered, and three short-lived
    clients gave [disconnect x3, connect x3]: a connected-peers set kept them for ever."""
    lock = threading.Lock()
    events: list[tuple[str, str]] = []
    peers: set[str] = set()
    all_gone = threading.Event()

    def record(peer: backchannel.Peer) -> None:
        with lock:
            events.append(("connected", peer.address))
            peers.add(peer.address)

    def connected_plain(peer: backchannel.Peer) -> None:
        time.sleep(0.3)  # slow work: the stream has ended meanwhile
        record(peer)

    async def connected_async(peer: backchannel.Peer) -> None:
        await asyncio.sleep(0.3)
        record(peer)

    def disconnected(peer: backchannel.Peer) -> None:
        with lock:
            events.append(("disconnected", peer.address))
            peers.discard(peer.address)
            if sum(1 for kind, _ in events if kind == "disconnected") == 3:
                all_gone.set()

    on_connect = connected_plain if connect_kind == "plain" else connected_async
    with backchannel.Server(
        "127.0.0.1:0", max_workers=4, on_connect=on_connect, on_disconnect=disconnected
    ) as server:
        server.export(Watched, WatchedImpl())
        for _ in range(3):  # each closes at once, while its on_connect still runs
            with backchannel.Client(server.address) as client:
                client.reference(Watched).watch(SyncRecorder())
        assert all_gone.wait(SOON), events
    for address in {address for _, address in events}:
        mine = [kind for kind, a in events if a == address]
        assert mine == ["connected", "disconnected"], events
    assert peers == set(), events


def test_wait_gone_on_the_providers_loop_is_refused() -> None:
    """Before the fix: it blocked the loop (every stream), and with no timeout for ever."""

    async def body() -> None:
        impl = AsyncWatchedImpl()
        async with backchannel.AsyncServer("127.0.0.1:0") as server:
            server.export(Watched, impl)
            async with backchannel.AsyncClient(server.address) as client:
                await client.reference(Watched).watch(AsyncRecorder())
                proxy = impl.proxies.get(timeout=SOON)
                with pytest.raises(RuntimeError, match=r"await proxy\.gone\(\)"):
                    proxy.wait_gone(0.1)
                with pytest.raises(RuntimeError, match=r"await proxy\.gone\(\)"):
                    proxy.wait_ended()
                assert proxy.wait_gone(0) is False  # a poll never blocks: allowed
                # from another thread it still waits
                assert await asyncio.to_thread(proxy.wait_gone, 0.05) is False

    run(body())


@backchannel.interface("test.gone.Clashing")
class Clashing:
    def gone_reason(self) -> str: ...

    def on_gone(self, fn: str) -> None: ...


@backchannel.interface("test.gone.ClashWatched")
class ClashWatched:
    @backchannel.method(arguments=[Argument(index=0)])
    def watch(self, listener: Clashing) -> None: ...

    def ping(self) -> str: ...


class ClashWatchedImpl:
    def watch(self, listener: Any) -> None:
        pass

    def ping(self) -> str:
        return "pong"


class ClashingListener:
    def gone_reason(self) -> str:
        return "mine"

    def on_gone(self, fn: str) -> None:
        pass


def test_listener_methods_named_as_the_proxys_api_are_refused_clearly() -> None:
    """Before the fix: ``gone_reason`` made every proxy creation fail with "property has no
    setter", and ``on_gone`` silently hid the proxy's own method."""
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(ClashWatched, ClashWatchedImpl())
        with backchannel.Client(server.address) as client:
            ref = client.reference(ClashWatched)
            with pytest.raises(backchannel.InvalidArguments) as raised:
                ref.watch(ClashingListener())
            message = str(raised.value)
            assert "test.gone.Clashing" in message and "gone_reason, on_gone" in message
            assert "reserved" in message
            assert ref.ping() == "pong"  # the stream goes on


def test_hook_failures_get_a_traceback_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the fix: only the first failure of a function, for the life of the process,
    had a traceback; later (different) failures were DEBUG only."""
    now = [1000.0]
    monkeypatch.setattr(hooks, "_windows", {})
    monkeypatch.setattr(hooks, "_now", lambda: now[0])
    monkeypatch.setattr(hooks, "_LOGGED_MAX", 2)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    def one() -> None: ...
    def two() -> None: ...
    def three() -> None: ...
    def four() -> None: ...

    log = logging.getLogger("backchannel")
    keep = Keep(logging.DEBUG)
    log.addHandler(keep)
    previous = log.level
    log.setLevel(logging.DEBUG)
    try:

        def levels() -> list[int]:
            got = [r.levelno for r in records]
            records.clear()
            return got

        for _ in range(3):
            hooks.failed(one, "one", RuntimeError("bug"))
        assert levels() == [logging.ERROR, logging.DEBUG, logging.DEBUG]
        now[0] += hooks.LOG_WINDOW  # the window passed: a traceback again, with the count
        hooks.failed(one, "one", ValueError("another bug"))
        assert records[0].levelno == logging.ERROR and records[0].exc_info is not None
        assert "2 more failure(s)" in records[0].getMessage(), records[0].getMessage()
        levels()
        hooks.failed(two, "two", RuntimeError("bug"))  # its own window
        assert levels() == [logging.ERROR]
        # past _LOGGED_MAX functions, the others share one window: lines stay bounded
        hooks.failed(three, "three", RuntimeError("bug"))
        hooks.failed(four, "four", RuntimeError("bug"))
        assert levels() == [logging.ERROR, logging.DEBUG]
    finally:
        log.removeHandler(keep)
        log.setLevel(previous)
