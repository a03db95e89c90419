"""What one hostile peer can cost: streams without a Hello, half-open TLS connections, log
floods of Faults and refusals, one huge Batch of calls past the in-flight limit.

Each bound is checked against a real provider (in-process, or a process of its own where
the file-descriptor limit matters) over 127.0.0.1, while a good consumer goes on.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import RawStream, run
from helpers import SERVICES, Records, channel_credentials, frames_of, read_line
from services import Echo, EchoImpl
from test_security import _issue

import backchannel
from backchannel.server import AsyncServer
from backchannel.settings import DEFAULT_HANDSHAKE_TIMEOUT
from backchannel.transport import peerlog
from backchannel.transport.grpcio.options import server_options
from backchannel.transport.peerlog import PEER_WARNINGS
from backchannel.transport.portal import LoopThread
from backchannel.v1 import envelope_pb2 as pb

SRC = Path(__file__).parents[1] / "src"


def hello() -> pb.Frame:
    return pb.Frame(hello=pb.Hello(protocol_version=1, application="raw"))


async def status_of(stream: RawStream, timeout: float) -> tuple[grpc.StatusCode, str]:
    """The status the provider ended ``stream`` with, frames before it skipped."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                frame = await stream.call.read()
            except grpc.aio.AioRpcError:
                break
            assert frame is not grpc.aio.EOF, "the stream ended with OK"
        return await stream.call.code(), await stream.call.details() or ""


# ------------------------------------------------------- item 8: silent streams


def test_streams_that_send_no_hello_are_ended_after_the_handshake_timeout() -> None:
    """200 streams that never send a Hello are all ended with DEADLINE_EXCEEDED naming
    Limits.handshake_timeout, within it plus a bound; a good consumer works meanwhile.
    The provider's warnings about them: PEER_WARNINGS for the whole provider, and a
    summary, not one per stream (an attacker reopening them would flood the log)."""
    timeout = 0.5

    async def body() -> None:
        server = AsyncServer(limits=backchannel.Limits(handshake_timeout=timeout))
        server.export(Echo, EchoImpl())
        with Records() as records:
            await _silent_streams(server, timeout)
        # stop() summarizes: the 190 past the window's share are counted in one line
        endings = [m for m in records.messages if "sent no Hello" in m]
        assert len(endings) == PEER_WARNINGS, len(endings)
        assert any("190 more warnings" in m for m in records.messages), records.messages
        assert len(records.messages) <= PEER_WARNINGS + 1, records.messages

    run(body())


async def _silent_streams(server: AsyncServer, timeout: float) -> None:
    """Open 200 streams that send nothing; check each is ended in time, naming the limit."""
    async with server:
        silent = [RawStream(server.address) for _ in range(200)]
        try:
            async with asyncio.timeout(5):  # every one reached the provider
                while server.session_count < 200:
                    await asyncio.sleep(0.01)
            began = time.monotonic()
            async with backchannel.AsyncClient(server.address) as client:
                assert await client.reference(Echo).echo(1) == 1
            errors = await asyncio.gather(*(status_of(stream, timeout + 5) for stream in silent))
            held = time.monotonic() - began
            assert server.session_count == 0
            assert held < timeout + 3, held
            for code, details in errors:
                assert code is grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
                assert f"no Hello within {timeout} s" in details
                assert "Limits.handshake_timeout" in details
        finally:
            for stream in silent:
                await stream.close()


def test_a_stream_past_max_streams_is_refused_and_a_freed_slot_serves_a_good_consumer() -> None:
    """With max_streams=20, 500 silent streams hold at most 20 sessions (memory stays
    bounded); the rest get RESOURCE_EXHAUSTED naming Limits.max_streams; once one is
    closed, a good consumer connects and calls."""

    async def body() -> None:
        limits = backchannel.Limits(max_streams=20)
        server = AsyncServer(limits=limits)
        server.export(Echo, EchoImpl())
        async with server:
            held = [RawStream(server.address) for _ in range(20)]
            try:
                for stream in held:
                    await stream.hello()
                assert server.session_count == 20
                extra = [RawStream(server.address) for _ in range(480)]
                for stream in extra:
                    await stream.send(hello())
                errors = await asyncio.gather(*(status_of(stream, 10) for stream in extra))
                for code, details in errors:
                    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
                    assert "Limits.max_streams" in details
                assert server.session_count == 20
                for stream in extra:
                    await stream.close()
                # a held stream ends: its slot serves a good consumer
                await held.pop().close()
                async with asyncio.timeout(5):
                    while server.session_count > 19:
                        await asyncio.sleep(0.01)
                async with backchannel.AsyncClient(server.address) as client:
                    assert await client.reference(Echo).echo(7) == 7
            finally:
                for stream in held:
                    await stream.close()

    run(body())


