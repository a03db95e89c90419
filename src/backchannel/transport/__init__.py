"""The transport layer: drives the wire protocol over one live stream.

Owns the session that runs a :class:`~backchannel.wire.protocol.Connection` over a Connect
stream (writing and batching with back-pressure, reading and dispatch, the table of
outgoing calls and their deadlines), hand-offs between threads and the event loop, the
loop thread of the sync API (the portal), the thread pools that run plain ``def`` methods,
rate-limited peer logs, consumer identity, and the seam behind which everything
grpc-specific sits (channels, credentials, the server and its handlers, status codes,
health, reflection, keepalive options).

May import: :mod:`backchannel.wire` and below. The grpc implementation of the seam is the
only module of the package that imports grpc.
"""
