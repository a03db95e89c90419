"""A consumer and a provider Connection joined by a fake link, h11's tests/helpers.py style.

No sockets, no asyncio: frames are moved by hand from one side's outbox into the other
side's ``receive``, so a test says exactly which frames cross and when.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire.protocol import Connection, Event, Role

SERVICES = (
    pb.ServiceInfo(
        name="test.Echo",
        methods=[pb.MethodInfo(name="echo", parameters=["value"], required=1)],
    ),
)


def make_call(method: str = "echo", one_way: bool = False) -> pb.Call:
    """A forward call of test.Echo, without an id (send_call assigns it)."""
    return pb.Call(service="test.Echo", method=method, one_way=one_way)


def kinds(frames: list[pb.Frame]) -> list[str | None]:
    """The kind of each frame, e.g. ``["hello"]``."""
    return [frame.WhichOneof("kind") for frame in frames]


def feed(connection: Connection[str], *frames: pb.Frame) -> list[Event[str]]:
    """Give ``connection`` frames as if they arrived from its peer; all events, in order."""
    events: list[Event[str]] = []
    for frame in frames:
        events += connection.receive(frame)
    return events


class Link:
    """A consumer and a provider back to back; tokens are plain strings."""

    def __init__(self, max_calls_in_flight: int = 0) -> None:
        self.consumer: Connection[str] = Connection(Role.CONSUMER, application="shop")
        self.provider: Connection[str] = Connection(
            Role.PROVIDER,
            application="warehouse",
            services=SERVICES,
            max_calls_in_flight=max_calls_in_flight,
        )

    def to_provider(self) -> list[Event[str]]:
        """Deliver everything the consumer queued; the provider's events."""
        return feed(self.provider, *self.consumer.take_outbox())

    def to_consumer(self) -> list[Event[str]]:
        """Deliver everything the provider queued; the consumer's events."""
        return feed(self.consumer, *self.provider.take_outbox())

    def open(self) -> None:
        """Run the handshake; both sides end up open."""
        self.consumer.start()
        self.to_provider()
        self.to_consumer()

    def call(self, token: str = "token", one_way: bool = False) -> int:
        """The consumer sends a call and the provider receives it; the call's id."""
        call_id = self.consumer.send_call(make_call(one_way=one_way), token)
        self.to_provider()
        return call_id


class CheckedThread(threading.Thread):
    """A thread a test starts whose exception is not lost: ``check()`` joins it (bounded)
    and raises, in the test, what the thread raised, or fails if it is still running.

    A plain ``threading.Thread`` prints its exception and dies; the test went on and
    passed. Daemon by default: a thread stuck past its bound must not hang pytest's exit.
    """

    def __init__(
        self,
        target: Callable[..., object],
        *args: object,
        name: str | None = None,
        daemon: bool = True,
    ) -> None:
        super().__init__(target=target, args=args, name=name, daemon=daemon)
        self.exception: BaseException | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as exc:  # kept for check(): the test re-raises it
            self.exception = exc

    def check(self, timeout: float = 30) -> None:
        """Join within ``timeout`` seconds; raise the thread's exception, if any, or
        fail if the thread still runs."""
        self.join(timeout)
        if self.exception is not None:
            raise AssertionError(f"thread {self.name} raised") from self.exception
        assert not self.is_alive(), f"thread {self.name} still running after {timeout} s"


@contextlib.contextmanager
def checked_threads(timeout: float = 30) -> Iterator[Callable[..., CheckedThread]]:
    """Start test threads with the ``start(target, *args)`` this yields; on the way out,
    wait for all of them (``timeout`` seconds in all) and fail the test with the first
    exception one raised, or if one is still running. If the body itself failed, its
    error is raised, with the threads' errors added to it as notes."""
    started: list[CheckedThread] = []

    def start(
        target: Callable[..., object], *args: object, name: str | None = None
    ) -> CheckedThread:
        thread = CheckedThread(target, *args, name=name)
        thread.start()
        started.append(thread)
        return thread

    try:
        yield start
    except BaseException as exc:
        deadline = time.monotonic() + timeout
        for thread in started:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.exception is not None:
                exc.add_note(f"and thread {thread.name} raised {thread.exception!r}")
        raise
    deadline = time.monotonic() + timeout
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    for thread in started:
        thread.check(0)


def read_line(process: subprocess.Popen[str], timeout: float = 10.0, what: str = "") -> str:
    """The next line a child process prints, stripped; "" if it exited first.

    Waits at most ``timeout`` seconds: a child that hangs is killed and the test fails
    with a clear message instead of hanging on ``readline()``.
    """
    stdout = process.stdout
    assert stdout is not None, "start the child with stdout=subprocess.PIPE"
    lines: list[str] = []
    reader = CheckedThread(lambda: lines.append(stdout.readline()))
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        process.kill()
        process.wait(5)
        reader.join(5)
        raise AssertionError(
            f"{what or 'the child process'} printed no line within {timeout} s; killed it"
        )
    reader.check(0)  # a read that raised fails here, not as an IndexError below
    return lines[0].strip()


PROVIDER_SCRIPT = Path(__file__).with_name("restartable_provider.py")


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


