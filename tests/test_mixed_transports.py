"""Mixed pairs: a grpclib consumer with a grpcio provider and the reverse (forward calls,
callbacks, errors, TLS), and the real grpcurl against a grpclib provider: both
transports speak the same gRPC over HTTP/2."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from conftest import run
from helpers import channel_credentials, server_credentials
from services import (
    TABLES_METHODS,
    Echo,
    EchoImpl,
    OutOfStock,
    TableListener,
    Tables,
    TablesImpl,
)
from test_grpcurl import Stream, grpcurl
from test_security import Pems, pems  # noqa: F401  (the fixture)

import backchannel

PAIRS = [("grpclib", "grpcio"), ("grpcio", "grpclib")]
PAIR_IDS = [f"{consumer}-consumer-{provider}-provider" for consumer, provider in PAIRS]


def provider(transport: str, **options: object) -> backchannel.Server:
    server = backchannel.Server("127.0.0.1:0", transport=transport, **options)  # type: ignore[arg-type]
    server.export(Echo, EchoImpl())
    server.export(Tables, TablesImpl(), methods=TABLES_METHODS)
    return server


@pytest.mark.parametrize(("consumer", "provider_transport"), PAIRS, ids=PAIR_IDS)
def test_calls_errors_and_callbacks_cross_transports(
    consumer: str, provider_transport: str
) -> None:
    with provider(provider_transport) as server:
        with backchannel.Client(server.address, transport=consumer, errors=[OutOfStock]) as client:
            echo = client.reference(Echo)
            assert echo.echo({"a": [1, b"2"]}) == {"a": [1, b"2"]}
            assert echo.add(2, 3) == 5
            with pytest.raises(OutOfStock):
                echo.fail("OutOfStock", "none left")
            tables = client.reference(Tables, methods=TABLES_METHODS)
            assert tables.pull(TableListener(3)) == 3  # a callback across the pair
            assert len(echo.big(2**20)) == 2**20  # a message over one HTTP/2 frame and window

        async def async_calls() -> None:
            async with backchannel.AsyncClient(server.address, transport=consumer) as client:
                echo = client.reference(Echo)
                results = await __import__("asyncio").gather(*(echo.add(i, i) for i in range(200)))
                assert results == [2 * i for i in range(200)]

        run(async_calls())


@pytest.mark.parametrize(("consumer", "provider_transport"), PAIRS, ids=PAIR_IDS)
def test_tls_and_mutual_tls_cross_transports(
    pems: Pems,  # noqa: F811
    consumer: str,
    provider_transport: str,
) -> None:
    tls = server_credentials(
        pems.server_key, pems.server_cert, client_ca=pems.ca, transport=provider_transport
    )
    with provider(provider_transport, credentials=tls) as server:
        known = channel_credentials(pems.ca, pems.client_key, pems.client_cert, transport=consumer)
        with backchannel.Client(server.address, transport=consumer, credentials=known) as client:
            assert client.reference(Echo).echo("mutual") == "mutual"
        anonymous = channel_credentials(pems.ca, transport=consumer)
        with backchannel.Client(
            server.address, transport=consumer, credentials=anonymous, connect_timeout=2
        ) as client:
            with pytest.raises(backchannel.TransportError):
                client.reference(Echo).echo("no certificate")


@pytest.mark.parametrize(("consumer", "provider_transport"), PAIRS, ids=PAIR_IDS)
def test_a_token_refused_across_transports_is_unauthenticated(
    consumer: str, provider_transport: str
) -> None:
    tokens = backchannel.bearer_tokens({"s3cret": "ops"})
    with provider(provider_transport, authenticator=tokens) as server:
        with backchannel.Client(server.address, transport=consumer, token="wrong") as client:
            with pytest.raises(backchannel.Unauthenticated):
                client.reference(Echo).echo("x")
        with backchannel.Client(server.address, transport=consumer, token="s3cret") as client:
            assert client.reference(Echo).echo("x") == "x"


@pytest.fixture
def grpclib_provider() -> Iterator[str]:
    with provider("grpclib") as server:
        yield server.address


def test_grpcurl_lists_describes_checks_and_invokes_a_grpclib_provider(
    grpclib_provider: str,
) -> None:
    listed = grpcurl(grpclib_provider, "list").stdout.split()
    assert {
        "backchannel.v1.Envelope",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(listed)
    frame = grpcurl(grpclib_provider, "describe", "backchannel.v1.Frame").stdout
    assert "// One unit on a Connect stream." in frame
    checked = grpcurl(grpclib_provider, "grpc.health.v1.Health/Check")
    assert json.loads(checked.stdout) == {"status": "SERVING"}
    call = {"service": "test.Echo", "method": "add", "jsonArgs": "[2, 3]"}
    invoked = grpcurl(grpclib_provider, "backchannel.v1.Envelope/Invoke", data=json.dumps(call))
    assert json.loads(invoked.stdout)["json"] == "5", invoked
    missing = grpcurl(grpclib_provider, "no.such.Service/Method")
    assert missing.returncode != 0


def test_grpcurl_runs_a_connect_stream_on_a_grpclib_provider(grpclib_provider: str) -> None:
    stream = Stream(grpclib_provider)
    try:
        stream.send({"hello": {"protocolVersion": 1, "application": "grpcurl"}})
        stream.wait_for("welcome")
        args = [{"intValue": "7"}]
        stream.send({"call": {"id": 1, "service": "test.Echo", "method": "echo", "args": args}})
        (result,) = stream.wait_for("result")
        assert result["result"] == {"id": "1", "value": {"intValue": "7"}}, result
    finally:
        assert stream.close() == 0


@pytest.mark.parametrize(("consumer", "provider_transport"), PAIRS, ids=PAIR_IDS)
def test_short_keepalive_pings_are_accepted_across_transports(
    consumer: str, provider_transport: str
) -> None:
    """A consumer pinging every 0.1 s (the shortest keepalive) is never sent away by the
    other transport's provider (grpcio's answers pings it finds too frequent with GOAWAY
    too_many_pings), whatever the provider's own keepalive."""
    fast = backchannel.Keepalive(time=0.1, timeout=2)

    async def body() -> None:
        with provider(provider_transport, keepalive=None) as server:
            async with backchannel.AsyncClient(
                server.address, transport=consumer, keepalive=fast
            ) as client:
                echo = client.reference(Echo)
                assert await echo.echo(1) == 1
                link = next(iter(client._links.values()))
                session = link.session
                await asyncio.sleep(1.5)  # the time under test: some fifteen pings, idle
                assert await echo.echo(2) == 2
                assert link.session is session and session.usable  # the same stream

    run(body())
