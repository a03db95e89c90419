"""The gRPC options a channel or a server gets from backchannel's settings."""

from __future__ import annotations

from backchannel.settings import MIN_KEEPALIVE_TIME, Keepalive, Limits

# half the shortest keepalive time: a ping that comes a little early is no strike
_PING_PERMIT_MS = int(MIN_KEEPALIVE_TIME * 500)


def channel_options(limits: Limits, keepalive: Keepalive | None) -> list[tuple[str, int]]:
    """gRPC options for a client channel or a server with these settings."""
    # gRPC's own limit sits above ours, so an oversized frame is refused by us with a
    # clear error before gRPC would tear down the whole stream
    wire_limit = limits.max_message_size + 64 * 1024
    options = [
        ("grpc.max_send_message_length", wire_limit),
        ("grpc.max_receive_message_length", wire_limit),
        # what a server accepts from its clients: not tied to its own keepalive (nor to
        # having one), or a client with a shorter one gets GOAWAY too_many_pings
        ("grpc.http2.min_ping_interval_without_data_ms", _PING_PERMIT_MS),
        ("grpc.http2.min_time_between_pings_ms", _PING_PERMIT_MS),
    ]
    if keepalive is not None:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive.time * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive.timeout * 1000)),
            # newer gRPC times every ping out by this instead (60 s by default)
            ("grpc.http2.ping_timeout_ms", int(keepalive.timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    return options


def server_options(limits: Limits, keepalive: Keepalive | None) -> list[tuple[str, int]]:
    """gRPC options for a server with these settings: a channel's, and the handshake
    timeout, without which a connection that never finishes its TLS or HTTP/2 handshake
    holds its file descriptor for gRPC's default of 120 s."""
    timeout_ms = max(1, int(limits.handshake_timeout * 1000))
    return [
        *channel_options(limits, keepalive),
        ("grpc.server_handshake_timeout_ms", timeout_ms),
    ]


def link_options(
    limits: Limits, keepalive: Keepalive | None, connect_timeout: float
) -> list[tuple[str, int]]:
    """gRPC options for a consumer's channel to one provider address."""
    return [
        *channel_options(limits, keepalive),
        # our own backoff spaces attempts; gRPC's would refuse them for minutes,
        # and its shared subchannels would carry that state into a new channel
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", 100),
        # gRPC's minimum *connect timeout* too (doc/connection-backoff.md's
        # MIN_CONNECT_TIMEOUT): at 100 ms a provider whose TCP + HTTP/2
        # handshake takes longer could never be reached
        ("grpc.min_reconnect_backoff_ms", max(100, int(connect_timeout * 1000))),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