def test_refusals_past_max_streams_repeated_by_a_peer_reopening_a_stream_are_rate_limited() -> None:
    """With max_streams=1, a peer that closes its held stream and reopens one more than
    the limit 30 times: 30 refusals, but PEER_WARNINGS WARNING lines and one summary for
    the provider, not one (and an INFO line) per refusal."""

    async def body() -> None:
        server = AsyncServer(limits=backchannel.Limits(max_streams=1))
        server.export(Echo, EchoImpl())
        with Records() as records:
            async with server:
                for _ in range(30):
                    held = RawStream(server.address)
                    await held.hello()
                    extra = RawStream(server.address)
                    await extra.send(hello())
                    code, details = await status_of(extra, 10)
                    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
                    await extra.close()
                    await held.close()
                    await _until_no_session(server)
        refusals = [m for m in records.messages if m.startswith("refusing new Connect")]
        assert len(refusals) == PEER_WARNINGS, records.messages
        assert any("20 more warnings" in m for m in records.messages), records.messages
        assert len(records.messages) == PEER_WARNINGS + 1, records.messages

    run(body())


# ------------------------------------------------ item 9: half-open TLS connections


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    _, ca_cert, (ca_key, ca_name) = _issue("test CA", None, None, ca=True)
    server_key, server_cert, _ = _issue("127.0.0.1", ca_name, ca_key)
    folder = tmp_path_factory.mktemp("tls")
    (folder / "server.key").write_bytes(server_key)
    (folder / "server.crt").write_bytes(server_cert)
    return folder / "server.key", folder / "server.crt", ca_cert


@pytest.fixture
def tls_provider(tls_files: tuple[Path, Path, bytes]) -> Iterator[str]:
    """A TLS provider process with RLIMIT_NOFILE 256 and a handshake timeout of 1 s."""
    key, cert, _ = tls_files
    script = Path(__file__).with_name("tls_provider.py")
    command = [sys.executable, str(script), str(key), str(cert), "256", "1"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}  # this checkout's code, from any cwd
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, cwd=script.parent, env=env
    )
    try:
        address = read_line(process, 15, "the TLS provider")
        assert address, "the TLS provider did not start"
        yield address
    finally:
        process.kill()
        process.wait(5)


def test_the_server_handshake_timeout_is_set_by_default() -> None:
    options = dict(server_options(backchannel.Limits(), None))
    assert options["grpc.server_handshake_timeout_ms"] == DEFAULT_HANDSHAKE_TIMEOUT * 1000
    assert DEFAULT_HANDSHAKE_TIMEOUT <= 10


def test_a_good_consumer_connects_while_300_half_open_tls_connections_are_held(
    tls_provider: str, tls_files: tuple[Path, Path, bytes]
) -> None:
    """300 TCP connections that send a partial ClientHello and then nothing use up the
    provider's 256 file descriptors; gRPC closes each after the 1 s handshake timeout
    (not its default 120 s), so a good TLS consumer connects and calls within 10 s."""
    host, _, port = tls_provider.rpartition(":")
    half_open = []
    try:
        for _ in range(300):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # a TLS record header, then silence
            half_open.append(sock)
        began = time.monotonic()
        trusted = channel_credentials(tls_files[2])
        with backchannel.Client(tls_provider, credentials=trusted, timeout=5) as client:
            echo = client.reference(Echo)
            while True:
                try:
                    assert echo.echo("in") == "in"
                    break
                except (backchannel.TransportError, backchannel.DeadlineExceeded):
                    # refused while the descriptors are taken: try again, for 10 s at most
                    assert time.monotonic() - began < 10, "no call got through in 10 s"
        took = time.monotonic() - began
        assert took < 10, took
    finally:
        for sock in half_open:
            sock.close()


# ------------------------------------------------------------ item 10: log floods


