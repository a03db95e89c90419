"""The three ways to declare a callback argument, mismatches, one-way and timeouts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import backchannel
from backchannel import Argument, Method


@backchannel.interface("decl.Listener")
class Listener:
    def changed(self, msg: str) -> Any: ...

    @backchannel.method(one_way=True)
    def fire(self, msg: str) -> None: ...


@backchannel.interface("decl.Service")
class Service:
    def add(self, key: str, listener: Listener) -> Any: ...
    def slow(self, key: str) -> Any: ...
    def fire(self, key: str) -> Any: ...


@backchannel.interface("decl.Service")
class DecoratedService:
    """The same service with the declaration on the interface itself."""

    @backchannel.method(arguments=[Argument(index=1)])
    def add(self, key: str, listener: Listener) -> Any: ...
    def slow(self, key: str) -> Any: ...
    def fire(self, key: str) -> Any: ...


class ServiceImpl:
    def __init__(self) -> None:
        self.listeners: dict[str, Any] = {}

    def add(self, key: str, listener: Any) -> Any:
        self.listeners[key] = listener
        return listener.changed("hello")

    def slow(self, key: str) -> Any:
        try:
            return self.listeners[key].changed("slow")
        except TimeoutError as exc:
            return f"timed out: {exc}"

    def fire(self, key: str) -> Any:
        return self.listeners[key].fire("one-way")


class Recorder:
    def __init__(self) -> None:
        self.fired = threading.Event()
        self.release = threading.Event()

    def changed(self, msg: str) -> str:
        if msg == "slow":
            self.release.wait(5)
        return f"got {msg}"

    def fire(self, msg: str) -> None:
        self.fired.set()


def serve(interface: type, **export: Any) -> Iterator[backchannel.Server]:
    with backchannel.Server(callback_timeout=0.3) as server:
        server.export(interface, ServiceImpl(), **export)
        yield server


@pytest.fixture
def by_index() -> Iterator[backchannel.Server]:
    yield from serve(Service, methods=[Method("add", arguments=[Argument(index=1)])])


def test_declared_by_type_at_export() -> None:
    for server in serve(Service, methods=[Method("add", arguments=[Argument(type=Listener)])]):
        with backchannel.Client(server.address) as client:
            assert client.reference(Service).add("k", Recorder()) == "got hello"


def test_declared_on_the_interface() -> None:
    for server in serve(DecoratedService):
        with backchannel.Client(server.address) as client:
            assert client.reference(DecoratedService).add("k", Recorder()) == "got hello"


def test_a_listener_where_no_callback_is_declared_fails_before_sending() -> None:
    for server in serve(Service):
        with backchannel.Client(server.address) as client:
            with pytest.raises(backchannel.EncodeError) as info:
                client.reference(Service).add("k", Recorder())
            message = str(info.value)
            assert "argument 1 'listener' of decl.Service.add()" in message
            assert "Argument(index=1, callback=True)" in message


def test_consumer_declaration_the_provider_lacks_is_a_clear_error() -> None:
    for server in serve(Service):
        with backchannel.Client(server.address) as client:
            with pytest.raises(backchannel.InvalidArguments, match="provider declares no"):
                client.reference(DecoratedService).add("k", Recorder())


def test_bad_declarations_fail_at_export() -> None:
    server = backchannel.Server()
    with pytest.raises(ValueError, match="index 5 is out of range"):
        server.export(Service, ServiceImpl(), methods=[Method("add", arguments=[Argument(5)])])
    with pytest.raises(ValueError, match="no parameter is annotated"):
        server.export(
            Service, ServiceImpl(), methods=[Method("add", arguments=[Argument(type=int)])]
        )
    with pytest.raises(ValueError, match="exactly one of index= or type="):
        server.export(Service, ServiceImpl(), methods=[Method("add", arguments=[Argument()])])


def test_one_way_callback_does_not_wait(by_index: backchannel.Server) -> None:
    with backchannel.Client(by_index.address) as client:
        service = client.reference(Service)
        listener = Recorder()
        service.add("k", listener)
        assert service.fire("k") is None
        assert listener.fired.wait(2)


def test_slow_listener_times_out_on_the_provider(by_index: backchannel.Server) -> None:
    with backchannel.Client(by_index.address, timeout=5) as client:
        service = client.reference(Service)
        listener = Recorder()
        service.add("k", listener)
        try:
            assert service.slow("k").startswith("timed out: decl.Listener #1.changed")
        finally:
            listener.release.set()
        assert service.add("k", listener) == "got hello"  # the stream goes on
