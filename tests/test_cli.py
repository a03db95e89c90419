"""The `backchannel` command line (`python -m backchannel`) against the example providers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import read_line
from notifier import NOTIFIER_METHODS, Listener, Notifier, NotifierImpl
from services import Echo, EchoImpl
from test_grpcurl import EXAMPLES, start_example
from zookeeper import ZooKeeper

import backchannel
from backchannel import Argument, Method
from backchannel.rpc import exports
from backchannel.rpc.interface import MethodSpec
from backchannel.v1 import envelope_pb2 as pb

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


@pytest.fixture(scope="module")
def forward(transport: str) -> Iterator[str]:
    process, address = start_example("forward")
    yield address
    process.kill()
    process.wait(5)


@pytest.fixture(scope="module")
def callback(transport: str) -> Iterator[str]:
    process, address = start_example("callback", "--interval", "0.1")
    yield address
    process.kill()
    process.wait(5)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backchannel", *args], capture_output=True, text=True, timeout=30
    )


def test_describe_prints_a_table(callback: str) -> None:
    result = cli("describe", callback)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[1].split()[:4] == ["SERVICE", "GROUP", "VERSION", "METHOD"]
    add = next(line.split() for line in lines if "addListener" in line)
    expected = "com.callback.CallbackService - - addListener key, listener 1 - -"
    assert add == expected.split()
    # below the table: the declared types, the listener's interface and its methods
    signature = "com.callback.CallbackService.addListener(key: str, listener: CallbackListener)"
    at = lines.index(signature)
    assert lines[at + 1 : at + 3] == [
        "  callback argument 1 (listener): com.callback.CallbackListener",
        "    changed(msg: str)",
    ]


def test_call_prints_the_result_as_json(forward: str) -> None:
    common = ["com.example.Calculator", "--group", "demo", "--version", "1.0.0"]
    result = cli("call", forward, common[0], "add", "2", "3", *common[1:])
    assert (result.returncode, result.stdout.strip()) == (0, "5")
    greeting = cli("call", forward, common[0], "greet", '"Dubbo"', '"Hi"', *common[1:])
    assert json.loads(greeting.stdout) == "Hi, Dubbo!"


DEMO = ["--group", "demo", "--version", "1.0.0"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["call", "{forward}", "com.example.Nope", "add", "1"], "no service 'com.example.Nope'"),
        (["call", "{forward}", "com.example.Calculator", "add", "x"], "argument 0 is not JSON"),
        (["call", "127.0.0.1:1", "a.B", "c"], "UNAVAILABLE"),
        (["describe", "127.0.0.1:1"], "UNAVAILABLE"),
        (["call", "{forward}", "com.example.Calculator", "add", "1", "--timeout", "x"], "invalid"),
        (["listen", "127.0.0.1:1", "a.B", "c", "--callback-arg", "0"], "UNAVAILABLE"),
        (
            ["listen", "{forward}", "com.example.Nope", "add", "--callback-arg", "0"],
            "no service 'com.example.Nope'",
        ),
        (
            ["listen", "{forward}", "com.example.Calculator", "add", "1", "--callback-arg", "5"],
            "--callback-arg 5 must be between 0 and 1",
        ),
        (
            ["listen", "{forward}", "com.example.Calculator", "add", "--callback-arg", "x"],
            "--callback-arg: invalid int value: 'x'",
        ),
        (["listen", "{forward}", "com.example.Calculator", "add"], "--callback-arg"),
        (
            [
                "listen",
                "{forward}",
                "com.example.Calculator",
                "add",
                "1",
                "--callback-arg",
                "1",
                *DEMO,
            ],
            "argument 1 of com.example.Calculator.add() is not a callback argument "
            "(its callback arguments: none)",
        ),
        (
            ["listen", "{forward}", "com.example.Calculator", "nope", "--callback-arg", "0", *DEMO],
            "has no method 'nope'",
        ),
        (
            ["listen", "{forward}", "com.example.Calculator", "add", "--callback-arg", "0"],
            "com.example.Calculator is not exported here; it is exported as: "
            "group 'demo' version '1.0.0'",
        ),
    ],
)
def test_mistakes_are_one_line_and_a_non_zero_exit(
    forward: str, args: list[str], message: str
) -> None:
    result = cli(*(arg.format(forward=forward) for arg in args))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_listen_prints_callbacks_until_interrupted(callback: str) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backchannel",
            "listen",
            callback,
            "com.callback.CallbackService",
            "addListener",
            '"foo.bar"',
            "--callback-arg",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    seen = [json.loads(process.stdout.readline()) for _ in range(3)]
    kinds = [next(iter(line)) for line in seen]
    assert kinds.count("callback") >= 2 and "result" in kinds
    first = next(line for line in seen if "callback" in line)
    assert first["callback"] == "changed" and first["args"][0].startswith("Changed: ")
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == 130
    assert "Traceback" not in process.stderr.read()


def serve_callback_config(tmp_path: Path, extra: str = "") -> tuple[subprocess.Popen[str], str]:
    """`backchannel serve` of the callback example's config on a free port (plus
    ``extra`` TOML); the process and its first line of output."""
    text = (EXAMPLES / "callback" / "config.toml").read_text()
    config = EXAMPLES / "callback" / f"serve-{tmp_path.name}.toml"
    config.write_text(text.replace("port = 50051", "port = 0") + extra)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "backchannel", "serve", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
    finally:
        config.unlink()
    return process, line


def test_serve_starts_the_providers_of_a_config_file(tmp_path: Path) -> None:
    process, line = serve_callback_config(tmp_path)
    assert line.startswith("listening on "), process.stderr.read()
    described = cli("describe", line.split()[-1])
    assert "addListener" in described.stdout
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == 130
    assert "Traceback" not in process.stderr.read()


def test_serve_reports_a_broken_config_in_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[[service]]\ninterface = 'nowhere:X'\nref = 'a:b'\n")
    result = cli("serve", str(broken))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "service[0].interface" in result.stderr


@pytest.mark.parametrize("command", ["call", "listen"])
@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_a_timeout_that_is_not_positive_is_a_usage_error(
    forward: str, command: str, timeout: str
) -> None:
    args = [command, forward, "com.example.Calculator", "add", "1", "2", f"--timeout={timeout}"]
    result = cli(*args, *(["--callback-arg", "0"] if command == "listen" else []))
    assert result.returncode == 2
    assert f"--timeout: must be > 0 seconds, got '{timeout}'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_call_of_a_callback_method_says_to_use_listen(callback: str) -> None:
    result = cli("call", callback, "com.callback.CallbackService", "addListener", '"k"', "null")
    assert result.returncode == 1
    assert "takes callback arguments" in result.stderr and "backchannel listen" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@backchannel.interface("test.Typed")
class Typed:
    def say(self, text: str) -> str: ...
    def scale(self, values: list[float], factor: float = 1.0) -> list[float]: ...
    def flag(self, on: bool | None) -> str: ...
    def tally(self, counts: dict[str, int]) -> int: ...
    def pair(self, both: tuple[int, str]) -> str: ...
    def blob(self, data: bytes) -> int: ...
    def loose(self, value, other: Unknown.Type) -> str: ...  # type: ignore[no-untyped-def]  # noqa: F821
    def watch(self, topic: str, listener: Listener) -> None: ...


class TypedImpl:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def __getattr__(self, name: str) -> object:
        if name.startswith("_"):
            raise AttributeError(name)

        def method(*args: object) -> str:
            self.calls.append((name, args))
            return f"{name}{args!r}"

        return method


@pytest.fixture
def typed(transport: str) -> Iterator[tuple[str, TypedImpl]]:
    impl = TypedImpl()
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(
            Typed, impl, methods=[Method("watch", arguments=[Argument(index=1, callback=True)])]
        )
        yield server.address, impl


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["say", "42"],
            "argument 0 (text) of test.Typed.say() is declared str, got 42 (int); "
            """quote a string in JSON: '"42"'""",
        ),
        (
            ["scale", '[1, "x"]'],
            'argument 0 (values) of test.Typed.scale() is declared list[float], got [1, "x"] '
            "(list)",
        ),
        (
            ["scale", "[1]", '"2"'],
            'argument 1 (factor) of test.Typed.scale() is declared float, got "2" (str)',
        ),
        (["flag", "1"], "argument 0 (on) of test.Typed.flag() is declared bool | None, got 1"),
        (
            ["tally", '{"a": "1"}'],
            "argument 0 (counts) of test.Typed.tally() is declared dict[str, int]",
        ),
        (["pair", "[1, 2]"], "argument 0 (both) of test.Typed.pair() is declared tuple[int, str]"),
        (
            ["blob", '"aGk="'],
            'argument 0 (data) of test.Typed.blob() is declared bytes, got "aGk=" (str); '
            "JSON carries no bytes",
        ),
    ],
)
def test_call_refuses_arguments_that_do_not_fit_the_declared_types(
    typed: tuple[str, TypedImpl], args: list[str], message: str
) -> None:
    address, impl = typed
    result = cli("call", address, "test.Typed", *args)
    assert result.returncode == 1
    assert result.stderr.startswith(f"backchannel call: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert impl.calls == []  # refused before sending


@pytest.mark.parametrize(
    ("args", "sent"),
    [
        (["say", '"42"'], ("42",)),  # a quoted number is a string
        (["scale", "[1, 2.5]", "2"], ([1, 2.5], 2)),  # an int is a float
        (["flag", "null"], (None,)),
        (["flag", "true"], (True,)),
        (["tally", '{"a": 1}'], ({"a": 1},)),
        (["pair", '[1, "a"]'], ([1, "a"],)),
        (["loose", "42", "[{}]"], (42, [{}])),  # no type, or one not read: not checked
    ],
)
def test_call_sends_arguments_that_fit_the_declared_types(
    typed: tuple[str, TypedImpl], args: list[str], sent: tuple[object, ...]
) -> None:
    address, impl = typed
    result = cli("call", address, "test.Typed", *args)
    assert result.returncode == 0, result.stderr
    assert impl.calls == [(args[0], sent)]


def test_listen_checks_the_arguments_beside_the_listener(typed: tuple[str, TypedImpl]) -> None:
    address, impl = typed
    result = cli("listen", address, "test.Typed", "watch", "7", "--callback-arg", "1")
    assert result.returncode == 1
    assert "argument 0 (topic) of test.Typed.watch() is declared str, got 7 (int)" in result.stderr
    assert impl.calls == []


def test_a_describe_stating_more_types_than_parameters_is_no_traceback(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a buggy or hostile provider: say(text) stated with two types; the extra is not
    # checked (nothing indexes past the parameters) and the provider refuses the call
    stated = exports.method_info

    def more_types(spec: MethodSpec) -> pb.MethodInfo:
        info = stated(spec)
        if spec.name == "say":
            info.parameter_types.append("str")
        return info

    monkeypatch.setattr(exports, "method_info", more_types)
    impl = TypedImpl()
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Typed, impl)
        result = cli("call", server.address, "test.Typed", "say", '"a"', "7")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "is declared" not in result.stderr
    assert "test.Typed.say() takes 1 argument (text), got 2" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert impl.calls == []


def test_describe_prints_typed_signatures_and_callback_interfaces(
    typed: tuple[str, TypedImpl],
) -> None:
    lines = cli("describe", typed[0]).stdout.splitlines()
    assert "test.Typed.scale(values: list[float], factor: float = ...)" in lines
    assert "test.Typed.loose(value, other: Unknown.Type)" in lines
    at = lines.index("test.Typed.watch(topic: str, listener: Listener)")
    assert lines[at + 1 : at + 3] == [
        "  callback argument 1 (listener): test.Listener",
        "    changed(msg: str)",
    ]


def test_listen_exits_when_the_provider_dies() -> None:
    provider, address = start_example("callback", "--interval", "0.1")
    try:
        listen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backchannel",
                "listen",
                address,
                "com.callback.CallbackService",
                "addListener",
                '"foo.bar"',
                "--callback-arg",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert listen.stdout is not None
        seen = [json.loads(listen.stdout.readline()) for _ in range(3)]
        assert {"result": None} in seen  # addListener returned: now it only listens
    finally:
        provider.send_signal(signal.SIGKILL)
        provider.wait(5)
    killed = time.monotonic()
    try:
        _, stderr = listen.communicate(timeout=10)
    finally:
        listen.kill()
    assert time.monotonic() - killed < 2.0
    assert listen.returncode == 1
    assert stderr.startswith(f"backchannel listen: the stream to {address} ended"), stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_serve_of_a_config_without_services_is_an_error(tmp_path: Path) -> None:
    text = (EXAMPLES / "callback" / "config.toml").read_text()
    config = EXAMPLES / "callback" / f"no-services-{tmp_path.name}.toml"
    config.write_text(text.split("[[service]]")[0])  # [application] and [protocol] only
    try:
        result = cli("serve", str(config))
    finally:
        config.unlink()
    assert result.returncode == 1
    message = f"backchannel serve: {config}: no [[service]] to serve (nothing would listen)"
    assert result.stderr == message + "\n"


@pytest.mark.parametrize("command", [[], ["serve"], ["describe"], ["call"], ["listen"]])
def test_help_is_plain_text(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: backchannel")
    for markup in ("``", ":class:", ":meth:", ":func:", "::"):
        assert markup not in result.stdout, result.stdout
    if not command:
        assert "backchannel listen ADDRESS SERVICE METHOD" in result.stdout  # the table


@backchannel.interface("test.Approver")
class Approver:
    def approve(self, what: str) -> bool: ...


@backchannel.interface("test.Vault")
class Vault:
    def open(self, approver: Approver) -> str: ...


class VaultImpl:
    def open(self, approver: Approver) -> str:
        answer = approver.approve("the door")
        return "opened" if answer is True else f"refused: {answer!r}"


@pytest.fixture
def vault() -> Iterator[str]:
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(
            Vault,
            VaultImpl(),
            methods=[Method("open", arguments=[Argument(index=0, callback=True)])],
        )
        yield server.address


OPEN = ["test.Vault", "open", "--callback-arg", "0"]


@pytest.mark.parametrize(
    ("answer", "result"), [([], "refused: None"), (["--answer", "true"], "opened")]
)
def test_listen_answers_each_callback_with_null_or_the_answer_given(
    vault: str, answer: list[str], result: str
) -> None:
    listen = subprocess.Popen(
        [sys.executable, "-m", "backchannel", "listen", vault, *OPEN, *answer],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first, second = read_line(listen), read_line(listen)
    finally:
        listen.send_signal(signal.SIGINT)
        listen.wait(10)
    assert json.loads(first) == {"callback": "approve", "args": ["the door"]}
    assert json.loads(second) == {"result": result}


def test_listen_refuses_an_answer_that_is_not_json(vault: str) -> None:
    result = cli("listen", vault, "test.Vault", "open", "--callback-arg", "0", "--answer", "yes")
    assert result.returncode == 2
    assert "--answer: not JSON: 'yes'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- through a registry -----------------------------------------------------------


def test_describe_call_and_listen_through_a_registry(zookeeper: ZooKeeper) -> None:
    """With a registry address, describe lists the providers it finds for an interface,
    call and listen pick one of them (naming it on stderr); none is a one-line error."""
    group = f"cli{time.monotonic_ns()}"
    servers = []
    try:
        for _ in range(2):
            server = backchannel.Server(registry=zookeeper.address)
            server.export(Echo, EchoImpl(), group=group, weight=200)
            server.start()
            servers.append(server)
        addresses = sorted(server.address for server in servers)
        described = cli("describe", zookeeper.address, "test.Echo", "--group", group)
        assert described.returncode == 0, described.stderr
        lines = described.stdout.splitlines()
        assert lines[0] == f"{zookeeper.address}: 2 provider(s) of test.Echo group {group!r}"
        assert lines[1].split() == [
            "ADDRESS",
            "GROUP",
            "VERSION",
            "WEIGHT",
            "APPLICATION",
            "METHODS",
        ]
        assert [line.split()[:4] for line in lines[2:]] == [
            [address, group, "-", "200"] for address in addresses
        ]
        called = cli("call", zookeeper.address, "test.Echo", "echo", '"hi"', "--group", group)
        assert (called.returncode, called.stdout.strip()) == (0, '"hi"'), called.stderr
        picked = called.stderr.split()
        assert picked[0] == "provider" and picked[1] in addresses and picked[2:] == ["(of", "2)"]
        listed = cli("call", ",".join(addresses), "test.Echo", "echo", "7", "--group", group)
        assert (listed.returncode, listed.stdout.strip()) == (0, "7"), listed.stderr
        nobody = cli("call", zookeeper.address, "test.Echo", "echo", "1", "--group", "nobody")
        assert nobody.returncode == 1
        assert nobody.stderr.strip() == (
            f"backchannel call: {zookeeper.address} lists no provider of test.Echo group 'nobody'"
        )
    finally:
        for server in servers:
            server.stop()


def test_listen_through_a_registry(zookeeper: ZooKeeper) -> None:
    group = f"cli{time.monotonic_ns()}"
    server = backchannel.Server(registry=zookeeper.address)
    server.export(Notifier, NotifierImpl(), group=group, methods=NOTIFIER_METHODS)
    server.start()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backchannel",
            "listen",
            zookeeper.address,
            "test.Notifier",
            "addListener",
            '"k"',
            "--callback-arg",
            "1",
            "--group",
            group,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(read_line(process, 20, "backchannel listen"))
        assert first["callback"] and first["args"][0] == "init", first
    finally:
        process.kill()
        process.wait(5)
        server.stop()
    assert process.stderr is not None
    assert process.stderr.readline().startswith(f"provider {server.address} (of 1)")


def test_serve_of_a_config_with_a_zookeeper_registry_registers(
    tmp_path: Path, zookeeper: ZooKeeper
) -> None:
    registry = f'\n[registry]\naddress = "{zookeeper.address}"\n'
    process, line = serve_callback_config(tmp_path, registry)
    try:
        assert line.startswith("listening on "), process.stderr.read()
        address = line.split()[-1]
        described = cli("describe", zookeeper.address, "com.callback.CallbackService")
        assert described.returncode == 0, described.stderr
        assert address in described.stdout.split()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 130
    gone = cli("describe", zookeeper.address, "com.callback.CallbackService")
    assert address not in gone.stdout.split()  # withdrawn when it stopped


GUARDED_SERVICE = """
import backchannel

