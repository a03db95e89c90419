"""The transport seam's own pieces, as units: the grpcio implementation's options for a
consumer's channel, its statuses and errors in backchannel's terms, and the seam's end
marker and status error. (Everything that runs over the seam is tested end to end.)"""

from __future__ import annotations

import grpc
import pytest

from backchannel.errors import StreamBroken, TransportError, Unauthenticated
from backchannel.settings import Keepalive, Limits
from backchannel.transport import seam
from backchannel.transport.grpcio.options import channel_options, link_options
from backchannel.transport.grpcio.status import STATUS, status_error, translate
from backchannel.transport.seam import EOF, Code, StatusError


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_a_link_gets_the_channel_options_and_reconnects_on_our_backoff_not_grpcs() -> None:
    limits, keepalive = Limits(), Keepalive()
    options = link_options(limits, keepalive, connect_timeout=5.0)
    shared = channel_options(limits, keepalive)
    assert options[: len(shared)] == shared
    assert dict(options[len(shared) :]) == {
        # a subchannel of its own: no backoff state carried over from another channel
        "grpc.use_local_subchannel_pool": 1,
        "grpc.initial_reconnect_backoff_ms": 100,
        # gRPC's minimum connect timeout: the link's connect timeout, in ms
        "grpc.min_reconnect_backoff_ms": 5000,
        "grpc.max_reconnect_backoff_ms": 2000,
    }


def test_a_short_connect_timeout_still_gives_grpc_100_ms_to_connect() -> None:
    options = dict(link_options(Limits(), None, connect_timeout=0.05))
    assert options["grpc.min_reconnect_backoff_ms"] == 100
    assert (
        dict(link_options(Limits(), None, connect_timeout=0.25))["grpc.min_reconnect_backoff_ms"]
        == 250
    )
    assert "grpc.keepalive_time_ms" not in options  # no keepalive: none of its options


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_every_grpc_status_maps_to_the_seam_code_of_the_same_number(
    code: grpc.StatusCode,
) -> None:
    assert STATUS[Code(code.value[0])] is code
    error = status_error(_rpc_error(code, "what the server said"))
    assert isinstance(error, StatusError) and isinstance(error, TransportError)
    assert (error.code, error.details) == (Code(code.value[0]), "what the server said")
    assert str(error) == f"{code.name}: what the server said"


def test_a_status_error_names_its_code_and_details() -> None:
    error = StatusError(Code.NOT_FOUND, "no service t.Missing")
    assert (error.code, error.details, str(error)) == (
        Code.NOT_FOUND,
        "no service t.Missing",
        "NOT_FOUND: no service t.Missing",
    )


def test_grpc_stream_errors_become_backchannels_naming_the_peer() -> None:
    refused = translate(_rpc_error(grpc.StatusCode.UNAUTHENTICATED, "bad token"), "10.0.0.1:5")
    assert isinstance(refused, Unauthenticated)
    assert str(refused) == "10.0.0.1:5 refused this consumer: bad token"
    broken = translate(_rpc_error(grpc.StatusCode.UNAVAILABLE, "gone"), "10.0.0.1:5")
    assert type(broken) is StreamBroken
    assert str(broken) == "the stream to 10.0.0.1:5 broke: UNAVAILABLE: gone"
    assert isinstance(broken.__cause__, grpc.aio.AioRpcError)
    other = translate(OSError("reset"), "10.0.0.1:5")
    assert type(other) is StreamBroken and "OSError: reset" in str(other)
    mine = StreamBroken("already ours")
    assert translate(mine, "10.0.0.1:5") is mine is seam.translate(mine, "10.0.0.1:5")


def test_the_seams_end_marker_says_what_it_is() -> None:
    assert repr(EOF) == "EOF"
