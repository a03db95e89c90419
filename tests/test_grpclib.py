"""What only the grpclib transport has to get right itself (grpclib leaves it to its
user): messages over the limit refused from their 5-byte length prefix before their body
is buffered, TLS contexts as credentials (ALPN h2, the wrong kind refused with a clear
error, the handshake bounded in time), and grpclib's own health and reflection modules
never imported (their descriptors clash with grpcio's in the default pool)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from conftest import run
from h2.settings import SettingCodes
from helpers import channel_credentials, server_credentials
from services import Echo, EchoImpl
from test_security import Pems, pems  # noqa: F401  (the fixture)

import backchannel
from backchannel.v1 import envelope_pb2 as pb

CONNECT = "/backchannel.v1.Envelope/Connect"
INVOKE = "/backchannel.v1.Envelope/Invoke"


async def send_prefix_only(address: str, path: str, announced: int) -> dict[str, str]:
    """Open ``path`` by hand over HTTP/2, send a length prefix announcing ``announced``
    bytes and 16 of them, never the rest; the response's headers and trailers (or
    ``reset`` when the stream was reset without them)."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    connection.initiate_connection()
    stream_id = connection.get_next_available_stream_id()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", address),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
    ]
    connection.send_headers(stream_id, headers)
    connection.send_data(stream_id, struct.pack(">BI", 0, announced) + b"x" * 16)
    writer.write(connection.data_to_send())
    got: dict[str, str] = {}
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the server closed the connection without ending the stream"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    got.update(dict(event.headers))  # type: ignore[arg-type]
                if isinstance(event, h2.events.StreamReset) and "grpc-status" not in got:
                    got["reset"] = str(event.error_code)
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return got
            writer.write(connection.data_to_send())
    finally:
        writer.close()


@pytest.fixture
def provider() -> Any:
    with backchannel.Server("127.0.0.1:0", transport="grpclib") as server:
        server.export(Echo, EchoImpl())
        yield server


@pytest.mark.parametrize("path", [CONNECT, INVOKE])
def test_a_message_over_the_limit_is_refused_from_its_prefix_before_its_body(
    provider: backchannel.Server, path: str
) -> None:
    """100 MiB announced, 16 bytes sent: the provider refuses at once, so it never waits
    for (nor buffers) the body."""
    began = time.monotonic()
    got = run(send_prefix_only(provider.address, path, 100 * 2**20), timeout=10)
    assert got.get("grpc-status") == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), got
    assert "larger than max" in got.get("grpc-message", ""), got
    assert time.monotonic() - began < 3
    # and the provider goes on serving
    with backchannel.Client(provider.address, transport="grpclib") as client:
        assert client.reference(Echo).echo("still") == "still"


def test_a_message_under_the_wire_limit_reaches_the_session_which_names_the_limit(
    provider: backchannel.Server,
) -> None:
    """Between max_message_size and the wire limit (64 KiB more, as on grpcio) the
    message is read, and the session refuses it with its own clear error."""
    with backchannel.Client(provider.address, transport="grpclib") as client:
        with pytest.raises(backchannel.BackchannelError) as refused:
            client.reference(Echo).echo("x" * (4 * 2**20 + 10))
        assert "max_message_size" in str(refused.value) or "too large" in str(refused.value)
        assert client.reference(Echo).echo("after") == "after"


