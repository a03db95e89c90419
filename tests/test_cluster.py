"""Clusters end to end: providers registering in a real ZooKeeper (tests/zookeeper.py),
consumers choosing among them, failing over, and callbacks following their consumer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run
from helpers import RANDOM_CALLS, free_address, wait_until
from kazoo.client import KazooClient
from notifier import NOTIFIER_METHODS, Notifier, NotifierImpl, SyncRecorder
from services import Echo, EchoImpl
from zookeeper import ZooKeeper, providers_of

import backchannel
from backchannel import Method
from backchannel.cluster.registry import StaticRegistry
from backchannel.cluster.service_url import ServiceURL, decode, encode, reachable_host
from backchannel.cluster.zookeeper import ZookeeperRegistry
from backchannel.rpc.interface import interface_spec

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

_names = itertools.count()


def fresh_group() -> str:
    """A group no other test on the shared ZooKeeper uses (the interface is test.Echo)."""
    return f"g{next(_names)}"


# --- providers register -----------------------------------------------------------


def test_a_server_registers_each_export_and_unregisters_before_going_away(
    zookeeper: ZooKeeper, reader: KazooClient
) -> None:
    group = fresh_group()
    server = backchannel.Server("127.0.0.1:0", application="tests", registry=zookeeper.address)
    server.export(Echo, EchoImpl(), group=group, version="1.0.0", callbacks=7, weight=250)
    server.start()
    try:
        (url,) = providers_of(reader, "test.Echo", group)
        assert url.address == server.address and url.protocol == "backchannel"
        assert (url.interface, url.group, url.version) == ("test.Echo", group, "1.0.0")
        assert (url.weight, url.callbacks, url.application) == (250, 7, "tests")
        assert set(url.methods) == set(interface_spec(Echo).methods)
        assert url.side == "provider" and url.timestamp > 0
        node = f"/dubbo/test.Echo/providers/{encode(url.to_string())}"
        assert reader.exists(node).ephemeralOwner != 0
    finally:
        server.stop()
    assert providers_of(reader, "test.Echo", group) == []


def test_a_server_on_a_wildcard_address_advertises_a_reachable_one(
    zookeeper: ZooKeeper, reader: KazooClient
) -> None:
    group = fresh_group()
    host = reachable_host("0.0.0.0")
    assert host == "127.0.0.1" or (host != "0.0.0.0" and not host.startswith("127."))
    server = backchannel.Server("0.0.0.0:0", registry=zookeeper.address)
    server.export(Echo, EchoImpl(), group=group)
    server.start()
    try:
        (url,) = providers_of(reader, "test.Echo", group)
        assert url.address == f"{host}:{server.port}" == server.advertised_address
    finally:
        server.stop()
    server = backchannel.Server("0.0.0.0:0", registry=zookeeper.address, advertise_host="10.9.8.7")
    server.export(Echo, EchoImpl(), group=group)
    server.start()
    try:
        (url,) = providers_of(reader, "test.Echo", group)
        assert url.address == f"10.9.8.7:{server.port}" == server.advertised_address
    finally:
        server.stop()


def test_an_async_server_withdraws_its_urls_before_its_calls_finish(
    zookeeper: ZooKeeper, reader: KazooClient
) -> None:
    """stop(grace) unregisters first: the node is gone while a call is still running."""
    group = fresh_group()
    impl = EchoImpl()

    async def body() -> None:
        server = backchannel.AsyncServer(registry=zookeeper.address)
        server.export(Echo, impl, group=group)
        await server.start()
        assert len(providers_of(reader, "test.Echo", group)) == 1
        async with backchannel.AsyncClient(server.address, timeout=10) as client:
            running = asyncio.ensure_future(client.reference(Echo, group=group).wait(1.0))
            assert await asyncio.to_thread(impl.started.wait, 5)
            stopping = asyncio.ensure_future(server.stop(grace=5))
            await asyncio.to_thread(
                wait_until, lambda: not providers_of(reader, "test.Echo", group), 5, "unregistered"
            )
            assert not running.done()  # withdrawn while its call still runs
            assert await running == "done"
            await stopping

    run(body())


def test_an_export_made_while_the_server_runs_is_registered_at_once_and_withdrawn_on_stop(
    zookeeper: ZooKeeper, reader: KazooClient
) -> None:
    """The documented asyncio pattern: export() inside ``async with AsyncServer(...,
    registry=...)``. The export is registered within 2 s, a consumer calls it, and its
    node is withdrawn on stop like the others'. The sync Server's export() returns once
    its URL is registered. A value the URL cannot carry is refused by export() itself."""
    group, late_group, sync_group = fresh_group(), fresh_group(), fresh_group()

    async def body() -> None:
        server = backchannel.AsyncServer(registry=zookeeper.address)
        server.export(Echo, EchoImpl(), group=group)
        async with server:
            server.export(Echo, EchoImpl(), group=late_group, weight=7)
            await asyncio.to_thread(
                wait_until, lambda: providers_of(reader, "test.Echo", late_group), 2, "registered"
            )
            (url,) = providers_of(reader, "test.Echo", late_group)
            assert url.address == server.advertised_address and url.weight == 7
            async with backchannel.AsyncClient(zookeeper.address, timeout=5) as client:
                assert await client.reference(Echo, group=late_group).echo("late") == "late"
            with pytest.raises(ValueError, match="group='a&b'"):
                server.export(Echo, EchoImpl(), group="a&b")
            assert "a&b" not in {s.group for s in server._exports.services()}
        assert not providers_of(reader, "test.Echo", group)
        assert not providers_of(reader, "test.Echo", late_group)

    run(body())

    with backchannel.Server(registry=zookeeper.address) as server:
        server.export(Echo, EchoImpl(), group=sync_group)
        (url,) = providers_of(reader, "test.Echo", sync_group)  # at once: no wait
        assert url.address == server.advertised_address
    assert not providers_of(reader, "test.Echo", sync_group)


class _ThreadsThatRead(dict):  # type: ignore[type-arg]
    """A dict that notes every thread that iterates it (the exports, by key)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.threads: set[int] = set()

    def __iter__(self) -> Iterator[object]:
        self.threads.add(threading.get_ident())
        return super().__iter__()

    def values(self) -> Any:
        self.threads.add(threading.get_ident())
        return super().values()

    def items(self) -> Any:
        self.threads.add(threading.get_ident())
        return super().items()

    def keys(self) -> Any:
        self.threads.add(threading.get_ident())
        return super().keys()


