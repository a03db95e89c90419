"""Declarative configuration: the seed's XML as TOML, equivalent to the code API."""

from __future__ import annotations

import concurrent.futures
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import backchannel
from backchannel.v1 import envelope_pb2 as pb

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class Listener:
    def __init__(self) -> None:
        self.received: list[str] = []
        self.enough = threading.Event()

    def changed(self, msg: str) -> None:
        self.received.append(msg)
        if len(self.received) >= 2:
            self.enough.set()


def exports_of(server: backchannel.Server) -> list[pb.ServiceInfo]:
    return list(server._core._exports.services())


def test_callback_config_equals_the_code_api(tmp_path: Path) -> None:
    config = backchannel.load_config(EXAMPLES / "callback" / "config.toml")
    assert config.application == "callback-provider"
    assert config.address == "127.0.0.1:50051"
    (service,) = config.services
    assert service.interface.__name__ == "CallbackService" and service.callbacks == 1000
    assert [m.name for m in service.methods] == ["addListener", "removeListener"]
    assert service.methods[0].arguments == (backchannel.Argument(index=1, callback=True),)

    from_config = config.server()
    by_code = backchannel.Server()
    by_code.export(
        service.interface,
        service.impl,
        callbacks=1000,
        methods=[
            backchannel.Method("addListener", arguments=[backchannel.Argument(index=1)]),
            backchannel.Method(
                "removeListener", arguments=[backchannel.Argument(index=1, callback=False)]
            ),
        ],
    )
    assert exports_of(from_config) == exports_of(by_code)


def test_a_provider_and_a_reference_from_config_run_the_seed(tmp_path: Path) -> None:
    text = (EXAMPLES / "callback" / "config.toml").read_text()
    text = text.replace('address = "127.0.0.1:50051"', 'address = "127.0.0.1:0"')
    config_path = EXAMPLES / "callback" / f"test-{tmp_path.name}.toml"
    config_path.write_text(text)
    try:
        config = backchannel.load_config(config_path)
    finally:
        config_path.unlink()
    server = config.server()
    server.start()
    try:
        with backchannel.Client(server.address) as client:
            service: Any = config.reference(client, "callbackService")
            listener = Listener()
            service.addListener("foo.bar", listener)
            assert listener.received[0].startswith("Changed: ")  # the seed's first callback
            service.removeListener("foo.bar", listener)
            assert client.callback_count == 0
    finally:
        server.stop()


SERVICE = (
    "[[service]]\ninterface = 'callback_service:CallbackService'\n"
    "ref = 'callback_service:CallbackServiceImpl'\n"
)
BROKEN = [
    ("[application]\nname = 3\n", "application.name: expected a non-empty string, got 3"),
    ("[registry]\naddress = 'nowhere'\n", "registry.address: expected 'host:port'"),
    (
        "[[service]]\nref = 'callback_service:CallbackServiceImpl'\n",
        "service[0].interface: expected",
    ),
    (
        "[[service]]\ninterface = 'callback_service:Nope'\nref = 'x:y'\n",
        "service[0].interface: expected a name that exists ('Nope' is missing)",
    ),
    (
        "[[service]]\ninterface = 'no_such_module:X'\nref = 'x:y'\n",
        "service[0].interface: expected an importable module",
    ),
    (
        "[[service]]\ninterface = 'callback_service:CallbackListener'\nref = 'provider:Nope'\n",
        "service[0].ref: expected a name that exists",
    ),
    (
        SERVICE + "callbacks = -1\n",
        "service[0].callbacks: expected an integer >= 0, got -1",
    ),
    (
        SERVICE + "connections = 2\n",
        "service[0].connections: expected 1",
    ),
    (
        SERVICE
        + "[[service.method]]\nname = 'addListener'\n[[service.method.argument]]\nindex = 9\n",
        "service[0].method: com.callback.CallbackService.addListener: argument index 9",
    ),
    (
        SERVICE + "[[service.method]]\nname = 'nope'\n",
        "service[0].method: com.callback.CallbackService has no method 'nope'",
    ),
    (
        "[[reference]]\nid = 'a'\ninterface = 'callback_service:CallbackService'\n"
        "[[reference.method]]\nname = 'addListener'\nonreturn = 'callback_service:missing'\n",
        "reference[0].method[0].onreturn: expected a name that exists",
    ),
    (
        "[[reference]]\ninterface = 'callback_service:CallbackService'\n",
        "reference[0].id: expected",
    ),
    ("[surprise]\n", "(top level).surprise: expected one of the keys"),
    ("this is = not toml", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BROKEN, ids=[m for _, m in BROKEN])
def test_every_mistake_names_the_file_and_the_key(text: str, message: str) -> None:
    path = EXAMPLES / "callback" / "broken-test-config.toml"
    path.write_text(text)
    try:
        with pytest.raises(backchannel.ConfigError) as info:
            backchannel.load_config(path)
    finally:
        path.unlink()
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_a_missing_file_is_a_config_error() -> None:
    with pytest.raises(backchannel.ConfigError, match="cannot read"):
        backchannel.load_config("/nonexistent/backchannel.toml")


def test_notify_config_equals_the_code_api() -> None:
    config = backchannel.load_config(EXAMPLES / "notify" / "config.toml")
    (reference,) = config.references
    (method,) = reference.methods
    notify = sys.modules["notify_service"].demo_callback
    assert method.async_ is True
    assert method.onreturn == notify.onreturn and method.onthrow == notify.onthrow

    server = config.server()
    server.start()
    try:
        with backchannel.Client(server.address) as client:
            from_config: Any = config.reference(client, "demoService")
            by_code: Any = client.reference(
                reference.interface,
                group="cn",
                version="1.0.0",
                methods=[
                    backchannel.Method(
                        "get", async_=True, onreturn=notify.onreturn, onthrow=notify.onthrow
                    )
                ],
            )
            for proxy, request in ((from_config, 2), (by_code, 3)):
                future = proxy.get(request)  # the seed: returns at once
                assert isinstance(future, concurrent.futures.Future)
                assert notify.wait_for(notify.ret, request, 2)
                assert notify.ret[request].id == request
                proxy.get(11 + request)
                assert notify.wait_for(notify.errors, 11 + request, 2)
    finally:
        server.stop()