class Provider:
    """A provider process that can be killed and started again on the same port."""

    def __init__(self) -> None:
        self.address = ""
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start it: the first time on a free port (another if something else took that
        one between the probe and the bind), then always on the same one."""
        for _attempt in range(5):
            address = self.address or free_address()
            process = subprocess.Popen(
                [sys.executable, str(PROVIDER_SCRIPT), address],
                stdout=subprocess.PIPE,
                text=True,
                cwd=PROVIDER_SCRIPT.parent,
            )
            if read_line(process, 15, f"the provider on {address}") == "ready":
                self.address, self.process = address, process
                return
            process.wait(5)  # it exited without listening: the port was taken
            if self.address:
                break
        raise AssertionError(f"no provider could listen on {address}")

    def kill(self) -> None:
        """SIGKILL, reaped."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)


def wait_until(condition: Callable[[], object], timeout: float, what: str = "") -> None:
    """Wait, at most ``timeout`` seconds, for state that changes on another thread and
    has no event to wait on (a provider's tables, say); fail naming ``what`` otherwise.
    The one bounded poll of the suite: everything with an event waits on the event."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


async def raw_stream(address: str) -> tuple[grpc.aio.Channel, Any]:
    """A Connect stream that writes raw bytes (crafted frames) and reads Frames, after a
    real handshake."""
    channel = grpc.aio.insecure_channel(address)
    call = channel.stream_stream(
        "/backchannel.v1.Envelope/Connect",
        request_serializer=lambda m: m,
        response_deserializer=pb.Frame.FromString,
    )()
    await call.write(pb.Frame(hello=pb.Hello(protocol_version=1)).SerializeToString())
    assert (await call.read()).WhichOneof("kind") == "welcome"
    return channel, call


async def frames_of(
    requests: AsyncIterator[pb.Frame],
) -> AsyncIterator[tuple[str | None, pb.Frame]]:
    """Each frame a fake provider's Connect handler receives, as ``(kind, frame)``, the
    frames of a Batch one by one."""
    async for frame in requests:
        inner = list(frame.batch.frames) if frame.WhichOneof("kind") == "batch" else [frame]
        for one in inner:
            yield one.WhichOneof("kind"), one


#: calls in the statistical checks of the random strategy's spread over three providers:
#: ±5 points of a third is then 4.1 standard deviations (outside about once in 8,000 runs)
RANDOM_CALLS = 1_500


class LogSeen(logging.Handler):
    """Sets ``seen`` when the ``backchannel`` logger writes a message holding ``text``
    (from any thread): a test waits on it instead of polling the captured records."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()

    def __enter__(self) -> LogSeen:
        logging.getLogger("backchannel").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("backchannel").removeHandler(self)


@contextlib.contextmanager
def consumer_process(
    address: str,
    count: int,
    mode: str = "sync",
    service: str = "test.Notifier",
    prefix: str = "k",
) -> Iterator[subprocess.Popen[str]]:
    """A consumer in a child process (``consumer_process.py``) that has added ``count``
    listeners (keys ``prefix0``, ``prefix1``...) to ``service`` at ``address``, for a test
    to kill or freeze; killed on the way out."""
    script = Path(__file__).with_name("consumer_process.py")
    command = [sys.executable, str(script), address, str(count), mode, service, prefix]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=script.parent)
    try:
        assert read_line(process, 15, "the consumer process") == "ready"
        yield process
    finally:
        process.kill()
        process.wait(5)


class Records(logging.Handler):
    """The ``backchannel`` logger's records at WARNING or above (holding ``words``, when
    given), while installed."""

    def __init__(self, words: str = "") -> None:
        super().__init__(logging.WARNING)
        self.words = words
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.words in message:
            self.messages.append(message)

    def __enter__(self) -> Records:
        logging.getLogger("backchannel").addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        logging.getLogger("backchannel").removeHandler(self)


def transport_name(transport: str | None = None) -> str:
    """The transport a Client or Server made without ``transport=`` runs on."""
    from backchannel.transport.default import DEFAULT_NAME, ENVIRONMENT

    return transport or os.environ.get(ENVIRONMENT) or DEFAULT_NAME


def _ssl_context(purpose: ssl.Purpose, pems: list[bytes]) -> ssl.SSLContext:
    """A TLS context trusting the CA in ``pems[0]`` (when given), with the key and
    certificate of ``pems[1:]`` (when given) as its own chain."""
    context = ssl.create_default_context(purpose)
    ca, *chain = pems
    if ca:
        context.load_verify_locations(cadata=ca.decode())
    if chain:
        key, cert = chain
        with tempfile.TemporaryDirectory() as directory:  # ssl loads a chain from files only
            key_file, cert_file = Path(directory, "key.pem"), Path(directory, "cert.pem")
            key_file.write_bytes(key)
            cert_file.write_bytes(cert)
            context.load_cert_chain(cert_file, key_file)
    return context


def server_credentials(
    key: bytes, cert: bytes, *, client_ca: bytes | None = None, transport: str | None = None
) -> Any:
    """A provider's TLS credentials for ``transport`` (the default one when None): its key
    and certificate (PEM), and with ``client_ca`` mutual TLS (clients need a certificate
    that CA issued)."""
    if transport_name(transport) == "grpclib":
        context = _ssl_context(ssl.Purpose.CLIENT_AUTH, [client_ca or b"", key, cert])
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
        return context
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(
    ca: bytes,
    key: bytes | None = None,
    cert: bytes | None = None,
    *,
    transport: str | None = None,
) -> Any:
    """A consumer's TLS credentials for ``transport`` (the default one when None):
    trusting ``ca``, with a client certificate for mutual TLS when ``key`` and ``cert``
    are given."""
    if transport_name(transport) == "grpclib":
        chain = [key, cert] if key is not None and cert is not None else []
        return _ssl_context(ssl.Purpose.SERVER_AUTH, [ca, *chain])
    return grpc.ssl_channel_credentials(ca, key, cert)
