"""Fixtures: a real provider on 127.0.0.1 with a free port, raw-frame streams, and the
transport every end-to-end test module runs on (each such module runs once per transport)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from kazoo.client import KazooClient
from services import Echo, EchoImpl
from zookeeper import ZooKeeper
from zookeeper import missing as zookeeper_missing

import backchannel
from backchannel.transport.default import ENVIRONMENT, NAMES
from backchannel.v1 import envelope_pb2 as pb

T = TypeVar("T")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that uses the ``transport`` fixture (``pytestmark =
    pytest.mark.usefixtures("transport")``) runs once per transport; with
    ``$BACKCHANNEL_TRANSPORT`` set, on that one only."""
    if "transport" in metafunc.fixturenames:
        chosen = os.environ.get(ENVIRONMENT)
        names = [chosen] if chosen else list(NAMES)
        metafunc.parametrize("transport", names, indirect=True, scope="module")


@pytest.fixture(scope="module")
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """The transport's name; every Client and Server made without ``transport=`` (in this
    process and in the processes it starts) runs on it while the module's tests run.
    A module-scoped fixture that starts a provider takes this one, so that it is made
    again for each transport."""
    name: str = getattr(request, "param", None) or os.environ.get(ENVIRONMENT) or "grpcio"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENVIRONMENT, name)
        yield name


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    """Run an async test body on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def echo_impl() -> EchoImpl:
    return EchoImpl()


@pytest.fixture
def server(echo_impl: EchoImpl) -> Iterator[backchannel.Server]:
    """A sync provider exporting Echo plain and as group 'cn' version '1.0.0'."""
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Echo, echo_impl)
        server.export(Echo, EchoImpl(), group="cn", version="1.0.0")
        yield server


@pytest.fixture
def client(server: backchannel.Server) -> Iterator[backchannel.Client]:
    with backchannel.Client(server.address, errors=[]) as client:
        yield client


class RawStream:
    """A Connect stream driven frame by frame, as grpcurl or a hostile peer would."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = self.channel.stream_stream(
            "/backchannel.v1.Envelope/Connect",
            request_serializer=pb.Frame.SerializeToString,
            response_deserializer=pb.Frame.FromString,
        )()
        self._buffer: list[pb.Frame] = []

    async def send(self, frame: pb.Frame) -> None:
        await self.call.write(frame)

    async def recv(self, timeout: float = 2.0) -> pb.Frame:
        """The next frame, with batches unpacked."""
        while not self._buffer:
            frame = await asyncio.wait_for(self.call.read(), timeout)
            if frame is grpc.aio.EOF:
                raise EOFError("the provider ended the stream")
            kind = frame.WhichOneof("kind")
            self._buffer.extend(frame.batch.frames if kind == "batch" else [frame])
        return self._buffer.pop(0)

    async def hello(self) -> pb.Welcome:
        await self.send(pb.Frame(hello=pb.Hello(protocol_version=1, application="raw")))
        frame = await self.recv()
        assert frame.WhichOneof("kind") == "welcome", frame
        return frame.welcome

    async def call_echo(self, call_id: int, value: int) -> pb.Result:
        """A well-formed call; returns its Result."""
        arg = pb.Value(int_value=value)
        await self.send(
            pb.Frame(call=pb.Call(id=call_id, service="test.Echo", method="echo", args=[arg]))
        )
        frame = await self.recv()
        assert frame.WhichOneof("kind") == "result", frame
        return frame.result

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeper]:
    """A real ZooKeeper server shared by the session's tests (which must not stop it;
    each uses interface names of its own)."""
    yield from _zookeeper(tmp_path_factory.mktemp("zookeeper"))


@pytest.fixture
def own_zookeeper(tmp_path: Path) -> Iterator[ZooKeeper]:
    """A real ZooKeeper server of this test's own, free to stop and start again."""
    yield from _zookeeper(tmp_path / "zookeeper")


@pytest.fixture
def reader(zookeeper: ZooKeeper) -> Iterator[KazooClient]:
    """A plain kazoo client, to look at the znodes as anyone else would."""
    client = KazooClient(hosts=zookeeper.hosts)
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


def _zookeeper(directory: Path) -> Iterator[ZooKeeper]:
    why = zookeeper_missing()
    if why:
        pytest.fail(f"{why} (`make zookeeper` installs it)", pytrace=False)
    server = ZooKeeper(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
