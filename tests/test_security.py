"""TLS, mutual TLS and authentication, with a throwaway CA made at test time."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.experimental
import pytest
from conftest import run
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import LogSeen, Records, channel_credentials, server_credentials, transport_name
from kazoo.client import KazooClient

import backchannel
from backchannel.cluster import providers
from backchannel.cluster.service_url import encode, reachable_host
from backchannel.transport.pools import CallPools
from backchannel.wire import codec


@backchannel.interface("test.WhoAmI")
class WhoAmI:
    def sync_name(self) -> Any: ...
    def async_name(self) -> Any: ...


class WhoAmIImpl:
    def sync_name(self) -> Any:
        return backchannel.current_identity()

    async def async_name(self) -> Any:
        return backchannel.current_identity()


@dataclass
class Pems:
    ca: bytes
    server_key: bytes
    server_cert: bytes
    client_key: bytes
    client_cert: bytes


def _issue(
    name: str, issuer: x509.Name | None, signer: Any, ca: bool = False, host: str = "127.0.0.1"
) -> tuple[bytes, bytes, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signer or key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM), (key, subject)


@pytest.fixture(scope="module")
def pems() -> Pems:
    _, ca_cert, (ca_key, ca_name) = _issue("test CA", None, None, ca=True)
    server_key, server_cert, _ = _issue("127.0.0.1", ca_name, ca_key)
    client_key, client_cert, _ = _issue("consumer", ca_name, ca_key)
    return Pems(ca_cert, server_key, server_cert, client_key, client_cert)


def serve(**options: Any) -> Iterator[backchannel.Server]:
    with backchannel.Server(**options) as server:
        server.export(WhoAmI, WhoAmIImpl())
        yield server


def test_tls(pems: Pems) -> None:
    credentials = server_credentials(pems.server_key, pems.server_cert)
    for server in serve(credentials=credentials):
        trusted = channel_credentials(pems.ca)
        with backchannel.Client(server.address, credentials=trusted) as client:
            assert client.reference(WhoAmI).sync_name() is None  # no authenticator
        with backchannel.Client(server.address) as plaintext:
            with pytest.raises(backchannel.TransportError):
                plaintext.reference(WhoAmI).sync_name()


def test_mutual_tls_refuses_a_client_without_a_certificate(pems: Pems) -> None:
    credentials = server_credentials(pems.server_key, pems.server_cert, client_ca=pems.ca)
    for server in serve(credentials=credentials):
        anonymous = channel_credentials(pems.ca)
        with backchannel.Client(server.address, credentials=anonymous) as client:
            with pytest.raises(backchannel.TransportError):
                client.reference(WhoAmI).sync_name()
        known = channel_credentials(pems.ca, pems.client_key, pems.client_cert)
        with backchannel.Client(server.address, credentials=known) as client:
            assert client.reference(WhoAmI).async_name() is None


def test_bearer_token_identity_reaches_provider_code() -> None:
    for server in serve(authenticator=backchannel.bearer_tokens({"s3cret": "alice"})):
        with backchannel.Client(server.address, token="s3cret") as client:
            who = client.reference(WhoAmI)
            assert who.sync_name() == "alice"  # in the provider's thread pool
            assert who.async_name() == "alice"  # on the provider's event loop

        async def async_client(address: str) -> None:
            async with backchannel.AsyncClient(address, token="s3cret") as client:
                assert await client.reference(WhoAmI).async_name() == "alice"

        run(async_client(server.address))


def test_rejected_consumers_get_a_clear_unauthenticated_error() -> None:
    for server in serve(authenticator=backchannel.bearer_tokens({"s3cret": "alice"})):
        with backchannel.Client(server.address, token="wrong") as client:
            with pytest.raises(backchannel.Unauthenticated, match="bearer token is not valid"):
                client.reference(WhoAmI).sync_name()
        with backchannel.Client(server.address) as client:
            with pytest.raises(backchannel.Unauthenticated, match="no bearer token"):
                client.reference(WhoAmI).sync_name()
        with backchannel.Client(server.address, token="s3cret") as client:
            assert client.reference(WhoAmI).sync_name() == "alice"  # others go on


def test_a_custom_async_authenticator_sees_the_metadata() -> None:
    seen: list[dict[str, str]] = []

    async def authenticate(metadata: Any) -> str:
        seen.append(dict(metadata))
        if metadata.get("x-team") != "blue":
            raise backchannel.Unauthenticated("only team blue")
        return "team blue"

    for server in serve(authenticator=authenticate):
        with backchannel.Client(server.address, metadata=[("x-team", "blue")]) as client:
            assert client.reference(WhoAmI).sync_name() == "team blue"
        with backchannel.Client(server.address, metadata=[("x-team", "red")]) as client:
            with pytest.raises(backchannel.Unauthenticated, match="only team blue"):
                client.reference(WhoAmI).sync_name()
    assert seen[0]["x-team"] == "blue"


def test_current_identity_outside_a_call_is_a_clear_error() -> None:
    with pytest.raises(LookupError, match="only known while a call is running"):
        backchannel.current_identity()


def test_a_result_from_another_stream_cannot_answer_a_callback_call() -> None:
    from conftest import RawStream
    from notifier import NOTIFIER_METHODS, Notifier, NotifierImpl

    from backchannel.v1 import envelope_pb2 as pb

    with backchannel.Server(callback_timeout=5) as server:
        server.export(Notifier, NotifierImpl(greet=False), methods=NOTIFIER_METHODS)

        async def body() -> None:
            a, b = RawStream(server.address), RawStream(server.address)
            await a.hello()
            await b.hello()
            listener = pb.Value(callback_value=pb.CallbackRef(id=1, interface="test.Listener"))
            key = pb.Value(string_value="k")
            add = pb.Call(id=1, service="test.Notifier", method="addListener", args=[key, listener])
            await a.send(pb.Frame(call=add))
            assert (await a.recv()).result.id == 1
            msg = pb.Value(string_value="hi")
            await a.send(
                pb.Frame(
                    call=pb.Call(id=2, service="test.Notifier", method="poke", args=[key, msg])
                )
            )
            callback = (await a.recv()).call  # the provider now awaits A's answer to it
            assert callback.callback_id == 1 and callback.method == "changed"
            forged = pb.Result(id=callback.id, value=pb.Value(string_value="forged by B"))
            await b.send(pb.Frame(result=forged))
            fault = (await b.recv()).fault  # B made no such call on its stream
            assert fault.call_id == callback.id
            assert f"result for unknown call id {callback.id}" in fault.message
            mine = pb.Result(id=callback.id, value=pb.Value(string_value="A's own answer"))
            await a.send(pb.Frame(result=mine))
            answer = (await a.recv()).result
            assert answer.id == 2 and answer.value.string_value == "A's own answer"
            await a.close()
            await b.close()

        run(body())


# ------------------------------------------------ where a consumer's token may go


@backchannel.interface("test.security.Listed")
class Listed:
    def name(self) -> Any: ...


class ListedImpl:
    def name(self) -> Any:
        return backchannel.current_identity()


class Recorder:
    """An authenticator that lets everyone in as ``label`` and keeps the metadata of
    every stream and Invoke that reached it: what a provider collecting tokens sees."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.seen: list[dict[str, str]] = []

    def __call__(self, metadata: Any) -> str:
        self.seen.append(dict(metadata))
        return self.label