def test_a_consumer_refuses_a_providers_message_over_its_limit_from_the_prefix() -> None:
    """A provider (grpcio's, by hand) that sends a message past the consumer's limit:
    the grpclib consumer ends the stream with RESOURCE_EXHAUSTED, as grpcio would."""

    async def body() -> None:
        async def connect(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            async for _hello in requests:
                yield b"\x00" * (70 * 1024)  # past 1 KiB + 64 KiB

        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "backchannel.v1.Envelope",
            {"Connect": grpc.stream_stream_rpc_method_handler(connect)},
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            limits = backchannel.Limits(max_message_size=1024)
            async with backchannel.AsyncClient(
                f"127.0.0.1:{port}", transport="grpclib", limits=limits, connect_timeout=3
            ) as client:
                with pytest.raises(backchannel.TransportError) as failed:
                    await client.reference(Echo).echo("x")
            assert "RESOURCE_EXHAUSTED" in str(failed.value), failed.value
            assert "larger than max" in str(failed.value), failed.value
        finally:
            await server.stop(0)

    run(body())


def test_grpc_credentials_on_grpclib_and_a_tls_context_on_grpcio_are_type_errors(
    pems: Pems,  # noqa: F811
) -> None:
    grpc_server = grpc.ssl_server_credentials([(pems.server_key, pems.server_cert)])
    with pytest.raises(TypeError, match=r"ssl\.SSLContext.*transport='grpcio'"):
        backchannel.Server("127.0.0.1:0", credentials=grpc_server, transport="grpclib")
    grpc_channel = grpc.ssl_channel_credentials(pems.ca)
    with pytest.raises(TypeError, match=r"ssl\.SSLContext.*transport='grpcio'"):
        backchannel.Client("127.0.0.1:1", credentials=grpc_channel, transport="grpclib")
    context = ssl.create_default_context()
    with pytest.raises(TypeError, match=r"grpc\..*transport='grpclib'"):
        backchannel.Client("127.0.0.1:1", credentials=context, transport="grpcio")
    with pytest.raises(TypeError, match=r"grpc\..*transport='grpclib'"):
        backchannel.Server("127.0.0.1:0", credentials=context, transport="grpcio")


def test_a_tls_provider_negotiates_alpn_h2_and_serves_mutual_tls(
    pems: Pems,  # noqa: F811
) -> None:
    tls = server_credentials(
        pems.server_key, pems.server_cert, client_ca=pems.ca, transport="grpclib"
    )
    with backchannel.Server("127.0.0.1:0", credentials=tls, transport="grpclib") as server:
        server.export(Echo, EchoImpl())
        context = channel_credentials(
            pems.ca, pems.client_key, pems.client_cert, transport="grpclib"
        )
        context.set_alpn_protocols(["h2", "http/1.1"])  # as gRPC clients offer it
        host, _, port = server.address.rpartition(":")
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as wrapped,
        ):
            assert wrapped.selected_alpn_protocol() == "h2"
        with backchannel.Client(server.address, credentials=context, transport="grpclib") as c:
            assert c.reference(Echo).echo("over tls") == "over tls"


@pytest.mark.parametrize("tls", [True, False])
def test_a_connection_that_never_finishes_its_handshake_is_closed_in_time(
    pems: Pems,  # noqa: F811
    tls: bool,
) -> None:
    """A TLS ClientHello that never ends, or an HTTP/2 preface that never comes: closed
    after Limits.handshake_timeout, not held for ever."""
    credentials = (
        server_credentials(pems.server_key, pems.server_cert, transport="grpclib") if tls else None
    )
    limits = backchannel.Limits(handshake_timeout=0.5)
    with backchannel.Server(
        "127.0.0.1:0", credentials=credentials, limits=limits, transport="grpclib"
    ) as server:
        host, _, port = server.address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            if tls:
                sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # a TLS record header, then silence
            began = time.monotonic()
            while sock.recv(65536):  # the server's SETTINGS (plaintext), then the end
                pass
            assert time.monotonic() - began < 3


def test_grpclib_and_grpcio_run_in_one_process_with_health_and_reflection() -> None:
    """Both transports' servers in one process: grpclib's own health/reflection modules
    (whose descriptors clash with grpcio's) are never imported, grpc never by grpclib's
    side."""
    code = (
        "import sys, backchannel\n"
        "with backchannel.Server('127.0.0.1:0', transport='grpclib'):\n"
        "    assert 'grpc' not in sys.modules, 'grpclib imported grpc'\n"
        "    with backchannel.Server('127.0.0.1:0', transport='grpcio'):\n"
        "        pass\n"
        "assert not [m for m in sys.modules if m.startswith(('grpclib.health', "
        "'grpclib.reflection'))]\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_a_sent_describe_request_reaches_grpclibs_mapped_handlers(
    provider: backchannel.Server,
) -> None:
    async def body() -> pb.DescribeResponse:
        from backchannel.transport.default import resolve

        response: pb.DescribeResponse = await resolve("grpclib").unary(
            provider.address, "Describe", pb.DescribeRequest(), pb.DescribeResponse, 5
        )
        return response

    described = run(body())
    assert [service.name for service in described.services] == ["test.Echo"]


