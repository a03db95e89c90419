"""The three ways to declare a callback argument, mismatches, one-way and timeouts;
each with a sync Client and an AsyncClient."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from notifier import Consumer

import backchannel
from backchannel import Argument, Method
from backchannel.rpc.interface import interface_spec

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


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


@backchannel.interface("decl.Service")
class OptionalService:
    """The listener parameter annotated ``Listener | None``."""

    def add(self, key: str, listener: Listener | None) -> Any: ...
    def slow(self, key: str) -> Any: ...
    def fire(self, key: str) -> Any: ...


@backchannel.interface("decl.Service")
class UnresolvableService:
    """An annotation naming a type that does not exist."""

    def add(self, key: str, listener: NoSuchListener) -> Any: ...  # type: ignore[name-defined]  # noqa: F821
    def slow(self, key: str) -> Any: ...
    def fire(self, key: str) -> Any: ...


class Recorder:
    """A plain listener: 'slow' waits for ``release``; records whether ``fire`` ran while
    a 'slow' call was still running."""

    def __init__(self) -> None:
        self.fired = threading.Event()
        self.release = threading.Event()
        self.slow_running = False
        self.overlapped: list[bool] = []

    def changed(self, msg: str) -> str:
        if msg == "slow":
            self.slow_running = True
            try:
                self.release.wait(5)
            finally:
                self.slow_running = False
        return f"got {msg}"

    def fire(self, msg: str) -> None:
        self.overlapped.append(self.slow_running)
        self.fired.set()


def serve(interface: type, **export: Any) -> Iterator[backchannel.Server]:
    with backchannel.Server(callback_timeout=0.3) as server:
        server.export(interface, ServiceImpl(), **export)
        yield server


@pytest.fixture
def by_index() -> Iterator[backchannel.Server]:
    yield from serve(Service, methods=[Method("add", arguments=[Argument(index=1)])])


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """The consumer: a sync Client or an AsyncClient."""
    return str(request.param)


def connect(mode: str, server: backchannel.Server, **options: Any) -> Consumer:
    return Consumer(mode, server.address, **options)


def test_declared_by_type_at_export(mode: str) -> None:
    for server in serve(Service, methods=[Method("add", arguments=[Argument(type=Listener)])]):
        consumer = connect(mode, server)
        try:
            assert consumer.do(consumer.reference(Service).add("k", Recorder())) == "got hello"
        finally:
            consumer.close()


def test_declared_by_type_matches_an_optional_annotation(mode: str) -> None:
    arguments = [Argument(type=Listener)]
    for server in serve(OptionalService, methods=[Method("add", arguments=arguments)]):
        consumer = connect(mode, server)
        try:
            service = consumer.reference(OptionalService)
            assert consumer.do(service.add("k", Recorder())) == "got hello"
        finally:
            consumer.close()


def test_an_unresolvable_annotation_says_resolution_failed() -> None:
    server = backchannel.Server()
    with pytest.raises(ValueError, match="resolving the annotations of decl.Service.add.. failed"):
        server.export(
            UnresolvableService,
            ServiceImpl(),
            methods=[Method("add", arguments=[Argument(type=Listener)])],
        )


def test_declared_on_the_interface(mode: str) -> None:
    for server in serve(DecoratedService):
        consumer = connect(mode, server)
        try:
            service = consumer.reference(DecoratedService)
            assert consumer.do(service.add("k", Recorder())) == "got hello"
        finally:
            consumer.close()


def test_a_listener_where_no_callback_is_declared_fails_before_sending(mode: str) -> None:
    for server in serve(Service):
        consumer = connect(mode, server)
        try:
            with pytest.raises(backchannel.EncodeError) as info:
                consumer.do(consumer.reference(Service).add("k", Recorder()))
            message = str(info.value)
            assert "argument 1 'listener' of decl.Service.add()" in message
            assert "Argument(index=1, callback=True)" in message
            for value in (datetime.datetime.now(), {1, 2}):  # no listeners: no such hint
                with pytest.raises(backchannel.EncodeError) as info:
                    consumer.do(consumer.reference(Service).add("k", value))
                assert "cannot send an object of type" in str(info.value)
                assert "declare the argument a callback" not in str(info.value)
        finally:
            consumer.close()


def test_consumer_declaration_the_provider_lacks_is_a_clear_error(mode: str) -> None:
    for server in serve(Service):
        consumer = connect(mode, server)
        try:
            with pytest.raises(backchannel.InvalidArguments, match="provider declares no"):
                consumer.do(consumer.reference(DecoratedService).add("k", Recorder()))
        finally:
            consumer.close()


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


def test_one_way_callback_does_not_wait(by_index: backchannel.Server, mode: str) -> None:
    consumer = connect(mode, by_index)
    try:
        service = consumer.reference(Service)
        listener = Recorder()
        consumer.do(service.add("k", listener))
        assert consumer.do(service.fire("k")) is None
        assert listener.fired.wait(2)
    finally:
        consumer.close()


def test_slow_listener_times_out_on_the_provider(by_index: backchannel.Server, mode: str) -> None:
    consumer = connect(mode, by_index, timeout=5)
    try:
        service = consumer.reference(Service)
        listener = Recorder()
        consumer.do(service.add("k", listener))
        try:
            assert consumer.do(service.slow("k")).startswith("timed out: decl.Listener #1.changed")
        finally:
            listener.release.set()
        assert consumer.do(service.add("k", listener)) == "got hello"  # the stream goes on
    finally:
        consumer.close()


def test_a_timed_out_plain_listener_still_holds_the_order(
    by_index: backchannel.Server, mode: str
) -> None:
    consumer = connect(mode, by_index, timeout=5)
    try:
        service = consumer.reference(Service)
        listener = Recorder()
        consumer.do(service.add("k", listener))
        try:
            # the provider gives up after 0.3 s; the listener's thread runs on
            assert consumer.do(service.slow("k")).startswith("timed out")
            assert listener.slow_running
            consumer.do(service.fire("k"))  # the next call to the instance: it must wait
        finally:
            listener.release.set()
        assert listener.fired.wait(2)
        assert listener.overlapped == [False]  # ran after the slow call, not beside it
    finally:
        consumer.close()


def test_a_type_declared_on_the_interface_matches_an_optional_annotation() -> None:
    @backchannel.interface("decl.OptionalService")
    class OptionalService:
        @backchannel.method(arguments=[Argument(type=Listener)])
        def add(self, key: str, listener: Listener | None) -> Any: ...

    assert interface_spec(OptionalService).methods["add"].callbacks == frozenset({1})


def test_a_type_declared_on_the_interface_that_does_not_resolve_says_so() -> None:
    with pytest.raises(ValueError, match="resolving the annotations"):

        @backchannel.interface("decl.Unresolved")
        class Unresolved:
            @backchannel.method(arguments=[Argument(type=Listener)])
            def add(self, key: str, listener: NoSuchName) -> Any: ...  # type: ignore[name-defined]  # noqa: F821

        interface_spec(Unresolved)