def test_a_consumer_flooding_faults_is_cut_off_and_its_warnings_are_bounded() -> None:
    """A raw consumer sends 100,000 Faults (one Batch): the provider logs at
    most PEER_WARNINGS of them and a summary, ends the stream past max_faults (100) with
    RESOURCE_EXHAUSTED naming it, and another consumer's calls go on."""

    async def body() -> None:
        server = AsyncServer()
        server.export(Echo, EchoImpl())
        async with server:
            stream = RawStream(server.address)
            with Records() as records:
                try:
                    await stream.hello()
                    fault = pb.Frame(fault=pb.Fault(message="you are wrong"))
                    await stream.send(pb.Frame(batch=pb.Batch(frames=[fault] * 100_000)))
                    code, details = await status_of(stream, 10)
                    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
                    assert "max_faults" in details
                    async with backchannel.AsyncClient(server.address) as client:
                        assert await client.reference(Echo).echo(3) == 3
                finally:
                    await stream.close()
            faults = [m for m in records.messages if "reports a protocol fault" in m]
            assert len(faults) == PEER_WARNINGS, records.messages
            assert any("warnings about what it sent were suppressed" in m for m in records.messages)
            assert len(records.messages) <= 20, records.messages

    run(body())


async def _lying_connect(
    requests: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext[pb.Frame, pb.Frame]
) -> AsyncIterator[pb.Frame]:
    """Welcome; answer every call with 100,000 Faults (100 Batches of 1,000)."""
    fault = pb.Frame(fault=pb.Fault(message="you are wrong"))
    batch = pb.Frame(batch=pb.Batch(frames=[fault] * 1000))
    async for kind, _frame in frames_of(requests):
        if kind == "hello":
            yield pb.Frame(welcome=pb.Welcome(protocol_version=1, services=SERVICES))
        elif kind == "call":
            for _ in range(100):
                yield batch


def test_a_provider_flooding_faults_is_cut_off_and_the_consumers_other_calls_go_on() -> None:
    """A lying provider answers a call with 100,000 Faults: the consumer logs at most
    PEER_WARNINGS of them and a summary, ends that stream past max_faults (the call fails
    with StreamBroken naming it), and its calls to a healthy provider all succeed."""

    async def body() -> None:
        liar = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(
            _lying_connect,
            request_deserializer=pb.Frame.FromString,
            response_serializer=pb.Frame.SerializeToString,
        )
        liar.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("backchannel.v1.Envelope", {"Connect": handler}),)
        )
        port = liar.add_insecure_port("127.0.0.1:0")
        await liar.start()
        healthy = AsyncServer()
        healthy.export(Echo, EchoImpl())
        try:
            async with (
                healthy,
                backchannel.AsyncClient(f"127.0.0.1:{port}", timeout=10) as lied_to,
                backchannel.AsyncClient(healthy.address, timeout=1) as client,
            ):
                good = client.reference(Echo)
                assert await good.echo(0) == 0  # connected before the flood
                stop = asyncio.Event()

                async def steady() -> int:
                    calls = 0
                    while not stop.is_set():
                        assert await good.echo(calls) == calls
                        calls += 1
                    return calls

                with Records() as records:
                    calling = asyncio.create_task(steady())
                    with pytest.raises(backchannel.StreamBroken, match="max_faults"):
                        await lied_to.reference(Echo).echo(1)
                    stop.set()
                    assert await calling >= 1
                faults = [m for m in records.messages if "reports a protocol fault" in m]
                assert len(faults) == PEER_WARNINGS, records.messages
                assert len(records.messages) <= 20, records.messages
                assert any("were suppressed" in m for m in records.messages)
        finally:
            await liar.stop(0)

    run(body())


# ------------------------------------------- item 11: one huge Batch of refusals


class LoopLag:
    """How long the loop it runs on went without running a 5 ms timer: in CPU time of
    the loop's thread (``worst``, what the loop's own work held it for, whatever else
    the 2-core machine runs meanwhile) and in wall time (``worst_wall``, for the record)."""

    def __init__(self) -> None:
        self.worst = self.worst_wall = 0.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def reset(self) -> None:
        self.worst = self.worst_wall = 0.0

    async def stop(self) -> tuple[float, float]:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.worst, self.worst_wall

    async def _watch(self) -> None:
        while True:
            cpu, wall = time.thread_time(), time.monotonic()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, time.thread_time() - cpu)
            self.worst_wall = max(self.worst_wall, time.monotonic() - wall - 0.005)