class _Acks:
    """What an inbox acknowledges to HTTP/2 flow control (grpclib's Connection.ack)."""

    def __init__(self) -> None:
        self.acked = 0

    def ack(self, stream_id: int, size: int) -> None:
        self.acked += size


def _inbox(limit: int = 1000) -> Any:
    """An inbox fed by hand (a pure unit: no connection behind it)."""
    from backchannel.transport.grpclib.inbox import Inbox

    inbox = Inbox.__new__(Inbox)
    inbox._setup(bytes, limit)
    inbox.id = 1
    inbox.connection = _Acks()
    return inbox


def _framed(*messages: bytes) -> bytes:
    return b"".join(struct.pack(">BI", 0, len(m)) + m for m in messages)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_the_inbox_frames_messages_split_anywhere_and_acknowledges_every_byte(chunk: int) -> None:
    messages = [b"", b"a", b"hello", b"x" * 300, b"tail"]
    wire = _framed(*messages)

    async def body() -> None:
        inbox = _inbox()
        for start in range(0, len(wire), chunk):
            part = wire[start : start + chunk]
            inbox.add(part, len(part) + 2)  # 2 bytes of padding each
        got = [await inbox.read() for _ in messages]
        assert got == messages
        assert inbox.connection.acked == len(wire) + 2 * len(range(0, len(wire), chunk))

    run(body())


def test_the_inbox_acknowledges_a_queued_message_only_once_it_is_read() -> None:
    """Flow control holds a peer whose messages are not read: their bytes are owed."""

    async def body() -> None:
        inbox = _inbox()
        wire = _framed(b"one", b"two")
        inbox.add(wire, len(wire))
        assert inbox.connection.acked == 0 and inbox.unacked_size() == len(wire)
        assert await inbox.read() == b"one"
        assert inbox.connection.acked == 8
        assert await inbox.read() == b"two"
        assert inbox.connection.acked == len(wire) and inbox.unacked_size() == 0

    run(body())


def test_the_inbox_refuses_from_the_prefix_and_drops_what_follows() -> None:
    from grpclib.exceptions import GRPCError

    async def body() -> None:
        inbox = _inbox(limit=100)
        refused: list[tuple[Any, str]] = []
        inbox.refused = lambda status, message: refused.append((status, message))
        inbox.add(struct.pack(">BI", 0, 101) + b"xx", 7)
        assert [(status.name, message) for status, message in refused] == [
            ("RESOURCE_EXHAUSTED", "Received message larger than max (101 vs. 100)")
        ]
        inbox.add(b"y" * 99, 99)  # the rest of it: acknowledged, not kept
        assert inbox.connection.acked == 106 and not inbox._pending
        with pytest.raises(GRPCError) as failed:
            await inbox.read()
        assert failed.value.status.name == "RESOURCE_EXHAUSTED"

    run(body())