@contextlib.contextmanager
def listed(address: str, recorder: Recorder, **options: Any) -> Iterator[backchannel.Server]:
    server = backchannel.Server(address, authenticator=recorder, **options)
    server.export(Listed, ListedImpl())  # before start(): start() registers the exports
    with server:
        yield server


@pytest.fixture
def outside_host(monkeypatch: pytest.MonkeyPatch) -> str:
    """An address of this machine that is not loopback, for a provider to listen on: the
    one its default route leaves from. On a machine with none, 127.0.0.2 stands in for
    it, declared not loopback by the test (a seam in the predicate, not in gRPC)."""
    host = reachable_host("0.0.0.0")
    if not host.startswith("127."):
        return host
    real = providers.is_loopback
    monkeypatch.setattr(
        providers, "is_loopback", lambda address: real(address) and "127.0.0.2:" not in address
    )
    return "127.0.0.2"


TOKEN = "s3cret"
BEARER = f"Bearer {TOKEN}"


def test_a_registry_cannot_lure_the_token_to_a_plaintext_address_off_the_machine(
    zookeeper: Any, outside_host: str
) -> None:
    outside, loopback = Recorder("outside"), Recorder("loopback")
    with (
        listed(f"{outside_host}:0", outside, registry=zookeeper.address) as far,
        listed("127.0.0.1:0", loopback, registry=zookeeper.address) as near,
    ):
        with backchannel.Client(zookeeper.address, token=TOKEN) as client:
            who = client.reference(Listed, loadbalance="roundrobin")
            assert [who.name() for _ in range(20)] == ["loopback"] * 20
        assert outside.seen == []  # never reached: not a stream, not a connection
        assert loopback.seen and all(m["authorization"] == BEARER for m in loopback.seen)

        # the application's explicit opt-in sends it there all the same
        with backchannel.Client(
            zookeeper.address, token=TOKEN, send_token_over_plaintext=True
        ) as client:
            who = client.reference(Listed, loadbalance="roundrobin")
            assert {who.name() for _ in range(4)} == {"outside", "loopback"}
        assert [m["authorization"] for m in outside.seen] == [BEARER]
        outside.seen.clear()

        near.stop()  # now the registry lists only the provider off the machine
        with backchannel.Client(zookeeper.address, token=TOKEN) as client:
            with pytest.raises(backchannel.CredentialsNotSent) as refused:
                client.reference(Listed).name()
        message = str(refused.value)
        assert far.address in message and "send_token_over_plaintext=True" in message
        assert "credentials=" in message
    assert outside.seen == []