def test_a_batch_of_150000_calls_past_the_limit_never_blocks_the_providers_loop() -> None:
    """One 3.7 MB Batch of 150,000 calls (from a consumer process) to a provider that
    runs 1,000 at once: the first 1,000 hold their slots, the other 149,000 are each
    answered RESOURCE_EXHAUSTED, and the provider's loop is never late by 100 ms or more
    (a 5 ms timer on it, from just before the Batch is sent until the last answer is in).
    Its warnings about them: PEER_WARNINGS, and a summary when the stream ends."""
    portal = LoopThread("provider")
    server = AsyncServer()
    server.export(Echo, EchoImpl())
    lag = LoopLag()
    script = Path(__file__).with_name("batch_consumer.py")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    try:
        portal.run(server.start())
        portal.run(lag.start())
        # what the suite left on the heap is no work of this message's: a full garbage
        # collection walking it (on whichever thread allocates) is not counted
        gc.collect()
        gc.freeze()
        with Records() as records:
            consumer = subprocess.Popen(
                [sys.executable, str(script), server.address],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=script.parent,
                env=env,
            )
            try:
                size = int(read_line(consumer, 30, "the consumer's handshake") or 0)
                assert 3_500_000 < size < 4 * 1024 * 1024, size
                portal.run(lag.reset())
                assert consumer.stdin is not None
                consumer.stdin.write("go\n")
                consumer.stdin.flush()
                answers = read_line(consumer, 30, "the answers")
                worst, wall = portal.run(lag.stop())
            finally:
                consumer.kill()
                consumer.wait(5)
            assert answers == "149000 0", answers
            print(f"loop held for at most {worst * 1000:.0f} ms ({wall * 1000:.0f} ms late)")
            assert worst < 0.1, f"the provider's loop was held for {worst * 1000:.0f} ms"
            portal.run(_until_no_session(server))
        mistakes = [m for m in records.messages if m.startswith("protocol mistake by")]
        assert len(mistakes) == PEER_WARNINGS, len(mistakes)
        assert any("148990 more warnings" in m for m in records.messages), records.messages
        assert len(records.messages) <= 20, records.messages[:30]
    finally:
        gc.unfreeze()
        portal.run(server.stop())
        portal.close()


async def _until_no_session(server: AsyncServer) -> None:
    async with asyncio.timeout(5):
        while server.session_count:
            await asyncio.sleep(0.01)


def test_peer_warnings_past_the_rate_go_to_debug_and_a_summary_follows_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """25 warnings in one window: PEER_WARNINGS at WARNING, the other 15 at DEBUG, and
    one summary line when the window ends (its timer: the stream is still open); the next
    window starts afresh."""
    monkeypatch.setattr(peerlog, "PEER_WARNING_WINDOW", 0.05)
    logger = logging.getLogger("backchannel.test-peerlog")
    logger.setLevel(logging.DEBUG)
    seen: list[tuple[int, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.levelno, record.getMessage()))

    keep = Keep()
    logger.addHandler(keep)

    async def body() -> None:
        log = peerlog.PeerLog(asyncio.get_running_loop(), "peer:1", logger)
        for i in range(25):
            log.warning("protocol mistake by %s: %s", f"mistake {i}\n")
        assert sum(level == logging.WARNING for level, _ in seen) == PEER_WARNINGS
        assert sum(level == logging.DEBUG for level, _ in seen) == 15
        async with asyncio.timeout(5):
            while not any("suppressed" in message for _, message in seen):
                await asyncio.sleep(0.01)
        summary = seen[-1][1]
        assert summary.startswith("peer:1: 15 more warnings about what it sent were suppressed")
        log.warning("protocol mistake by %s: %s", "again")
        assert seen[-1] == (logging.WARNING, "protocol mistake by peer:1: again")
        assert "mistake 0\\n" in seen[0][1]  # escaped: one line each

    try:
        run(body())
    finally:
        logger.removeHandler(keep)


def test_limits_refuse_nonsense() -> None:
    for bad in (
        {"handshake_timeout": 0},
        {"max_streams": 0},
        {"max_faults": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            backchannel.Limits(**bad)  # type: ignore[arg-type]
