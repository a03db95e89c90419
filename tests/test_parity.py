"""Dubbo parity (issue 20, item 6): the consumer's own ``callbacks=`` limit (on a
reference and on a Method), ``advertise_port`` beside ``advertise_host`` (checked in a
real ZooKeeper, through a real port forward), and ``backchannel serve``'s application
start-up hook (real subprocesses, whose hook pushes to a real listener)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import read_line
from kazoo.client import KazooClient
from notifier import NOTIFIER_METHODS, Consumer, Notifier, NotifierImpl
from services import Echo, EchoImpl
from startup_app import Ticker
from zookeeper import ZooKeeper, providers_of

import backchannel
from backchannel import ConfigError, Method, TooManyCallbacks
from backchannel.transport.portal import LoopThread

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

TESTS = Path(__file__).parent


# --- the consumer's own callbacks= limit ----------------------------------------------


@pytest.fixture(scope="module")
def notifier_server(transport: str) -> Iterator[tuple[backchannel.Server, NotifierImpl]]:
    """A provider of test.Notifier with its default limit (1000): the consumer's is the
    one that bites. Its impl greets each listener it receives, so one sent shows."""
    impl = NotifierImpl()
    server = backchannel.Server()
    server.export(Notifier, impl, methods=NOTIFIER_METHODS)
    server.start()
    yield server, impl
    server.stop()


@pytest.fixture(params=["sync", "async"])
def consumer(
    request: pytest.FixtureRequest, notifier_server: tuple[backchannel.Server, NotifierImpl]
) -> Iterator[Consumer]:
    consumer = Consumer(request.param, notifier_server[0].address)
    yield consumer
    consumer.close()


def test_a_reference_limit_refuses_the_next_listener_before_the_call_is_sent(
    consumer: Consumer, notifier_server: tuple[backchannel.Server, NotifierImpl]
) -> None:
    impl = notifier_server[1]
    notifier = consumer.reference(Notifier, callbacks=2)
    a, b, c = consumer.listener(), consumer.listener(), consumer.listener()
    consumer.do(notifier.addListener(f"{consumer.mode}-pa", a))
    consumer.do(
        notifier.addListener(f"{consumer.mode}-pa2", a)
    )  # the same object: still one instance
    consumer.do(notifier.addListener(f"{consumer.mode}-pb", b))
    added = len(impl.added)
    with pytest.raises(TooManyCallbacks) as raised:
        consumer.do(notifier.addListener(f"{consumer.mode}-pc", c))
    message = str(raised.value)
    assert "this consumer allows test.Notifier at most 2 live listener instances" in message
    assert "2 are live and this call adds 1. The call was not sent" in message
    assert "reference(..., callbacks=N)" in message and "[[reference]] callbacks" in message
    # not sent: the provider never ran addListener, nothing was exported on either side
    assert (
        len(impl.added) == added
        and f"{consumer.mode}-pc" not in impl.listeners
        and c.received == []
    )
    assert consumer.callback_count == 2
    assert consumer.do(notifier.ping(5)) == 5  # the stream goes on
    consumer.do(notifier.removeListener(f"{consumer.mode}-pa", a))  # a ends: a slot frees
    assert consumer.callback_count == 1
    consumer.do(notifier.addListener(f"{consumer.mode}-pc", c))
    assert c.received == ["init"] and consumer.callback_count == 2
    consumer.release(c)
    consumer.release(b)
    assert consumer.callback_count == 0


def test_a_method_limit_counts_the_listeners_passed_to_that_method(consumer: Consumer) -> None:
    notifier = consumer.reference(Notifier, methods=[Method("addListener", callbacks=1)])
    a, b = consumer.listener(), consumer.listener()
    consumer.do(notifier.addListener("ma", a))
    consumer.do(notifier.addListener("ma2", a))  # a again: no new instance
    with pytest.raises(TooManyCallbacks) as raised:
        consumer.do(notifier.addListener("mb", b))
    message = str(raised.value)
    assert "test.Notifier addListener() at most 1 live listener instance per" in message
    assert "1 is live and this call adds 1" in message
    assert "Method('addListener', callbacks=N)" in message
    assert "[[reference.method]] callbacks" in message
    assert b.received == [] and consumer.callback_count == 1
    consumer.release(a)  # released: the method's count drops too
    consumer.do(notifier.addListener("mb", b))
    assert b.received == ["init"] and consumer.callback_count == 1
    consumer.release(b)


def test_without_a_limit_the_consumer_passes_as_many_listeners_as_the_provider_takes(
    consumer: Consumer,
) -> None:
    notifier = consumer.reference(Notifier)  # the default: no limit of the consumer's own
    listeners = [consumer.listener() for _ in range(20)]
    for index, listener in enumerate(listeners):
        consumer.do(notifier.addListener(f"u{index}", listener))
    assert consumer.callback_count == 20
    for listener in listeners:
        consumer.release(listener)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_a_limit_that_is_not_an_int_from_1_is_a_clear_error(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"Method\('addListener'\): callbacks must be an int >= 1"):
        Method("addListener", callbacks=bad)
    with backchannel.Client("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="callbacks must be an int >= 1"):
            client.reference(Notifier, callbacks=bad)


def test_export_refuses_a_method_limit_it_would_ignore() -> None:
    server = backchannel.Server()
    with pytest.raises(ValueError, match=r"callbacks are consumer settings.*callbacks=N\)"):
        server.export(Notifier, NotifierImpl(), methods=[Method("addListener", callbacks=3)])


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


REFERENCE = """
[[reference]]
id = "n"
interface = "notifier:Notifier"
{reference}
[[reference.method]]
name = "addListener"
{method}
"""


def test_config_limits_reach_the_reference(
    tmp_path: Path, notifier_server: tuple[backchannel.Server, NotifierImpl]
) -> None:
    text = REFERENCE.format(reference="callbacks = 3", method="callbacks = 1")
    path = write(TESTS, f"parity-{tmp_path.name}.toml", text)  # beside notifier.py
    try:
        config = backchannel.load_config(path)
    finally:
        path.unlink()
    assert config.references[0].callbacks == 3
    assert config.references[0].methods[0].callbacks == 1
    with backchannel.Client(notifier_server[0].address) as client:
        notifier = config.reference(client, "n")
        first, second = Recorder(), Recorder()
        notifier.addListener("ca", first)
        with pytest.raises(TooManyCallbacks, match=r"Method\('addListener', callbacks=N\)"):
            notifier.addListener("cb", second)
        assert first.received == ["init"] and second.received == []


class Recorder:
    """A plain listener."""

    def __init__(self) -> None:
        self.received: list[str] = []

    def changed(self, msg: str) -> str:
        self.received.append(msg)
        return "ok"


@pytest.mark.parametrize(
    ("reference", "method", "key"),
    [
        ("callbacks = 0", "", "reference[0].callbacks"),
        ("callbacks = true", "", "reference[0].callbacks"),
        ("", "callbacks = -2", "reference[0].method[0].callbacks"),
        ("", "callbacks = '5'", "reference[0].method[0].callbacks"),
    ],
)
def test_a_bad_config_limit_is_a_config_error_naming_the_key(
    tmp_path: Path, reference: str, method: str, key: str
) -> None:
    path = write(
        TESTS, f"parity-{tmp_path.name}.toml", REFERENCE.format(reference=reference, method=method)
    )
    try:
        with pytest.raises(ConfigError, match=re.escape(f"{key}: expected an integer >= 1")):
            backchannel.load_config(path)
    finally:
        path.unlink()


# --- advertise_port -------------------------------------------------------------------


class Forwarder:
    """A TCP port that forwards every connection to another port: a NAT's (or a
    container's) port mapping in miniature. ``connections`` counts those it forwarded."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self.portal = LoopThread("test-forwarder")
        self._server = self.portal.run(self._listen())
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._forward, "127.0.0.1", 0)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            finally:
                sink.close()

        await asyncio.gather(
            pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True
        )

    def close(self) -> None:
        self._server.close()
        self.portal.close()


