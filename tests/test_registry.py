"""Service URLs in Dubbo's format, the static registry, and the ZooKeeper registry
against a real ZooKeeper server (tests/zookeeper.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import run
from helpers import LogSeen, checked_threads, free_address, wait_until
from kazoo.client import KazooClient
from services import Echo, EchoImpl
from zookeeper import ZooKeeper

import backchannel
from backchannel.cluster import zookeeper as registry_module
from backchannel.cluster.loadbalance import RandomLoadBalance
from backchannel.cluster.registries import open_registry
from backchannel.cluster.registry import RegistryError, StaticRegistry
from backchannel.cluster.service_url import ServiceURL, decode, encode, release
from backchannel.cluster.zookeeper import ZookeeperRegistry

_names = itertools.count()


def fresh_interface() -> str:
    """An interface name no other test on the shared server uses."""
    return f"test.registry.Echo{next(_names)}"


def provider(interface: str, port: int, **options: Any) -> ServiceURL:
    options.setdefault("application", "tests")
    return ServiceURL.provider(interface, "127.0.0.1", port, **options)


@pytest.fixture
def registry(zookeeper: ZooKeeper) -> Iterator[ZookeeperRegistry]:
    with ZookeeperRegistry(zookeeper.address) as registry:
        yield registry


# --- URLs -------------------------------------------------------------------------


def test_provider_url_is_written_as_dubbo_writes_it_and_read_back() -> None:
    url = ServiceURL.provider(
        "demo.CallbackService",
        "10.0.0.7",
        50051,
        application="ticker",
        group="cn",
        version="1.0.0",
        methods=["addListener", "quote"],
        callbacks=1000,
        weight=200,
        timestamp=1700000000000,
    )
    assert url.to_string() == (
        "backchannel://10.0.0.7:50051/demo.CallbackService?application=ticker"
        "&callbacks=1000&group=cn&interface=demo.CallbackService&methods=addListener,quote"
        f"&release={release()}&side=provider&timestamp=1700000000000&version=1.0.0&weight=200"
    )
    assert ServiceURL.parse(url.to_string()) == url
    assert url.address == "10.0.0.7:50051" and url.category == "providers"


def test_consumer_url_has_dubbo_consumer_scheme_and_category() -> None:
    url = ServiceURL.consumer("demo.Echo", "10.0.0.8", application="app", timestamp=5)
    text = url.to_string()
    assert text.startswith("consumer://10.0.0.8/demo.Echo?")
    query = urllib.parse.parse_qs(text.partition("?")[2])
    assert query["side"] == ["consumer"] and query["category"] == ["consumers"]
    assert "weight" not in query
    assert ServiceURL.parse(text) == url
    assert url.category == "consumers"


def test_ipv6_host_round_trips() -> None:
    url = ServiceURL.provider("demo.Echo", "::1", 50051, timestamp=1)
    assert url.address == "[::1]:50051"
    assert ServiceURL.parse(url.to_string()) == url


def test_znode_names_are_encoded_exactly_as_javas_urlencoder() -> None:
    # the expected text is what java.net.URLEncoder.encode(text, "UTF-8") printed (Java 17)
    text = "backchannel://[::1]:5/a.B?x=1 2&m=a,b~*_-.é!'()"
    java = (
        "backchannel%3A%2F%2F%5B%3A%3A1%5D%3A5%2Fa.B%3Fx%3D1+2%26m%3Da%2Cb%7E*_-.%C3%A9%21%27%28%29"
    )
    assert encode(text) == java
    assert decode(java) == text


def test_a_java_dubbo_provider_url_parses_keeping_its_own_keys() -> None:
    text = (
        "dubbo://192.168.1.5:20880/org.apache.dubbo.demo.DemoService?anyhost=true"
        "&application=demo-provider&dubbo=2.0.2&interface=org.apache.dubbo.demo.DemoService"
        "&methods=sayHello,sayHelloAsync&pid=4242&release=3.2.0&side=provider&timestamp=17"
    )
    url = ServiceURL.parse(text)
    assert url.protocol == "dubbo" and url.port == 20880
    assert url.methods == ("sayHello", "sayHelloAsync")
    assert url.weight == 100  # Dubbo's default when the URL says none
    assert dict(url.parameters) == {"anyhost": "true", "dubbo": "2.0.2", "pid": "4242"}
    assert ServiceURL.parse(url.to_string()) == url


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"application": "a&b"}, "application='a&b'"),
        ({"group": "x=y"}, "group='x=y'"),
        ({"version": "1 0"}, "version='1 0'"),
        ({"weight": -1}, r"weight must be an int in 0..2147483647, not -1"),
        ({"weight": 2**31}, r"weight must be an int in 0..2147483647, not 2147483648"),
    ],
)
def test_values_a_dubbo_url_cannot_carry_are_refused(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        provider("demo.Echo", 50051, **options)


def test_bad_urls_are_refused_naming_the_problem() -> None:
    with pytest.raises(ValueError, match="no scheme"):
        ServiceURL.parse("127.0.0.1:50051/demo.Echo")
    with pytest.raises(ValueError, match="weight='heavy' is not a number"):
        ServiceURL.parse("backchannel://h:1/demo.Echo?weight=heavy")
    with pytest.raises(ValueError, match="port in 1..65535"):
        ServiceURL.provider("demo.Echo", "h", 0)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("weight=1" + "0" * 400, r"weight='10000.*' is out of its bounds 0..2147483647"),
        ("weight=2147483648", "weight='2147483648' is out of its bounds 0..2147483647"),
        ("weight=-1", "weight='-1' is out of its bounds 0..2147483647"),
        ("weight=1_000", "weight='1_000' is not a number"),
        ("weight=%20100", "weight='%20100' is not a number"),
        ("weight=\u0665", "weight='\u0665' is not a number"),  # Arabic-Indic 5: int() takes it
        ("callbacks=-1", "callbacks='-1' is out of its bounds 0..2147483647"),
        ("callbacks=2147483648", "callbacks='2147483648' is out of its bounds"),
        ("timestamp=-1", "timestamp='-1' is out of its bounds 0..9223372036854775807"),
        ("timestamp=9223372036854775808", "timestamp='9223372036854775808' is out of"),
        ("timestamp=" + "9" * 5000, "timestamp='9999.*' is out of its bounds"),
    ],
)
def test_numbers_out_of_their_bounds_are_refused_naming_key_value_and_bounds(
    query: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        ServiceURL.parse(f"backchannel://h:1/demo.Echo?{query}")
    assert len(str(refused.value)) < 400  # the value and the URL quoted cut short


def test_numbers_at_their_bounds_are_read() -> None:
    url = ServiceURL.parse(
        "backchannel://h:65535/demo.Echo?callbacks=2147483647&timestamp=9223372036854775807"
        "&weight=2147483647"
    )
    assert (url.port, url.weight, url.callbacks) == (65535, 2**31 - 1, 2**31 - 1)
    assert url.timestamp == 2**63 - 1
    lowest = ServiceURL.parse("backchannel://h:1/demo.Echo?callbacks=0&timestamp=0&weight=0")
    assert (lowest.port, lowest.weight, lowest.callbacks, lowest.timestamp) == (1, 0, 0, 0)
    assert ServiceURL.parse("backchannel://h:1/demo.Echo?weight=+7").weight == 7


def test_an_exported_weight_of_0_is_written_read_back_as_0_and_gets_no_call() -> None:
    """Weight 0 is a value, not "unset": a provider exported with it is written with
    ``weight=0``, read back as 0 (not Dubbo's default 100), and the default ``random``
    never picks it while another provider has a weight (docs/cluster.md)."""

    async def export_weight_0() -> list[ServiceURL]:
        async with backchannel.AsyncServer("127.0.0.1:0") as server:
            server.export(Echo, EchoImpl(), weight=0)
            return server.provider_urls()

    (exported,) = run(export_weight_0())
    assert exported.weight == 0
    assert "&weight=0" in exported.to_string()
    drained = ServiceURL.parse(exported.to_string())
    assert drained.weight == 0
    busy = ServiceURL.parse(exported.to_string().replace("&weight=0", "&weight=100"))
    assert busy.weight == 100 and busy.address == drained.address
    strategy = RandomLoadBalance(random.Random(17))
    picks = [strategy.select((drained, busy)) for _ in range(10_000)]
    assert all(pick is busy for pick in picks)


def test_a_provider_url_needs_a_port_in_1_to_65535() -> None:
    for text in ("backchannel://h/demo.Echo", "backchannel://h:0/demo.Echo"):
        with pytest.raises(ValueError, match="needs a port in 1..65535, not 0"):
            ServiceURL.parse(text)
    with pytest.raises(ValueError, match="out of range 0-65535"):
        ServiceURL.parse("backchannel://h:65536/demo.Echo")
    with pytest.raises(ValueError, match="could not be cast"):
        ServiceURL.parse("backchannel://h:8x/demo.Echo")
    # a consumer's URL has no port
    assert ServiceURL.parse("consumer://h/demo.Echo?side=consumer").port == 0


def test_group_and_version_match_as_in_dubbo() -> None:
    url = provider("demo.Echo", 1, group="cn", version="1.0.0")
    assert url.matches("demo.Echo", "cn", "1.0.0")
    assert url.matches("demo.Echo", "*", "*")
    assert url.matches("demo.Echo", "us,cn", "1.0.0")
    assert not url.matches("demo.Echo", "", "1.0.0")
    assert not url.matches("demo.Echo", "cn", "2.0.0")
    assert not url.matches("demo.Other", "cn", "1.0.0")


# --- the static registry -----------------------------------------------------------


def test_static_registry_serves_its_fixed_list() -> None:
    registry = open_registry("static://127.0.0.1:50051, [::1]:50052")
    assert isinstance(registry, StaticRegistry)
    subscription = registry.subscribe("demo.Echo", group="cn")
    assert {u.address for u in subscription.providers} == {"127.0.0.1:50051", "[::1]:50052"}
    assert {u.group for u in subscription.providers} == {"cn"}
    assert isinstance(open_registry("127.0.0.1:1,127.0.0.1:2"), StaticRegistry)


def test_static_and_unknown_registry_addresses_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="must be host:port, not 'nowhere'"):
        StaticRegistry("nowhere")
    with pytest.raises(ValueError, match="unknown registry etcd://"):
        open_registry("etcd://127.0.0.1:2379")


# --- ZooKeeper: layout and ephemeral nodes -------------------------------------------


def test_registration_uses_dubbos_znode_layout(
    registry: ZookeeperRegistry, reader: KazooClient
) -> None:
    interface = fresh_interface()
    url = provider(interface, 50051, methods=["echo"], callbacks=1000)
    consumer = ServiceURL.consumer(interface, "127.0.0.1", application="tests")
    registry.register(url)
    registry.register(consumer)

    assert interface in reader.get_children("/dubbo")
    (child,) = reader.get_children(f"/dubbo/{interface}/providers")
    assert child == encode(url.to_string())
    query = dict(urllib.parse.parse_qsl(decode(child).partition("?")[2]))
    assert query["interface"] == interface and query["side"] == "provider"
    assert query["methods"] == "echo" and query["weight"] == "100"
    assert query["callbacks"] == "1000" and query["application"] == "tests"
    assert query["release"] == release()
    assert decode(child).startswith(f"backchannel://127.0.0.1:50051/{interface}?")
    (consumer_child,) = reader.get_children(f"/dubbo/{interface}/consumers")
    assert ServiceURL.parse(decode(consumer_child)) == consumer

    # the URL's znode belongs to the registry's session; its parents to nobody
    _data, stat = reader.get(registry.path_of(url))
    assert stat.ephemeralOwner == registry.session_id
    for parent in ("/dubbo", f"/dubbo/{interface}", f"/dubbo/{interface}/providers"):
        assert reader.get(parent)[1].ephemeralOwner == 0, parent


def test_nodes_vanish_when_the_registering_client_closes_or_unregisters(
    zookeeper: ZooKeeper, reader: KazooClient
) -> None:
    interface = fresh_interface()
    first, second = provider(interface, 50051), provider(interface, 50052)
    registry = ZookeeperRegistry(zookeeper.address)
    registry.register(first)
    registry.register(second)
    assert len(reader.get_children(f"/dubbo/{interface}/providers")) == 2
    registry.unregister(first)
    assert reader.get_children(f"/dubbo/{interface}/providers") == [encode(second.to_string())]
    registry.close()
    assert reader.get_children(f"/dubbo/{interface}/providers") == []


def test_a_registry_address_may_carry_dubbos_session_timeout(zookeeper: ZooKeeper) -> None:
    """``?session=MS``, as in Dubbo's registry URLs; the server is asked for it."""
    with ZookeeperRegistry(f"{zookeeper.address}?session=3000") as registry:
        assert registry.hosts == zookeeper.hosts
        assert registry.session_timeout == 3.0
        assert registry._client._session_timeout == 3000
        assert registry.connected
    with pytest.raises(ValueError, match="session='soon' is not a number"):
        ZookeeperRegistry(f"{zookeeper.address}?session=soon")


def test_a_session_timeout_out_of_its_bounds_is_refused() -> None:
    for session in ("0", "-1", "2147483648"):
        with pytest.raises(ValueError, match=f"session='{session}' is out of its bounds"):
            ZookeeperRegistry(f"zookeeper://{free_address()}?session={session}")


def test_an_unreachable_zookeeper_is_reported_naming_it() -> None:
    address = free_address()
    with pytest.raises(RegistryError, match=f"ZooKeeper at {address} did not answer"):
        ZookeeperRegistry(f"zookeeper://{address}", connect_timeout=0.5)


# --- ZooKeeper: subscriptions ------------------------------------------------------------


def test_a_subscriber_on_a_loop_sees_providers_come_and_go_within_2_s(
    zookeeper: ZooKeeper,
) -> None:
    interface = fresh_interface()

    async def body() -> None:
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        threads: set[int] = set()

        def listener(providers: frozenset[ServiceURL]) -> None:
            threads.add(threading.get_ident())
            changed.set()

        with ZookeeperRegistry(zookeeper.address) as providers_side:
            existing = provider(interface, 50051)
            providers_side.register(existing)
            with ZookeeperRegistry(zookeeper.address) as consumers_side:
                subscription = await asyncio.to_thread(
                    consumers_side.subscribe, interface, listener, loop=loop
                )
                assert subscription.providers == {existing}

                added = provider(interface, 50052, weight=300)
                await asyncio.to_thread(providers_side.register, added)
                await asyncio.wait_for(changed.wait(), 2)
                assert subscription.providers == {existing, added}
                assert {u.weight for u in subscription.providers} == {100, 300}

                changed.clear()
                await asyncio.to_thread(providers_side.unregister, existing)
                await asyncio.wait_for(changed.wait(), 2)
                assert subscription.providers == {added}
                assert threads == {threading.get_ident()}  # told on the loop, never elsewhere

    run(body())


def test_a_subscriber_sees_only_its_group_and_version_and_only_backchannel_urls(
    registry: ZookeeperRegistry, reader: KazooClient
) -> None:
    interface = fresh_interface()
    plain = provider(interface, 50051)
    registry.register(plain)
    registry.register(provider(interface, 50052, group="cn", version="1.0.0"))
    java = f"dubbo://10.0.0.1:20880/{interface}?interface={interface}&side=provider"
    reader.create(f"/dubbo/{interface}/providers/{encode(java)}", ephemeral=True)
    reader.create(f"/dubbo/{interface}/providers/not-a-url", ephemeral=True)

    assert registry.subscribe(interface).providers == {plain}
    cn = registry.subscribe(interface, group="cn", version="1.0.0").providers
    assert {u.port for u in cn} == {50052}
    assert len(registry.subscribe(interface, group="*", version="*").providers) == 2


def expire_session(zookeeper: ZooKeeper, registry: ZookeeperRegistry) -> None:
    """End ``registry``'s session from the server's side: a second client joins it with
    its id and password and closes it, as ZooKeeper's own tests expire sessions."""
    intruder = KazooClient(hosts=zookeeper.hosts, client_id=registry._client.client_id)
    intruder.start(timeout=10)
    intruder.stop()
    intruder.close()


def test_after_session_expiry_registrations_come_back_and_subscriptions_go_on(
    zookeeper: ZooKeeper, reader: KazooClient
) -> None:
    interface = fresh_interface()
    registered = provider(interface, 50051)
    changes: list[frozenset[ServiceURL]] = []
    with (
        ZookeeperRegistry(zookeeper.address) as registry,
        ZookeeperRegistry(zookeeper.address) as other,
    ):
        registry.register(registered)
        subscription = registry.subscribe(interface, changes.append)
        old_session = registry.session_id

        expire_session(zookeeper, registry)
        wait_until(lambda: registry.session_id not in (None, old_session), 10, "a new session")
        path = registry.path_of(registered)
        wait_until(lambda: reader.exists(path) is not None, 5, "the provider node again")
        assert reader.get(path)[1].ephemeralOwner == registry.session_id

        added = provider(interface, 50052)
        other.register(added)
        wait_until(lambda: subscription.providers == {registered, added}, 2, "the new one")


class Gate:
    """A TCP forwarder to a ZooKeeper's client port that listens only while open: the
    registries reach the server through it, so none of their connection attempts can
    land while the server is starting (see the test below)."""

    def __init__(self, target: ZooKeeper) -> None:
        self.target = target.port
        self.port = int(free_address().rpartition(":")[2])
        self.address = f"zookeeper://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        self._start(self._accept, listener)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:  # the server is gone: so is this connection
                client.close()
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            self._start(self._pump, client, server)
            self._start(self._pump, server, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop listening and break every forwarded connection."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            self._listener.close()
            self._listener = None
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets = []
        for thread in self._threads:
            thread.join(5)
            assert not thread.is_alive(), "a forwarding thread did not end"
        self._threads = []


class LogCount(logging.Handler):
    """Counts the ``backchannel`` logger's messages holding ``text``; ``wait(n)`` blocks
    until there have been ``n`` (from any thread), at most ``timeout`` seconds."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.count = 0
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            with self._changed:
                self.count += 1
                self._changed.notify_all()

    def wait(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= count, timeout)

    def __enter__(self) -> LogCount:
        logging.getLogger("backchannel").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("backchannel").removeHandler(self)


@pytest.mark.parametrize("session", ["kept", "given-up"])
def test_while_zookeeper_is_down_subscribers_keep_providers_then_updates_resume(
    own_zookeeper: ZooKeeper, session: str
) -> None:
    """ZooKeeper stopped, then started again with its data: subscribers keep their
    providers meanwhile, a registration made meanwhile is done once it is back, and
    updates resume, whether the registries kept their sessions (a short outage) or gave
    them up (one longer than their session timeout) and start new ones.

    Each path is chosen, not left to timing. ZooKeeper opens its client port before the
    server runs, and a kazoo attempt that lands then gets no answer: it waits out its
    read timeout (the session timeout) while the registry's give-up timer (the session
    timeout after the disconnection) races with it. Which path a run took, and how long
    the updates took (0.5-4.4 s alone; a 20 s wait ran out once under load), depended on
    where kazoo's retries fell against the JVM's start. So the registries reach the server
    through a Gate that listens only once the server answers (an attempt is refused or
    answered at once), and the given-up path waits for both registries to give up their
    sessions before the server starts again."""
    interface = fresh_interface()
    known, late = provider(interface, 50051), provider(interface, 50052)
    timeout = 10.0 if session == "kept" else 2.0  # the outage lasts well under 10 s
    gate = Gate(own_zookeeper)
    gate.open()
    updated = threading.Event()
    changes: list[frozenset[ServiceURL]] = []

    def changed(providers: frozenset[ServiceURL]) -> None:
        changes.append(providers)
        if providers == {known, late}:
            updated.set()

    try:
        with (
            ZookeeperRegistry(gate.address, session_timeout=timeout) as providers_side,
            ZookeeperRegistry(gate.address, session_timeout=timeout) as consumers_side,
            LogCount("starting a new session") as given_up,
        ):
            sessions = (providers_side.session_id, consumers_side.session_id)
            providers_side.register(known)
            subscription = consumers_side.subscribe(interface, changed)
            assert subscription.providers == {known}

            gate.close()
            own_zookeeper.stop()
            wait_until(lambda: not consumers_side.connected, 10, "the consumer to notice")
            assert subscription.providers == {known}

            # registering while it is down is kept, and done once it is back
            providers_side.register(late)
            assert subscription.providers == {known}
            with pytest.raises(RegistryError, match="cannot subscribe .* is unreachable"):
                consumers_side.subscribe(interface)
            if session == "given-up":
                assert given_up.wait(2, timeout + 5), "the registries kept their sessions"
                assert subscription.providers == {known}  # past the session's end too
            assert changes == []

            own_zookeeper.start()
            gate.open()
            # kazoo's next retry (at most 1.4 s away) connects at once; the rest is a
            # few round trips
            assert updated.wait(10), f"no update to both providers: {changes}"
            assert subscription.providers == {known, late}
            now = (providers_side.session_id, consumers_side.session_id)
            if session == "kept":
                assert now == sessions and given_up.count == 0
            else:
                assert None not in now and not set(now) & set(sessions)
            after = provider(interface, 50053)
            providers_side.register(after)
            wait_until(lambda: after in subscription.providers, 2, "a provider added after")
    finally:
        gate.close()


def test_a_node_of_another_session_in_the_way_is_replaced(
    registry: ZookeeperRegistry, reader: KazooClient
) -> None:
    """The URL's node already there, ephemeral of another live session (or persistent):
    registering makes it this session's, so it lives and dies with this registry."""
    interface = fresh_interface()
    first, second = provider(interface, 50051), provider(interface, 50052)
    reader.create(registry.path_of(first), ephemeral=True, makepath=True)
    reader.create(registry.path_of(second))  # persistent: nobody's
    registry.register(first)
    registry.register(second)
    for url in (first, second):
        assert reader.get(registry.path_of(url))[1].ephemeralOwner == registry.session_id
    registry.register(first)  # its own node: left alone
    assert reader.get(registry.path_of(first))[1].ephemeralOwner == registry.session_id


def test_live_providers_are_listed_again_after_an_outage_longer_than_the_session(
    own_zookeeper: ZooKeeper,
) -> None:
    """ZooKeeper stopped for longer than the session timeout, then started with its data:
    the server brings the provider's old session back and expires it one session timeout
    later, with the node the provider's new session found there. The registry replaces
    a node of another session at once (as Curator does), so the provider is listed, by
    its current session, within one session timeout of ZooKeeper's return, and still
    once the old session has expired; a new consumer calls it."""
    timeout = 2.0
    address = f"{own_zookeeper.address}?session={int(timeout * 1000)}"
    server = backchannel.Server(registry=address)
    server.export(Echo, EchoImpl())
    with server:
        registry = server._core._registry
        assert isinstance(registry, ZookeeperRegistry)
        (url,) = server._core._registered
        path = registry.path_of(url)
        old_session = registry.session_id
        # a session that dies with the outage, as the provider's old one: its node's
        # deletion is the moment the server expires the sessions it brought back
        canary = KazooClient(hosts=own_zookeeper.hosts, timeout=timeout)
        canary.start(timeout=10)
        canary.create("/canary", ephemeral=True)

        with LogSeen("starting a new session") as given_up:
            own_zookeeper.stop()
            canary.stop()  # no server to tell: its session stays in the server's data
            canary.close()
            # the outage outlasts the session: the registry gives it up (1.5 x its timeout)
            assert given_up.seen.wait(timeout * 2 + 5), "the registry kept its session"
            time.sleep(timeout / 2)  # the outage itself, not a synchronisation
        own_zookeeper.start()
        back = time.monotonic()
        reader = KazooClient(hosts=own_zookeeper.hosts)
        reader.start(timeout=10)
        try:

            def listed_by_the_current_session() -> bool:
                stat = reader.exists(path)
                current = registry.session_id
                return (
                    stat is not None
                    and current not in (None, old_session)
                    and (stat.ephemeralOwner == current)
                )

            wait_until(listed_by_the_current_session, timeout * 3, "listed by the new session")
            took = time.monotonic() - back
            assert took <= timeout, f"listed again {took:.1f} s after ZooKeeper's return"

            expired = threading.Event()
            if reader.exists("/canary", watch=lambda event: expired.set()) is None:
                expired.set()
            assert expired.wait(timeout * 3 + 5), "the old sessions never expired"
            assert listed_by_the_current_session(), "the node went with the old session"
            with backchannel.Client(own_zookeeper.address, timeout=5) as client:
                assert client.reference(Echo).echo("still here") == "still here"
        finally:
            reader.stop()
            reader.close()


@pytest.mark.parametrize(
    ("session", "outage", "expected"),
    [
        (10.0, 1.5, ["unreachable", "reachable again"]),
        (2.0, 3.0, ["unreachable", "starting a new session", "reachable again"]),
    ],
    ids=["session-kept", "session-given-up"],
)
def test_an_outage_is_logged_once_per_change_of_state_not_per_retry(
    own_zookeeper: ZooKeeper,
    caplog: pytest.LogCaptureFixture,
    session: float,
    outage: float,
    expected: list[str],
) -> None:
    """ZooKeeper stopped for some seconds while a registry is open: kazoo retries
    several times a second, and used to log each attempt (``Connecting to``,
    ``Connection dropped: ... Connection refused``). Now each change of state is one
    line of ours, whatever the outage's length: unreachable (with kazoo's reason), the
    session given up if it was, reachable again; kazoo's own lines are at DEBUG."""
    caplog.set_level(logging.INFO)
    interface = fresh_interface()
    with ZookeeperRegistry(own_zookeeper.address, session_timeout=session) as registry:
        registry.subscribe(interface)
        caplog.clear()
        own_zookeeper.stop()
        wait_until(lambda: not registry.connected, 10, "the registry to notice")
        time.sleep(outage)  # the outage itself, not a synchronisation
        own_zookeeper.start()
        wait_until(
            lambda: any("reachable again" in r.getMessage() for r in caplog.records),
            10,
            "a line saying ZooKeeper is reachable again",
        )
        lines = [
            (r.name, r.levelname, r.getMessage())
            for r in caplog.records
            if r.name.startswith(("kazoo", "backchannel"))
        ]
    assert len(lines) == len(expected), lines
    for (name, _level, message), text in zip(lines, expected, strict=True):
        assert name == "backchannel.registry" and text in message, lines
    assert "socket connection broken" in lines[0][2]  # kazoo's reason, said once


def test_a_bad_znode_is_warned_of_once_across_a_session_given_up(
    own_zookeeper: ZooKeeper, caplog: pytest.LogCaptureFixture
) -> None:
    """A znode that is no URL we can read, in a subscribed folder: one warning. ZooKeeper
    stopped past the session timeout, the registry gives its session up and watches the
    folder again from a new one (another thread than the subscriber's): the bad znode is
    not warned of again, and the subscription still follows the folder."""
    caplog.set_level(logging.INFO, logger="backchannel")
    interface = fresh_interface()
    folder = f"/dubbo/{interface}/providers"
    bad_path = f"{folder}/{encode('backchannel://127.0.0.1:1/x?weight=-5')}"
    writer = KazooClient(hosts=own_zookeeper.hosts)
    writer.start(timeout=10)
    try:
        writer.create(bad_path, makepath=True)  # persistent: it outlives every session
    finally:
        writer.stop()
        writer.close()
    with ZookeeperRegistry(own_zookeeper.address, session_timeout=2.0) as registry:
        subscription = registry.subscribe(interface)
        assert not subscription.providers
        with LogSeen("starting a new session") as given_up, LogSeen("reachable again") as back:
            own_zookeeper.stop()
            assert given_up.seen.wait(15), "the registry kept its session"
            own_zookeeper.start()
            assert back.seen.wait(15), "never reconnected"
        url = provider(interface, 7001)
        registry.register(url)  # the new session's watch sees it (and the bad one again)
        wait_until(lambda: subscription.providers == {url}, 10, "the new provider")
    warned = [
        r for r in caplog.records if r.levelno >= logging.WARNING and bad_path in r.getMessage()
    ]
    assert len(warned) == 1, [r.getMessage()[:200] for r in caplog.records]


class _MeetingSet(set[str]):
    """A set whose membership test waits (up to 1 s) until two threads ask at once: the
    window between a check and an add, made wide for the test."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2)

    def __contains__(self, item: object) -> bool:
        answer = super().__contains__(item)
        with contextlib.suppress(threading.BrokenBarrierError):
            self.barrier.wait(timeout=1)  # the other thread checks before this one adds
        return answer


def test_two_watches_parsing_one_bad_znode_at_once_warn_of_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The folder's refused children are shared by watches in different threads (kazoo
    runs a watch's first call in the subscriber's thread): two threads that parse the
    same bad znode at once, both past the check before either added it, warned twice."""
    caplog.set_level(logging.WARNING, logger="backchannel")
    refused = registry_module._Refused()
    refused._children = _MeetingSet()
    child = encode("backchannel://127.0.0.1:1/x?weight=-5")
    with checked_threads(10) as start:
        for _ in range(2):
            start(registry_module._parse_child, child, "/f", refused)
    warned = [r for r in caplog.records if "ignoring the znode" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert child in refused


def test_a_listener_that_raises_does_not_stop_the_updates(
    registry: ZookeeperRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    interface = fresh_interface()
    seen: list[int] = []

    def listener(providers: frozenset[ServiceURL]) -> None:
        seen.append(len(providers))
        raise RuntimeError("listener bug")

    subscription = registry.subscribe(interface, listener)
    registry.register(provider(interface, 50051))
    wait_until(lambda: seen == [1], 2, "the first change")
    registry.register(provider(interface, 50052))
    wait_until(lambda: seen == [1, 2], 2, "the second change")
    assert len(subscription.providers) == 2
    assert "listener of" in caplog.text and "listener bug" in caplog.text
