"""Clusters end to end: providers registering in a real ZooKeeper (tests/zookeeper.py),
consumers choosing among them, failing over, and callbacks following their consumer."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import pytest
from conftest import run
from helpers import wait_until
from kazoo.client import KazooClient
from services import Echo, EchoImpl
from zookeeper import ZooKeeper

import backchannel
from backchannel.interface import interface_spec
from backchannel.registry import ServiceURL, decode, encode, reachable_host

_names = itertools.count()


def fresh_group() -> str:
    """A group no other test on the shared ZooKeeper uses (the interface is test.Echo)."""
    return f"g{next(_names)}"


@pytest.fixture
def reader(zookeeper: ZooKeeper) -> Iterator[KazooClient]:
    """A plain kazoo client, to look at the znodes as anyone else would."""
    client = KazooClient(hosts=zookeeper.hosts)
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


def providers_of(reader: KazooClient, interface: str, group: str) -> list[ServiceURL]:
    path = f"/dubbo/{encode(interface)}/providers"
    if not reader.exists(path):
        return []
    urls = [ServiceURL.parse(decode(child)) for child in reader.get_children(path)]
    return [url for url in urls if url.group == group]


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