def test_advertise_port_is_registered_while_the_server_listens_on_its_bound_port(
    zookeeper: ZooKeeper, reader: KazooClient, transport: str
) -> None:
    group = f"advertise-{transport}"
    forwarder = Forwarder(0)  # forwards to the server's bound port, once it has one
    # advertises the forwarder's port (as behind NAT), listens on a port of its own
    server = backchannel.Server(
        "127.0.0.1:0",
        registry=zookeeper.address,
        advertise_host="127.0.0.1",
        advertise_port=forwarder.port,
    )
    server.export(Echo, EchoImpl(), group=group)
    server.start()
    forwarder.target_port = server.port
    try:
        (url,) = providers_of(reader, "test.Echo", group)
        assert url.port == forwarder.port != server.port
        assert url.address == f"127.0.0.1:{forwarder.port}" == server.advertised_address
        assert server.address == f"127.0.0.1:{server.port}"  # where it listens
        with backchannel.Client(server.address) as direct:  # the bound port serves
            assert direct.reference(Echo, group=group).echo("bound") == "bound"
        assert forwarder.connections == 0
        with backchannel.Client(zookeeper.address) as through_registry:
            echo = through_registry.reference(Echo, group=group)
            assert echo.echo("mapped") == "mapped"  # reached by the registered port
        assert forwarder.connections == 1
    finally:
        server.stop()
        forwarder.close()
    assert providers_of(reader, "test.Echo", group) == []


