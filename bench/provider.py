"""A benchmark provider process: ``python bench/provider.py backchannel|raw``.

Listens on 127.0.0.1 with a free port, prints ``host:port`` on stdout, and serves until
SIGTERM or SIGINT, then exits cleanly (so ``python -m cProfile -o ...`` can save a profile).

``backchannel`` exports :class:`~common.Calculator` twice: the ``async def`` implementation
under no group and the ``def`` one under the group ``"sync"``. ``raw`` is a plain grpc.aio
server with generic handlers that echo bytes: unary ``Echo`` and bidi ``EchoStream``
(read one message, write it back, as backchannel's provider reads and writes its stream).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from common import (
    RAW_SERVICE,
    SYNC_GROUP,
    AsyncCalculator,
    Calculator,
    SyncCalculator,
)

import backchannel

EOF = grpc.aio.EOF  # type: ignore[attr-defined]


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    """Raw unary handler: answer with the request."""
    return request


async def _echo_stream(requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Raw bidi handler: write back every message read, one at a time."""
    while (message := await context.read()) is not EOF:
        await context.write(message)


async def _start_raw() -> tuple[str, Callable[[], Awaitable[object]]]:
    """Start the raw grpc.aio echo server; return its address and its stop function."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        RAW_SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "EchoStream": grpc.stream_stream_rpc_method_handler(_echo_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return f"127.0.0.1:{port}", lambda: server.stop(None)


async def _start_backchannel() -> tuple[str, Callable[[], Awaitable[object]]]:
    """Start the backchannel provider; return its address and its stop function."""
    server = backchannel.AsyncServer("127.0.0.1:0", application="bench-provider")
    server.export(Calculator, AsyncCalculator())
    server.export(Calculator, SyncCalculator(), group=SYNC_GROUP)
    await server.start()
    return server.address, server.stop


async def main(kind: str) -> None:
    """Serve ``kind`` until told to stop."""
    starters = {"backchannel": _start_backchannel, "raw": _start_raw}
    if kind not in starters:
        raise SystemExit(f"usage: provider.py {'|'.join(starters)}")
    address, stop = await starters[kind]()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    print(address, flush=True)
    await stopped.wait()
    await stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else ""))