def test_a_flapping_plaintext_znode_is_warned_of_once_per_client(
    zookeeper: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-written znode for a plaintext address off the machine, beside a loopback
    provider, removed (its link is retired) and written again three times: the client
    warns once that the token is not sent there, not once per link it makes for it."""
    caplog.set_level(logging.INFO, logger="backchannel")  # the lines waited on
    far = "192.0.2.7:5555"  # TEST-NET-1: never reached (no stream is opened for it)
    url = f"backchannel://{far}/test.security.Listed?interface=test.security.Listed"
    znode = f"/dubbo/test.security.Listed/providers/{encode(url)}"
    writer = KazooClient(hosts=zookeeper.hosts)
    writer.start(timeout=10)
    try:
        with (
            listed("127.0.0.1:0", Recorder("loopback"), registry=zookeeper.address),
            Records("not sending the token") as warned,
            backchannel.Client(zookeeper.address, token=TOKEN) as client,
        ):
            who = client.reference(Listed, loadbalance="roundrobin")
            assert who.name() == "loopback"  # subscribed
            for _ in range(3):
                with LogSeen(f"+{far}") as added:
                    writer.create(znode, ephemeral=True)
                    assert added.seen.wait(10), "the far provider never listed"
                assert [who.name() for _ in range(6)] == ["loopback"] * 6
                assert far in client._core._links  # chosen, refused, not called
                with LogSeen(f"closing the stream to {far}") as retired:
                    writer.delete(znode)
                    assert retired.seen.wait(10), "the far provider's link never retired"
        assert len(warned.messages) == 1, warned.messages
        assert far in warned.messages[0]
    finally:
        writer.stop()
        writer.close()


def test_a_client_warns_of_at_most_token_warnings_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past TOKEN_WARNINGS addresses (5 here), one line says no more are warned of, and
    the set of addresses warned of grows no more."""
    monkeypatch.setattr(providers, "TOKEN_WARNINGS", 5)
    settings = providers.LinkSettings(
        application="",
        connect_timeout=1.0,
        limits=backchannel.Limits(),
        keepalive=None,
        credentials=None,
        metadata=[("authorization", BEARER)],
        error_types=codec.ErrorTypes(()),
        pools=CallPools(1, 1, role="consumer", owners="test"),
    )
    with Records("not sending the token") as warned:
        for _ in range(2):
            for i in range(20):
                settings.warn_token_refused(f"192.0.2.{i}:1")
    assert len(warned.messages) == 6, warned.messages
    assert "not warning of each any more" in warned.messages[-1]
    assert len(settings._token_warned) == 6


def test_authorization_metadata_is_held_back_like_a_token(outside_host: str) -> None:
    far1, far2, near = Recorder("outside"), Recorder("outside 2"), Recorder("loopback")
    header = [("authorization", BEARER)]
    with (
        listed(f"{outside_host}:0", far1) as a,
        listed(f"{outside_host}:0", far2) as b,
        listed("127.0.0.1:0", near) as c,
    ):
        with backchannel.Client(
            f"static://{a.address},{b.address},{c.address}", metadata=header
        ) as client:
            who = client.reference(Listed, loadbalance="roundrobin")
            assert [who.name() for _ in range(30)] == ["loopback"] * 30

        # every provider refused: the error names each address, and the setting
        with backchannel.Client(f"{a.address},{b.address}", metadata=header) as client:
            with pytest.raises(backchannel.CredentialsNotSent) as refused:
                client.reference(Listed).name()
        message = str(refused.value)
        assert a.address in message and b.address in message
        assert "send_token_over_plaintext=True" in message

        # a single address is refused when the client is made, sync and async alike
        with pytest.raises(backchannel.CredentialsNotSent, match=a.address):
            backchannel.Client(a.address, token=TOKEN)
        with pytest.raises(backchannel.CredentialsNotSent, match=a.address):
            backchannel.AsyncClient(a.address, metadata=header)
        if transport_name() == "grpcio":  # grpc's "credentials" without TLS (grpcio's own)
            plaintext = grpc.experimental.insecure_channel_credentials()
            with pytest.raises(backchannel.CredentialsNotSent, match=a.address):
                backchannel.Client(a.address, token=TOKEN, credentials=plaintext)
        assert isinstance(refused.value, backchannel.TransportError)

        # metadata that is no credential goes anywhere, as before
        with backchannel.Client(a.address, metadata=[("x-team", "blue")]) as client:
            assert client.reference(Listed).name() == "outside"
        assert [(m.get("x-team"), m.get("authorization")) for m in far1.seen] == [("blue", None)]
    assert far2.seen == []
    assert [m["authorization"] for m in near.seen] == [BEARER] * len(near.seen)


def test_every_refused_provider_is_named_on_every_call(outside_host: str) -> None:
    """Every provider refused: each call's CredentialsNotSent names all of them (failed
    before: the first call named 3, each later one only the provider it picked, as the
    others were no longer available to try). Some refused and the rest unreachable: the
    connection error says how many more were refused, naming at most 10 (failed before:
    no word of the refusal)."""
    recorders = [Recorder(f"outside {i}") for i in range(3)]
    with (
        listed(f"{outside_host}:0", recorders[0]) as a,
        listed(f"{outside_host}:0", recorders[1]) as b,
        listed(f"{outside_host}:0", recorders[2]) as c,
    ):
        addresses = [a.address, b.address, c.address]
        with backchannel.Client("static://" + ",".join(addresses), token=TOKEN) as client:
            who = client.reference(Listed)
            for _ in range(3):
                with pytest.raises(backchannel.CredentialsNotSent) as refused:
                    who.name()
                named = [address for address in addresses if address in str(refused.value)]
                assert named == addresses, str(refused.value)
                assert "send_token_over_plaintext=True" in str(refused.value)

        # 12 refused (nothing listens there: no connection is made) and one where nobody
        # listens on loopback (the token may go there; the connection is refused)
        far = [f"{outside_host}:{port}" for port in range(20001, 20013)]
        with backchannel.Client(
            "static://" + ",".join([*far, "127.0.0.1:1"]), token=TOKEN
        ) as client:
            who = client.reference(Listed)
            for _ in range(3):
                with pytest.raises(backchannel.TransportError) as failed:
                    who.name()
                message = str(failed.value)
                assert not isinstance(failed.value, backchannel.CredentialsNotSent), message
                assert "12 more refused" in message, message
                assert sum(address in message for address in far) == 10  # bounded
                assert "send_token_over_plaintext=True" in message
    assert [r.seen for r in recorders] == [[], [], []]


def test_the_token_goes_over_verified_tls_and_to_loopback(outside_host: str) -> None:
    _, ca_cert, (ca_key, ca_name) = _issue("test CA", None, None, ca=True)
    key, cert, _ = _issue(outside_host, ca_name, ca_key, host=outside_host)
    tls = server_credentials(key, cert)
    far, near = Recorder("outside"), Recorder("loopback")
    with listed(f"{outside_host}:0", far, credentials=tls) as a, listed("127.0.0.1:0", near) as b:
        trusted = channel_credentials(ca_cert)
        with backchannel.Client(a.address, token=TOKEN, credentials=trusted) as client:
            assert client.reference(Listed).name() == "outside"
        assert [m["authorization"] for m in far.seen] == [BEARER]

        port = b.port
        for address in (f"127.0.0.1:{port}", f"localhost:{port}", f"static://localhost:{port}"):
            with backchannel.Client(address, token=TOKEN) as client:
                assert client.reference(Listed).name() == "loopback"

        async def async_client() -> None:
            async with backchannel.AsyncClient(b.address, token=TOKEN) as client:
                assert await client.reference(Listed).name() == "loopback"

        run(async_client())
        assert [m["authorization"] for m in near.seen] == [BEARER] * 4


def test_what_counts_as_loopback() -> None:
    from backchannel.transport.auth import is_loopback

    for address in (
        "127.0.0.1:1",
        "127.8.9.10:1",
        "localhost:1",
        "LOCALHOST:1",
        "[::1]:1",
        "dns:///localhost:1",
        "dns://8.8.8.8/127.0.0.1:1",
        "ipv4:127.0.0.1:1,127.0.0.2:2",
        "ipv6:[::1]:1",
        "unix:/tmp/socket",
        "unix-abstract:name",
    ):
        assert is_loopback(address), address
    for address in (
        "192.0.2.2:1",
        "10.0.0.1:1",
        "example.com:1",
        "localhost.example.com:1",
        "127.0.0.1.example.com:1",
        "[::2]:1",
        "::1",  # an IPv6 host with a port must be bracketed: not understood
        "ipv4:127.0.0.1:1,10.0.0.1:2",
        "dns:///example.com:1",
        "xds:///service",
        "",
    ):
        assert not is_loopback(address), address