def test_registration_reads_the_exports_on_the_loop_where_export_adds_to_them() -> None:
    """The registration thread (start, and each export made while running) never
    iterates the exports: export() adds to them on the loop meanwhile ("dictionary
    changed size during iteration"). It registers the URLs taken on the loop."""
    registry = StaticRegistry("127.0.0.1:1")

    async def body() -> None:
        server = backchannel.AsyncServer(registry=registry)
        exports = _ThreadsThatRead(server._exports._by_key)
        server._exports._by_key = exports
        server.export(Echo, EchoImpl(), group="a")
        async with server:
            for group in ("b", "c", "d"):
                server.export(Echo, EchoImpl(), group=group)
            async with asyncio.timeout(5):
                while server._registering:
                    await asyncio.gather(*server._registering)
            assert exports.threads == {threading.get_ident()}, "read off the loop"
            assert {url.group for url in registry.registered} == {"a", "b", "c", "d"}

    run(body())


# --- consumers choose -------------------------------------------------------------


@contextlib.contextmanager
def echo_servers(
    count: int, group: str = "", registry: str | None = None, weights: tuple[int, ...] = ()
) -> Iterator[list[tuple[backchannel.Server, EchoImpl]]]:
    """``count`` started in-process providers of Echo, each with its own impl."""
    started: list[tuple[backchannel.Server, EchoImpl]] = []
    try:
        for i in range(count):
            server, impl = backchannel.Server(registry=registry), EchoImpl()
            weight = weights[i] if weights else 100
            server.export(Echo, impl, group=group or None, weight=weight)
            server.start()
            started.append((server, impl))
        yield started
    finally:
        for server, _impl in started:
            server.stop()