authenticate = backchannel.bearer_tokens({"s3cret": "ops"})


@backchannel.interface("test.Guarded")
class Guarded:
    def ping(self) -> str: ...


class GuardedImpl:
    def ping(self) -> str:
        return "pong"
"""


def test_serve_puts_health_and_reflection_behind_the_configured_authenticator(
    tmp_path: Path,
) -> None:
    from test_grpcurl import BEARER, grpcurl

    (tmp_path / "guarded_service.py").write_text(GUARDED_SERVICE)
    config = tmp_path / "guarded.toml"
    config.write_text(
        "[protocol]\nport = 0\nauthenticator = 'guarded_service:authenticate'\n"
        "authenticate_health = true\n\n"
        "[[service]]\ninterface = 'guarded_service:Guarded'\nref = 'guarded_service:GuardedImpl'\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "backchannel", "serve", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_line(process, what="serve's listening line")
        assert line.startswith("listening on "), line
        address = line.split()[-1]
        listed = grpcurl(address, "list")
        checked = grpcurl(address, "grpc.health.v1.Health/Check")
        with_token = grpcurl("-H", BEARER, address, "grpc.health.v1.Health/Check")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
    for refused in (listed, checked):
        assert refused.returncode != 0
        assert "Unauthenticated" in refused.stderr and "no bearer token" in refused.stderr
    assert json.loads(with_token.stdout) == {"status": "SERVING"}
