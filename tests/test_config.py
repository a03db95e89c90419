"""Declarative configuration: the seed's XML as TOML, equivalent to the code API."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from services import Echo, EchoImpl

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
    text = text.replace("port = 50051", "port = 0")
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
    (
        "[registry]\naddress = '127.0.0.1:notaport'\n",
        "registry.address: expected 'host:port' with a port from 0 to 65535, got",
    ),
    ("[registry]\naddress = '127.0.0.1:70000'\n", "registry.address: expected 'host:port'"),
    ("[registry]\naddress = ':50051'\n", "registry.address: expected 'host:port'"),
    (
        "[[service]]\ninterface = 'callback_service:CallbackService'\n"
        "ref = 'callback_service:CallbackListener'\n",
        "service[0].ref: expected an implementation of com.callback.CallbackService "
        "(CallbackListener lacks addListener(), removeListener())",
    ),
    (
        SERVICE + SERVICE,
        "service[1]: expected an interface, group and version no other service has "
        "(service[0] has the same)",
    ),
    (
        SERVICE + "[[service.method]]\nname = 'addListener'\ntimeout = 5\n",
        "service[0].method[0].timeout: expected no timeout on a provider's method",
    ),
    (
        SERVICE + "[[service.method]]\nname = 'addListener'\n"
        "[[service.method]]\nname = 'addListener'\n",
        "service[0].method: com.callback.CallbackService.addListener: "
        "more than one Method('addListener')",
    ),
    (
        SERVICE + "[[service.method]]\nname = 'addListener'\n[[service.method.argument]]\n"
        "type = 'callback_service:CallbackServiceImpl'\n",
        "service[0].method: com.callback.CallbackService.addListener: no parameter is annotated",
    ),
    (
        SERVICE + "[[service.method]]\nname = 'addListener'\n[[service.method.argument]]\n"
        "type = 'callback_service:time'\n",
        "service[0].method[0].argument[0].type: expected a class, got 'callback_service:time'",
    ),
    (
        "[[reference]]\nid = 'a'\ninterface = 'callback_service:CallbackService'\ntimeout = 0\n",
        "reference[0].timeout: expected a number > 0, got 0",
    ),
    (
        "[[reference]]\nid = 'a'\ninterface = 'callback_service:CallbackService'\n"
        "[[reference.method]]\nname = 'addListener'\ntimeout = 0\n",
        "reference[0].method[0].timeout: expected a number > 0, got 0",
    ),
    (
        "[[reference]]\nid = 'a'\ninterface = 'callback_service:CallbackService'\n"
        "[[reference.method]]\nname = 'addListener'\ntimeout = -1.5\n",
        "reference[0].method[0].timeout: expected a number > 0, got -1.5",
    ),
    (
        "[[reference]]\nid = 'a'\ninterface = 'callback_service:CallbackService'\n"
        "[[reference.method]]\nname = 'addListener'\n"
        "[[reference.method]]\nname = 'addListener'\nasync = true\n",
        "reference[0].method: com.callback.CallbackService.addListener: "
        "more than one Method('addListener')",
    ),
    (
        "[[reference]]\nid = 'a'\ninterface = 'callback_service:CallbackService'\n"
        "[[reference.method]]\nname = 'addListener'\nasync = 'yes'\n",
        "reference[0].method[0].async: expected true or false, got 'yes'",
    ),
    (
        "[[reference]]\nid = 'a'\ninterface = 'callback_service:CallbackService'\n"
        "[[reference.method]]\nname = 'addListener'\n"
        "onreturn = 'callback_service:CallbackServiceImpl.get_changed'\n",
        "reference[0].method: com.callback.CallbackService.addListener: onreturn",
    ),
    (
        "[protocol]\nauthenticate_health = 'yes'\n",
        "protocol.authenticate_health: expected true or false, got 'yes'",
    ),
    ("[protocol]\nreflection = 0\n", "protocol.reflection: expected true or false, got 0"),
    (
        "[protocol]\nauthenticator = 'callback_service:time'\n",
        "protocol.authenticator: expected a callable taking the metadata (a dict), "
        "got 'callback_service:time'",
    ),
    (
        "[protocol]\nauthenticator = 'no_such_module:check'\n",
        "protocol.authenticator: expected an importable module",
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
    assert config.address == "127.0.0.1:50053"
    config = dataclasses.replace(config, address="127.0.0.1:0")  # a free port for the test
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


def write_config(folder: Path, text: str, **modules: str) -> Path:
    """A config file in ``folder``, with Python modules beside it (name -> source)."""
    for name, source in modules.items():
        (folder / f"{name}.py").write_text(source)
    path = folder / "backchannel.toml"
    path.write_text(text)
    return path


BROKEN_MODULES = [
    ("syntax", "def broken(:\n", "SyntaxError: invalid syntax"),
    ("name", "undefined_name\n", "NameError: name 'undefined_name' is not defined"),
    ("runtime", "raise RuntimeError('no database')\n", "RuntimeError: no database"),
]


@pytest.mark.parametrize(
    ("kind", "source", "message"), BROKEN_MODULES, ids=["syntax", "name", "raise"]
)
def test_a_module_that_fails_to_import_is_a_config_error(
    tmp_path: Path, kind: str, source: str, message: str
) -> None:
    module = f"broken_{kind}_{tmp_path.name}"
    text = f"[[service]]\ninterface = 'callback_service:CallbackService'\nref = '{module}:Impl'\n"
    path = write_config(tmp_path, text, **{module: source})
    sys.path.insert(0, str(EXAMPLES / "callback"))
    try:
        with pytest.raises(backchannel.ConfigError) as info:
            backchannel.load_config(path)
    finally:
        sys.path.remove(str(EXAMPLES / "callback"))
    assert str(path) in str(info.value)
    assert f"service[0].ref: expected a module that imports cleanly ({message}" in str(info.value)
    assert module not in sys.modules


def test_a_ref_class_whose_init_raises_is_a_config_error(tmp_path: Path) -> None:
    module = f"failing_impl_{tmp_path.name}"
    source = (
        "from services import EchoImpl\n\n"
        "class Impl(EchoImpl):\n"
        "    def __init__(self):\n"
        "        raise KeyError('DATABASE_URL')\n"
    )
    path = write_config(
        tmp_path,
        f"[[service]]\ninterface = 'services:Echo'\nref = '{module}:Impl'\n",
        **{module: source},
    )
    with pytest.raises(backchannel.ConfigError) as info:
        backchannel.load_config(path)
    assert str(info.value) == (
        f"{path}: service[0].ref: expected a class that can be made (KeyError: 'DATABASE_URL')"
    )


def test_an_interface_that_is_no_declared_interface_names_the_public_decorator(
    tmp_path: Path,
) -> None:
    text = "[[service]]\ninterface = 'services:EchoImpl'\nref = 'services:EchoImpl'\n"
    path = write_config(tmp_path, text)
    with pytest.raises(backchannel.ConfigError) as info:
        backchannel.load_config(path)
    assert str(info.value) == (
        f"{path}: service[0].interface: expected a class declared with @backchannel.interface"
        ", got 'services:EchoImpl'"
    )


def test_a_hook_of_the_wrong_signature_is_a_config_error(tmp_path: Path) -> None:
    module = f"bad_hooks_{tmp_path.name}"
    source = "def onreturn(result, a, b, c, d):\n    pass\n"
    text = (
        "[[reference]]\nid = 'echo'\ninterface = 'services:Echo'\n"
        f"[[reference.method]]\nname = 'add'\nonreturn = '{module}:onreturn'\n"
    )
    path = write_config(tmp_path, text, **{module: source})
    with pytest.raises(backchannel.ConfigError) as info:
        backchannel.load_config(path)
    assert str(info.value).startswith(f"{path}: reference[0].method: test.Echo.add: onreturn")


def test_an_argument_declared_by_type_equals_the_code_api(tmp_path: Path) -> None:
    text = (
        SERVICE + "[[service.method]]\nname = 'addListener'\n[[service.method.argument]]\n"
        "type = 'callback_service:CallbackListener'\n"
        "[[service.method]]\nname = 'removeListener'\n[[service.method.argument]]\n"
        "type = 'callback_service:CallbackListener'\ncallback = false\n"
    )
    path = EXAMPLES / "callback" / f"by-type-{tmp_path.name}.toml"
    path.write_text(text)
    try:
        config = backchannel.load_config(path)
    finally:
        path.unlink()
    (service,) = config.services
    listener = sys.modules["callback_service"].CallbackListener
    assert service.methods[0].arguments == (backchannel.Argument(type=listener),)
    by_code = backchannel.Server()
    by_code.export(
        service.interface,
        service.impl,
        methods=[
            backchannel.Method("addListener", arguments=[backchannel.Argument(index=1)]),
            backchannel.Method(
                "removeListener", arguments=[backchannel.Argument(index=1, callback=False)]
            ),
        ],
    )
    assert exports_of(config.server()) == exports_of(by_code)


def test_reference_timeouts_oninvoke_and_one_way_from_config(tmp_path: Path) -> None:
    module = f"echo_hooks_{tmp_path.name}"
    source = "seen = []\n\ndef oninvoke(*args):\n    seen.append(args)\n"
    text = (
        "[[service]]\ninterface = 'services:Echo'\nref = 'services:EchoImpl'\n"
        "[[reference]]\nid = 'echo'\ninterface = 'services:Echo'\ntimeout = 0.2\n"
        f"[[reference.method]]\nname = 'add'\noninvoke = '{module}:oninvoke'\n"
        "[[reference.method]]\nname = 'wait'\ntimeout = 10\n"
        "[[reference.method]]\nname = 'echo'\none_way = false\n"
    )
    config = backchannel.load_config(write_config(tmp_path, text, **{module: source}))
    hooks = sys.modules[module]
    (reference,) = config.references
    assert reference.timeout == 0.2
    assert reference.methods == (
        backchannel.Method("add", oninvoke=hooks.oninvoke),
        backchannel.Method("wait", timeout=10),
        backchannel.Method("echo", one_way=False),
    )
    server = config.server()
    server.start()
    try:
        with backchannel.Client(server.address) as client:
            echo: Any = config.reference(client, "echo")
            assert echo.add(2, 3) == 5
            assert hooks.seen == [(2, 3)]  # oninvoke ran with the call's arguments
            assert echo.echo("x") == "x"  # one_way = false: the result comes back
            assert echo.wait(0.4) == "done"  # the method's timeout (10 s) wins over 0.2 s
            with pytest.raises(backchannel.DeadlineExceeded):
                echo.tracked(30)  # the reference's timeout (0.2 s)
    finally:
        server.stop()


def test_the_code_api_rejects_duplicate_methods_and_non_bool_flags() -> None:
    with backchannel.Client("127.0.0.1:1") as client:  # never connects: references are local
        with pytest.raises(ValueError, match=r"test.Echo.add: more than one Method\('add'\)"):
            client.reference(Echo, methods=[backchannel.Method("add"), backchannel.Method("add")])
    with pytest.raises(ValueError, match=r"more than one Method\('echo'\)"):
        backchannel.Server().export(
            Echo, EchoImpl(), methods=[backchannel.Method("echo"), backchannel.Method("echo")]
        )
    with pytest.raises(TypeError, match=r"Method\('get'\): async_ must be True or False, got 1"):
        backchannel.Method("get", async_=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="resubscribe must be True or False"):
        backchannel.Method("get", resubscribe="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="one_way must be True, False or None"):
        backchannel.Method("get", one_way=0)  # type: ignore[arg-type]


def test_protocol_settings_reach_the_server(tmp_path: Path) -> None:
    (tmp_path / "protocol_auth.py").write_text(
        "import backchannel\nauthenticate = backchannel.bearer_tokens({'t': 'ops'})\n"
    )
    path = tmp_path / "protocol.toml"
    path.write_text(
        "[protocol]\nport = 0\nauthenticator = 'protocol_auth:authenticate'\n"
        "reflection = false\nauthenticate_health = true\nauthenticate_reflection = false\n"
    )
    config = backchannel.load_config(path)
    protocol = config.protocol
    assert callable(protocol.authenticator)
    assert (protocol.reflection, protocol.health) == (False, True)
    assert (protocol.authenticate_reflection, protocol.authenticate_health) == (False, True)
    core = config.server()._core
    assert core._authenticator is protocol.authenticator and core._reflection is False
    assert core._health is not None and core._health.guard is not None
    assert core._reflection_guard is None
    defaults = backchannel.load_config(EXAMPLES / "callback" / "config.toml").protocol
    assert defaults == type(protocol)()  # the Server's own defaults
    default_core = backchannel.load_config(EXAMPLES / "callback" / "config.toml").server()._core
    assert default_core._authenticator is None and default_core._health is not None