def test_a_static_list_spreads_calls_as_roundrobin_and_random_say() -> None:
    """roundrobin: exactly a third each; random: a third each within ±5 points over
    1,500 calls. That is 4.1 standard deviations of a share, so a run falls outside by
    chance about once in 8,000 (600 calls, as before, gave 2.6: about once in 40)."""
    with echo_servers(3) as servers:
        addresses = ",".join(server.address for server, _ in servers)
        with backchannel.Client(addresses) as client:
            rr = client.reference(Echo, loadbalance="roundrobin")
            for i in range(300):
                assert rr.echo(i) == i
            assert [impl.calls for _, impl in servers] == [100, 100, 100]
            rnd = client.reference(Echo)  # random is the default
            for i in range(RANDOM_CALLS):
                assert rnd.echo(i) == i
            shares = [(impl.calls - 100) / RANDOM_CALLS for _, impl in servers]
            assert all(abs(share - 1 / 3) < 0.05 for share in shares), shares


def test_a_call_that_cannot_be_sent_fails_over_whatever_the_mode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One address of the list has nobody listening: every call, failfast ones too,
    ends on a live provider; one that fails on the provider is not re-sent."""
    with echo_servers(2) as servers:
        addresses = ",".join([free_address()] + [server.address for server, _ in servers])
        with backchannel.Client(addresses, timeout=5) as client:
            for mode in ("failover", "failfast", "failsafe"):
                echo = client.reference(Echo, cluster=mode)
                for i in range(30):
                    assert echo.echo(i) == i
            assert sum(impl.calls for _, impl in servers) == 90
            failfast = client.reference(Echo, cluster="failfast")
            with pytest.raises(ValueError, match="boom"):
                failfast.fail("ValueError", "boom")
            failsafe = client.reference(Echo, cluster="failsafe")
            with caplog.at_level(logging.WARNING, "backchannel"):
                assert failsafe.fail("ValueError", "boom") is None
            assert "ignored (failsafe)" in caplog.text and "boom" in caplog.text


def test_forking_returns_the_first_success_and_broadcast_reaches_every_provider() -> None:
    with echo_servers(3) as servers:
        addresses = ",".join(server.address for server, _ in servers)
        with backchannel.Client(addresses, timeout=5) as client:
            forking = client.reference(Echo, cluster="forking", forks=3)
            assert forking.echo("x") == "x"
            wait_until(lambda: sum(impl.calls for _, impl in servers) == 3, 5, "3 forks")
            broadcast = client.reference(Echo, cluster="broadcast")
            assert broadcast.echo("y") == "y"
            assert [impl.calls for _, impl in servers] == [2, 2, 2]
            with pytest.raises(ValueError, match="every"):
                broadcast.fail("ValueError", "every")
    with pytest.raises(ValueError, match="unknown cluster 'sideways'"):
        backchannel.Client("127.0.0.1:1,127.0.0.1:2").reference(Echo, cluster="sideways")


def test_a_provider_going_away_gets_no_new_calls_while_its_running_calls_finish() -> None:
    with echo_servers(2) as servers:
        (first, first_impl), (_second, second_impl) = servers
        addresses = ",".join(server.address for server, _ in servers)

        async def body() -> None:
            async with backchannel.AsyncClient(addresses, timeout=10) as client:
                echo = client.reference(Echo, loadbalance="roundrobin")
                await asyncio.gather(*(echo.echo(i) for i in range(4)))  # both streams open
                slow = client.reference(Echo, cluster="broadcast", timeout=10)
                running = asyncio.ensure_future(slow.wait(1.0))
                assert await asyncio.to_thread(first_impl.started.wait, 5)
                stopping = asyncio.ensure_future(asyncio.to_thread(first.stop, 5))
                link = client._links[first.address]
                await asyncio.to_thread(wait_until, lambda: not link.available, 5, "GoAway")
                before = first_impl.calls
                for i in range(50):
                    assert await echo.echo(i) == i
                assert first_impl.calls == before  # all 50 went to the other
                assert await running == "done"  # the running call finished
                await stopping

        run(body())
        assert second_impl.calls >= 50


def test_zookeeper_consumers_follow_providers_and_register_themselves(
    zookeeper: ZooKeeper, reader: KazooClient
) -> None:
    """The client registers under consumers/; a provider that registers gets calls
    within 2 s, one that stops gets none after its znode is gone."""
    group = fresh_group()
    with echo_servers(2, group, zookeeper.address, weights=(100, 300)) as servers:

        async def body() -> None:
            async with backchannel.AsyncClient(
                zookeeper.address, application="watcher", timeout=5
            ) as client:
                echo = client.reference(Echo, group=group)
                for i in range(400):
                    assert await echo.echo(i) == i
                light, heavy = servers[0][1].calls, servers[1][1].calls
                assert light + heavy == 400 and 0.65 < heavy / 400 < 0.85, (light, heavy)
                consumers = reader.get_children("/dubbo/test.Echo/consumers")
                urls = [ServiceURL.parse(decode(child)) for child in consumers]
                mine = [u for u in urls if u.group == group]
                assert len(mine) == 1 and mine[0].application == "watcher"
                assert mine[0].side == "consumer"
                with echo_servers(1, group, zookeeper.address) as ((_late, late_impl),):
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + 2
                    while late_impl.calls == 0:
                        assert loop.time() < deadline, "the new provider got no call in 2 s"
                        await echo.echo(0)
                stopped, stopped_impl = servers[0]
                link = client._links[stopped.address]
                session = link.session
                assert session is not None
                await asyncio.to_thread(stopped.stop)  # the loop reads its GoAway meanwhile
                await asyncio.wait_for(session.closed.wait(), 5)
                before = stopped_impl.calls
                for i in range(50):
                    assert await echo.echo(i) == i
                assert stopped_impl.calls == before

        run(body())
        assert not [
            u
            for u in map(
                ServiceURL.parse, map(decode, reader.get_children("/dubbo/test.Echo/consumers"))
            )
            if u.group == group
        ]


def test_a_provider_whose_znode_disappears_gets_no_new_calls_and_its_idle_stream_closes(
    zookeeper: ZooKeeper, reader: KazooClient
) -> None:
    """Its node deleted, its process alive: within 2 s it is given no new call; its
    running call finishes on the open stream, which the consumer then closes; when the
    node is back, calls go to it again (on a new stream) within 2 s."""
    group = fresh_group()
    with echo_servers(2, group, zookeeper.address) as servers:
        (victim, victim_impl), (_other, other_impl) = servers

        async def body() -> None:
            async with backchannel.AsyncClient(zookeeper.address, timeout=10) as client:
                echo = client.reference(Echo, group=group, loadbalance="roundrobin")
                await asyncio.gather(*(echo.echo(i) for i in range(4)))  # both streams open
                link = client._links[victim.address]
                session = link.session
                assert session is not None
                slow = client.reference(Echo, group=group, cluster="broadcast")
                running = asyncio.ensure_future(slow.wait(1.0))
                assert await asyncio.to_thread(victim_impl.started.wait, 5)
                (url,) = [
                    u for u in providers_of(reader, "test.Echo", group) if u.port == victim.port
                ]
                path = f"/dubbo/test.Echo/providers/{encode(url.to_string())}"
                await asyncio.to_thread(reader.delete, path)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 2
                before = victim_impl.calls
                while victim_impl.calls != before or any(
                    u.address == victim.address
                    for d in client._directories.values()
                    for u in d.urls
                ):
                    assert loop.time() < deadline, "the unregistered provider is still chosen"
                    before = victim_impl.calls
                    await echo.echo(0)
                for i in range(50):
                    assert await echo.echo(i) == i
                assert victim_impl.calls == before  # none of the 50 went to it
                assert not session.closed.is_set()  # its running call holds the stream
                assert not running.done()
                assert await running == "done"
                await asyncio.wait_for(session.closed.wait(), 2)  # then it is closed
                assert victim.address not in client._links
                await asyncio.to_thread(reader.create, path, b"", ephemeral=True)
                deadline = loop.time() + 2
                while victim_impl.calls == before:
                    assert loop.time() < deadline, "the provider back in ZooKeeper got no call"
                    await echo.echo(0)
                assert client._links[victim.address].session is not session

        run(body())
        assert other_impl.calls >= 50


@pytest.mark.parametrize("weight", ["1" + "0" * 400, "-5"], ids=["huge", "negative"])
def test_a_znode_with_a_weight_out_of_bounds_is_skipped_with_one_warning_naming_it(
    zookeeper: ZooKeeper, reader: KazooClient, caplog: pytest.LogCaptureFixture, weight: str
) -> None:
    """A hand-written provider znode beside a good provider: its weight out of 0..2^31-1
    (the issue's 1 and 400 zeros, or negative). Every one of 500 calls succeeds on the
    good provider, and one warning names the bad znode, however often the folder changes
    and however many subscribe to it."""
    group = fresh_group()
    caplog.set_level(logging.WARNING, logger="backchannel")
    with echo_servers(1, group, zookeeper.address) as ((server, impl),):
        bad = (
            f"backchannel://127.0.0.1:{free_address().rpartition(':')[2]}/test.Echo"
            f"?group={group}&interface=test.Echo&methods=echo&side=provider&weight={weight}"
        )
        folder = "/dubbo/test.Echo/providers"
        bad_path = f"{folder}/{encode(bad)}"
        reader.create(bad_path, ephemeral=True)
        with (
            ZookeeperRegistry(zookeeper.address) as registry,
            backchannel.Client(registry, timeout=5) as client,
        ):
            echo = client.reference(Echo, group=group)
            for i in range(500):
                assert echo.echo(i) == i
            assert impl.calls == 500
            # the folder changes again and again (a provider comes and goes, three times)
            (directory,) = (d for d in client._core._directories.values() if d.key[1] == group)
            assert [u.address for u in directory.urls] == [server.address]  # not the bad one
            for _ in range(3):
                with echo_servers(1, group, zookeeper.address):
                    wait_until(lambda: len(directory.urls) == 2, 5, "the second provider")
                wait_until(lambda: len(directory.urls) == 1, 5, "the second one gone")
            assert echo.echo("after") == "after"
            # a second subscriber to the same folder through the same registry: no warning
            again = registry.subscribe("test.Echo", group=group, version="*")
            assert [u.address for u in again.providers] == [server.address]
    warnings_ = [
        r for r in caplog.records if r.levelno >= logging.WARNING and bad_path in r.getMessage()
    ]
    assert len(warnings_) == 1, [r.getMessage()[:200] for r in caplog.records]
    assert "weight" in warnings_[0].getMessage()


# --- callbacks in a cluster -------------------------------------------------------


@contextlib.contextmanager
def notifier_servers(count: int) -> Iterator[list[tuple[backchannel.Server, NotifierImpl]]]:
    started: list[tuple[backchannel.Server, NotifierImpl]] = []
    try:
        for _ in range(count):
            server, impl = backchannel.Server(), NotifierImpl()
            server.export(Notifier, impl, methods=NOTIFIER_METHODS)
            server.start()
            started.append((server, impl))
        yield started
    finally:
        for server, _impl in started:
            server.stop()


def test_each_provider_gets_its_own_reverse_proxy_and_identity_holds_per_provider() -> None:
    with notifier_servers(2) as servers:
        addresses = ",".join(server.address for server, _ in servers)
        with backchannel.Client(addresses, timeout=5) as client:
            everywhere = client.reference(Notifier, cluster="broadcast")
            recorder = SyncRecorder()
            everywhere.addListener("a", recorder)
            everywhere.addListener("b", recorder)
            assert client.callback_count == 2  # one instance per provider's stream
            (_, first), (_, second) = servers
            assert first.listeners["a"] is first.listeners["b"]  # identity, per provider
            assert second.listeners["a"] is second.listeners["b"]
            assert first.listeners["a"] is not second.listeners["a"]
            assert recorder.received.count("init") == 4
            client.release(recorder)  # on both streams
            assert client.callback_count == 0


def test_a_resubscribed_listener_moves_to_a_live_provider_within_2_s() -> None:
    """Its provider stops: within 2 s of its stream's end the addListener call is made
    again on the other provider, once, in the order the listeners were added."""
    with notifier_servers(2) as servers:
        addresses = ",".join(server.address for server, _ in servers)
        with backchannel.Client(addresses, timeout=5) as client:
            kept = client.reference(
                Notifier,
                loadbalance="roundrobin",
                methods=[Method("addListener", resubscribe=True)],
            )
            recorders = [SyncRecorder() for _ in range(4)]
            for i, recorder in enumerate(recorders):
                kept.addListener(f"k{i}", recorder)
            # roundrobin: alternate listeners on each provider, k0 on whichever came first
            (first, first_impl), (_, second_impl) = sorted(
                servers, key=lambda pair: "k0" not in pair[1].listeners
            )
            assert sorted(first_impl.listeners) == ["k0", "k2"]
            first.stop()
            started = time.monotonic()
            wait_until(lambda: len(second_impl.listeners) == 4, 2, "replayed on the other")
            assert time.monotonic() - started < 2
            keys = [key for key in second_impl.listeners]
            assert keys == ["k1", "k3", "k0", "k2"]  # the moved ones in order, after
            # the provider stores a listener before it greets it: wait for the greetings
            assert recorders[0].wait_for(2) and recorders[2].wait_for(2)
            assert [r.received.count("init") for r in recorders] == [2, 1, 2, 1]  # once each
            second_impl.listeners["k0"].changed("after")
            assert recorders[0].received[-1] == "after"


# --- configuration ----------------------------------------------------------------


def test_config_registry_means_a_registry_and_protocol_the_listen_address(
    zookeeper: ZooKeeper, reader: KazooClient, tmp_path: Path
) -> None:
    group = fresh_group()
    config_path = tmp_path / "cluster.toml"
    config_path.write_text(
        f"""
[application]
name = "configured"

[registry]
address = "{zookeeper.address}"

[protocol]
host = "127.0.0.1"
port = 0

[[service]]
interface = "services:Echo"
ref = "services:EchoImpl"
group = "{group}"

[[reference]]
id = "echo"
interface = "services:Echo"
group = "{group}"
cluster = "failfast"
loadbalance = "roundrobin"
"""
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new form warns of nothing
        config = backchannel.load_config(config_path)
    assert (config.registry, config.address) == (zookeeper.address, "127.0.0.1:0")
    server = config.server()
    server.start()
    try:
        (url,) = providers_of(reader, "test.Echo", group)
        assert url.address == server.address and url.application == "configured"
        with config.client() as client:
            echo = config.reference(client, "echo")
            assert echo.echo("via zookeeper") == "via zookeeper"
    finally:
        server.stop()

    old = tmp_path / "old.toml"
    old.write_text('[registry]\naddress = "127.0.0.1:50051"\n')
    with pytest.warns(DeprecationWarning) as warned:
        config = backchannel.load_config(old)
    assert (config.registry, config.address) == (None, "127.0.0.1:50051")
    (warning,) = warned
    message = str(warning.message)
    assert "[registry] address = '127.0.0.1:50051' as a listen address is deprecated" in message
    assert '[protocol] host = "127.0.0.1" and port = 50051' in message
    both = tmp_path / "both.toml"
    both.write_text('[registry]\naddress = "127.0.0.1:50051"\n[protocol]\nport = 50052\n')
    with pytest.raises(backchannel.ConfigError, match="registry.address: expected a registry"):
        backchannel.load_config(both)