@pytest.mark.parametrize(
    ("port", "message"),
    [
        (0, "advertise_port must be a port from 1 to 65535, got 0"),
        (65536, "advertise_port must be a port from 1 to 65535, got 65536"),
        ("8080", "advertise_port must be an int (the port written into the registry), got '8080'"),
        (True, "advertise_port must be an int"),
        (80.0, "advertise_port must be an int"),
    ],
)
def test_a_bad_advertise_port_is_a_clear_error(port: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        backchannel.Server(registry="static://127.0.0.1:1", advertise_port=port)
    with pytest.raises(ValueError, match=re.escape(message)):
        backchannel.AsyncServer(advertise_port=port)


def test_config_advertise_host_and_port_reach_the_server(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "advertise.toml",
        '[protocol]\nport = 0\nadvertise_host = "203.0.113.9"\nadvertise_port = 30051\n',
    )
    config = backchannel.load_config(path)
    assert (config.protocol.advertise_host, config.protocol.advertise_port) == (
        "203.0.113.9",
        30051,
    )
    assert config.server().advertised_address == "203.0.113.9:30051"
    for bad in ("0", "65536", '"30051"', "true"):
        write(tmp_path, "bad.toml", f"[protocol]\nadvertise_port = {bad}\n")
        with pytest.raises(ConfigError, match=r"protocol.advertise_port: expected"):
            backchannel.load_config(tmp_path / "bad.toml")


# --- backchannel serve's start-up hook ------------------------------------------------

SERVE_CONFIG = """
[application]
name = "ticker"
{startup}

[protocol]
port = 0

[[service]]
interface = "startup_app:Ticker"
ref = "startup_app:ticker"
"""


def serve(tmp_path: Path, startup: str = "", *options: str) -> subprocess.Popen[str]:
    """`backchannel serve` of a config exporting startup_app's ticker (tests/ on its path)."""
    config = write(tmp_path, "serve.toml", SERVE_CONFIG.format(startup=startup))
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "backchannel", "serve", str(config), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )


class Ticks:
    """A listener that records ticks, and says when it has some."""

    def __init__(self, wanted: int) -> None:
        self.received: list[str] = []
        self.wanted = wanted
        self.enough = threading.Event()

    def tick(self, msg: str) -> None:
        self.received.append(msg)
        if len(self.received) >= self.wanted:
            self.enough.set()


@pytest.mark.parametrize(
    ("startup", "options", "server_kind"),
    [
        ('startup = "startup_app:start"', (), "Server"),
        ("", ("--startup", "startup_app:astart"), "AsyncServer"),
        ('startup = "startup_app:start"', ("--startup", "startup_app:astart"), "AsyncServer"),
    ],
    ids=["def-in-toml", "async-def-on-the-command-line", "the-option-wins"],
)
def test_serve_runs_the_startup_hook_which_pushes_to_a_listener(
    tmp_path: Path, startup: str, options: tuple[str, ...], server_kind: str
) -> None:
    process = serve(tmp_path, startup, *options)
    try:
        line = read_line(process, 20, "backchannel serve")
        assert line.startswith("listening on "), process.communicate(timeout=10)
        address = line.split()[-1]
        port = address.rpartition(":")[2]
        with backchannel.Client(address) as client:
            ticks = Ticks(3)
            client.reference(Ticker).subscribe(ticks)
            assert ticks.enough.wait(10), ticks.received
        first = ticks.received[0]
        assert first.startswith("tick ") and first.endswith(f"by {server_kind} on port {port}")
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=15)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("hook", ["startup_app:broken", "startup_app:abroken"])
def test_a_startup_hook_that_raises_stops_the_serve_with_a_clear_error(
    tmp_path: Path, hook: str
) -> None:
    process = serve(tmp_path, f'startup = "{hook}"')
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert stdout == ""  # it never said it was listening
    assert stderr == (
        f"backchannel serve: the startup hook {hook} failed, so the server stopped: "
        "RuntimeError: the price database is unreachable\n"
    )


def test_a_def_hook_that_returns_a_coroutine_is_a_clear_error(tmp_path: Path) -> None:
    process = serve(tmp_path, 'startup = "startup_app:returns_a_coroutine"')
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert "returned an awaitable, so the server stopped: declare it `async def`" in stderr
    assert "never awaited" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("startup", "options", "message"),
    [
        (
            'startup = "startup_app"',
            (),
            "application.startup: expected an import path 'module:attr' (or "
            "'module:attr.method'), got 'startup_app'",
        ),
        (
            'startup = "startup_app:nope"',
            (),
            "application.startup: expected a name that exists ('nope' is missing), "
            "got 'startup_app:nope'",
        ),
        (
            'startup = "startup_app:two_arguments"',
            (),
            "application.startup: expected a function taking one argument, the running "
            "server (missing a required argument: 'other'), got 'startup_app:two_arguments'",
        ),
        (
            'startup = "startup_app:Ticker"',
            (),
            "application.startup: expected a function taking one argument, the running "
            "server, got 'startup_app:Ticker'",
        ),
        (
            'startup = "startup_app:start"',
            ("--startup", "no_such_module_here:start"),
            "backchannel serve: ConfigError: --startup: expected an importable module "
            "(No module named 'no_such_module_here'), got 'no_such_module_here:start'",
        ),
    ],
)
def test_a_bad_startup_hook_is_a_config_error_naming_it(
    tmp_path: Path, startup: str, options: tuple[str, ...], message: str
) -> None:
    process = serve(tmp_path, startup, *options)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 1 and stdout == ""
    assert message in stderr and stderr.count("\n") == 1, stderr