async def black_holing_proxy(upstream: int, hole: asyncio.Event) -> asyncio.Server:
    """A TCP proxy to 127.0.0.1:``upstream`` that stops forwarding (either way) once
    ``hole`` is set, its sockets left open and unread: a peer gone without FIN or RST."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not hole.is_set():
            data = await reader.read(65536)
            if not data or hole.is_set():
                break
            writer.write(data)
        await asyncio.Event().wait()  # the black hole: nothing read, nothing closed

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # a small receive buffer: the consumer's bytes pile up in its own write buffer
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_keepalive_ends_the_streams_of_a_black_holed_provider_with_bytes_queued() -> None:
    """3 MB calls queued for a provider that vanished: keepalive expiry drops the
    connection (grpclib's close would wait for the unsendable bytes for ever), and the
    calls fail with StreamBroken in about keepalive time + timeout, not their 20 s."""

    async def body() -> None:
        server = backchannel.AsyncServer("127.0.0.1:0", transport="grpclib")
        server.export(Echo, EchoImpl())
        await server.start()
        hole = asyncio.Event()
        proxy = await black_holing_proxy(server.port, hole)
        port = proxy.sockets[0].getsockname()[1]
        try:
            async with backchannel.AsyncClient(
                f"127.0.0.1:{port}",
                transport="grpclib",
                timeout=20,
                keepalive=backchannel.Keepalive(time=0.3, timeout=0.3),
            ) as client:
                echo = client.reference(Echo)
                assert await echo.add(1, 2) == 3
                hole.set()
                began = time.monotonic()
                calls = [asyncio.ensure_future(echo.echo(b"x" * 3_000_000)) for _ in range(3)]
                for call in calls:
                    with pytest.raises(backchannel.StreamBroken):
                        await call
                assert time.monotonic() - began < 2.5
        finally:
            proxy.close()
            await server.stop()

    run(body(), timeout=15)


class _Warned(logging.Handler):
    """Sets ``event`` on the first record of the "backchannel" logger containing
    ``text``."""

    def __init__(self, text: str, event: asyncio.Event) -> None:
        super().__init__(logging.INFO)
        self.text = text
        self.event = event
        self.loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.loop.call_soon_threadsafe(self.event.set)


def _framed_frame(frame: pb.Frame) -> bytes:
    body = frame.SerializeToString()
    return struct.pack(">BI", 0, len(body)) + body


def test_a_consumer_with_a_huge_window_that_never_reads_is_ended_with_bounded_buffers() -> None:
    """HTTP/2 flow control lets a peer advertise a 2 GiB window: the provider's writes
    still wait for its socket buffer to drain, so what is queued for the peer counts
    against max_queued_bytes and the session ends the stream (before, every 1 MB result
    went straight into the socket's buffer and nothing was ever ended)."""

    async def body() -> None:
        limits = backchannel.Limits(
            max_queued_bytes=2**21, max_message_size=2**21, max_write_stall=0.3
        )
        server = backchannel.AsyncServer("127.0.0.1:0", transport="grpclib", limits=limits)
        server.export(Echo, EchoImpl())
        await server.start()
        ended = asyncio.Event()
        handler = _Warned("max_queued_bytes", ended)
        logging.getLogger("backchannel").addHandler(handler)
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1,
                SettingCodes.MAX_FRAME_SIZE: 2**24 - 1,
            },
        )
        connection.initiate_connection()
        connection.increment_flow_control_window(2**31 - 1 - 65535)
        stream_id = connection.get_next_available_stream_id()
        connection.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", CONNECT),
                (":authority", "x"),
                ("te", "trailers"),
                ("content-type", "application/grpc"),
            ],
        )
        hello = pb.Hello(protocol_version=1, max_calls_in_flight=1000, max_message_size=4 << 20)
        connection.send_data(stream_id, _framed_frame(pb.Frame(hello=hello)))
        for number in range(40):
            call = pb.Call(
                id=number + 1, service="test.Echo", method="big", args=[pb.Value(int_value=10**6)]
            )
            connection.send_data(stream_id, _framed_frame(pb.Frame(call=call)))
        sock = socket.create_connection(("127.0.0.1", server.port))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(connection.data_to_send())  # a few KB; then nothing is read
            await asyncio.wait_for(ended.wait(), 10)
            buffered = [
                protocol.connection._transport.get_write_buffer_size()
                for protocol in server._listener.protocols  # type: ignore[attr-defined]
            ]
            assert buffered and max(buffered) < 8 * 2**20, buffered
        finally:
            logging.getLogger("backchannel").removeHandler(handler)
            sock.close()
            await server.stop()

    run(body(), timeout=20)


def test_a_connection_that_sends_part_of_the_preface_is_closed_in_time() -> None:
    """A peer that sends "PRI" and goes silent: the handshake is the HTTP/2 preface
    and SETTINGS, not the first byte (which used to cancel the deadline: the connection
    was held for ever)."""
    limits = backchannel.Limits(handshake_timeout=0.5)
    with backchannel.Server("127.0.0.1:0", limits=limits, transport="grpclib") as server:
        host, _, port = server.address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"PRI")
            began = time.monotonic()
            while sock.recv(65536):  # the server's SETTINGS, then the end
                pass
            assert time.monotonic() - began < 3


def test_a_ping_flood_from_a_peer_that_never_reads_is_cut_off() -> None:
    """PINGs sent without reading their acknowledgements: the provider aborts the
    connection once the unsent ACKs pass its bound (they used to pile up without end),
    and goes on serving."""
    limits = backchannel.Limits(max_message_size=64 * 1024, max_queued_bytes=64 * 1024)
    with backchannel.Server("127.0.0.1:0", limits=limits, transport="grpclib") as server:
        server.export(Echo, EchoImpl())
        host, _, port = server.address.rpartition(":")
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        ping = bytes.fromhex("000008060000000000") + b"12345678"  # PING, 8 bytes
        blob = ping * 10_000
        sent = 0
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(connection.data_to_send())
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                while sent < 24 * 2**20:  # 24 MB of PINGs at most: 1.5 M of them
                    sock.sendall(blob)
                    sent += len(blob)
        # its ACKs: 17 bytes a PING; the bound is 2 MiB past one message
        assert sent < 16 * 2**20, sent
        with backchannel.Client(server.address, transport="grpclib") as client:
            assert client.reference(Echo).echo("still") == "still"


def test_rpcs_past_the_cap_of_one_connection_are_refused_and_the_log_stays_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Invoke streams that send headers only each hold an RPC: one connection gets
    OTHER_STREAMS of them, the rest are refused (REFUSED_STREAM), and closing the
    connection on them logs no tracebacks (1000 used to, and no stream was refused)."""
    from backchannel.transport.grpclib.serving import OTHER_STREAMS

    extra = 5

    async def body() -> list[int]:
        server = backchannel.AsyncServer("127.0.0.1:0", transport="grpclib")
        server.export(Echo, EchoImpl())
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        connection.initiate_connection()
        writer.write(connection.data_to_send())
        refused: list[int] = []
        try:
            settings = 0
            while settings < 2:  # the provider's SETTINGS and its stream limit: acked
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data
                events = connection.receive_data(data)
                settings += sum(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
            headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", INVOKE),
                (":authority", "x"),
                ("te", "trailers"),
                ("content-type", "application/grpc"),
            ]
            for _ in range(OTHER_STREAMS + extra):
                connection.send_headers(connection.get_next_available_stream_id(), headers)
            writer.write(connection.data_to_send())
            while len(refused) < extra:
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, "the provider closed the connection"
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.StreamReset):
                        assert event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                        refused.append(event.stream_id)
                writer.write(connection.data_to_send())
        finally:
            writer.close()
            await server.stop()
        return refused

    with caplog.at_level(logging.INFO):
        refused = run(body(), timeout=20)
    first = 1 + 2 * OTHER_STREAMS  # the stream ids of the streams past the cap
    assert refused == [first + 2 * n for n in range(extra)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[:2000]
    assert len(caplog.records) < 20, caplog.text[:2000]


def test_a_tls_context_that_does_not_verify_the_provider_counts_as_plaintext() -> None:
    """A token over TLS that checks no certificate (or no host name) goes to whoever
    answers: the token rule treats such a context as plaintext."""
    from backchannel.transport.default import resolve

    transport = resolve("grpclib")
    assert transport.is_plaintext(None)
    assert transport.is_plaintext(ssl._create_unverified_context())
    no_hostname = ssl.create_default_context()
    no_hostname.check_hostname = False
    assert transport.is_plaintext(no_hostname)
    assert not transport.is_plaintext(ssl.create_default_context())
    unverified = ssl._create_unverified_context()
    with pytest.raises(backchannel.CredentialsNotSent, match="192.0.2.1:50051"):
        backchannel.Client(
            "192.0.2.1:50051", transport="grpclib", credentials=unverified, token="secret"
        )
