"""A benchmark consumer process: measures one figure against a running provider.

``python bench/consumer.py FIGURE HOST:PORT [--warmup S] [--duration S]`` warms up for
``--warmup`` seconds, then times calls for ``--duration`` seconds and prints the
:class:`~common.Measurement` as one line of JSON. :data:`FIGURES` lists the figures.

The callback figures are timed on the pushing side: the consumer opens its share of the
figure's clients, registers listeners (backchannel) or opens push streams (raw), answers
the provider's calls and prints the Measurement the provider sends back. A figure with
``processes > 1`` runs that many consumer processes at once (``bench/run.py`` starts
them), each with ``clients // processes`` clients.

A figure runs on one transport and one event loop, in both its processes: ``bench/run.py``
sets ``$BACKCHANNEL_TRANSPORT`` and ``$BENCH_LOOP`` from the figure, and this process
refuses to measure in an environment that does not match. Every backchannel figure has a
twin on grpclib (NAME + ``-grpclib``) and on the fast transport, grpclib on uvloop (NAME +
:data:`FAST`); the raw grpclib figures (``bench/raw_grpclib.py``) run on plain asyncio and,
as NAME + ``-uvloop``, on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import grpc
from common import (
    FANOUT_CLIENTS,
    FANOUT_LISTENERS,
    JOIN_TIMEOUT,
    LOOP_ENVIRONMENT,
    RAW_FANOUT,
    RAW_PAYLOAD,
    RAW_PUSH,
    RAW_STREAM,
    RAW_UNARY,
    SYNC_GROUP,
    AsyncOp,
    Calculator,
    CallbackBench,
    EchoListener,
    Measurement,
    SyncOp,
    drive_threads,
    use_event_loop,
    warm_then_drive,
)
from rawpush import echo_until_result, push_settings

import backchannel
from backchannel.transport.default import ENVIRONMENT as TRANSPORT_ENVIRONMENT

AsyncSetup = Callable[[contextlib.AsyncExitStack, str], Awaitable[AsyncOp]]
SyncSetup = Callable[[contextlib.ExitStack, str], SyncOp]
#: a figure timed by the provider: (figure, clients in this process, address, warmup,
#: duration) -> the provider's Measurement
PushedRun = Callable[["Figure", int, str, float, float], Awaitable[Measurement]]

#: consumer processes of the fan-out figures (FANOUT_CLIENTS clients spread over them)
FANOUT_PROCESSES = 2

EOF = grpc.aio.EOF  # type: ignore[attr-defined]


# ------------------------------------------------------------ operations


def _checked(expected: int, answer: int) -> None:
    """Fail loudly if the provider answered wrong (a benchmark of wrong answers is void)."""
    if answer != expected:
        raise AssertionError(f"add() answered {answer}, expected {expected}")


def _bc_async(group: str) -> AsyncSetup:
    """backchannel, asyncio: ``await calc.add(i, 1)`` on one AsyncClient."""

    async def setup(stack: contextlib.AsyncExitStack, address: str) -> AsyncOp:
        client = await stack.enter_async_context(backchannel.AsyncClient(address, timeout=None))
        calc = client.reference(Calculator, group=group)

        async def op(i: int) -> None:
            _checked(i + 1, await calc.add(i, 1))

        return op

    return setup


async def _raw_aio_pingpong(stack: contextlib.AsyncExitStack, address: str) -> AsyncOp:
    """Raw grpc.aio bidi stream: write one message, read one (sequential callers only)."""
    channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
    call = channel.stream_stream(RAW_STREAM)()
    stack.callback(call.cancel)

    async def op(i: int) -> None:
        await call.write(RAW_PAYLOAD)
        await call.read()

    return op


async def _raw_aio_unary(stack: contextlib.AsyncExitStack, address: str) -> AsyncOp:
    """Raw grpc.aio unary calls on one channel."""
    channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
    stub = channel.unary_unary(RAW_UNARY)
    return lambda i: stub(RAW_PAYLOAD)


def _bc_sync(group: str) -> SyncSetup:
    """backchannel, sync: ``calc.add(i, 1)`` on one Client shared by every thread."""

    def setup(stack: contextlib.ExitStack, address: str) -> SyncOp:
        client = stack.enter_context(backchannel.Client(address, timeout=None))
        calc = client.reference(Calculator, group=group)
        return lambda i: _checked(i + 1, calc.add(i, 1))

    return setup


def _raw_sync_unary(stack: contextlib.ExitStack, address: str) -> SyncOp:
    """Raw sync grpc unary calls on one channel shared by every thread."""
    channel = stack.enter_context(grpc.insecure_channel(address))
    stub = channel.unary_unary(RAW_UNARY)
    return lambda i: stub(RAW_PAYLOAD)


async def _bc_pushed(
    figure: Figure, clients: int, address: str, warmup: float, duration: float
) -> Measurement:
    """backchannel callbacks: open ``clients`` AsyncClients, add the figure's share of
    listeners on each, then ask the provider to time callbacks to every listener (with
    ``backchannel.gather`` when the figure says so)."""
    per_client = figure.concurrency // figure.clients
    budget = JOIN_TIMEOUT + warmup + duration + 30
    async with contextlib.AsyncExitStack() as stack:
        benches = []
        for _ in range(clients):
            client = backchannel.AsyncClient(address, timeout=None)
            await stack.enter_async_context(client)
            benches.append(client.reference(CallbackBench, timeout=budget))
        await asyncio.gather(
            *(bench.addListener(EchoListener()) for bench in benches for _ in range(per_client))
        )
        drive = benches[0].driveGather if figure.gather else benches[0].drive
        result = await drive(figure.concurrency, warmup, duration)
    return Measurement.from_json(result)


def _raw_pushed(path: str) -> PushedRun:
    """Raw grpc.aio server push: open ``clients`` streams (a channel each), echo every
    message the server writes, one at a time, until its result arrives."""

    async def run(
        figure: Figure, clients: int, address: str, warmup: float, duration: float
    ) -> Measurement:
        settings = push_settings(figure.clients, figure.concurrency, warmup, duration)

        async def echo(stack: contextlib.AsyncExitStack) -> Measurement:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            call = channel.stream_stream(path)()
            stack.callback(call.cancel)
            await call.write(settings)
            return await echo_until_result(call.read, call.write, call.done_writing, EOF)

        async with contextlib.AsyncExitStack() as stack:
            results = await asyncio.gather(*(echo(stack) for _ in range(clients)))
        return results[0]

    return run


def _grpclib_setup(name: str) -> AsyncSetup:
    """A raw grpclib operation of ``bench/raw_grpclib.py`` (imported when first used, so
    the other figures' processes never load grpclib)."""

    async def setup(stack: contextlib.AsyncExitStack, address: str) -> AsyncOp:
        import raw_grpclib

        made: AsyncOp = await getattr(raw_grpclib, name)(stack, address)
        return made

    return setup


def _grpclib_pushed(path: str) -> PushedRun:
    """Raw grpclib server push on ``path`` (``raw_grpclib.pushed``), imported when used."""

    async def run(
        figure: Figure, clients: int, address: str, warmup: float, duration: float
    ) -> Measurement:
        import raw_grpclib

        return await raw_grpclib.pushed(path)(figure, clients, address, warmup, duration)

    return run


# --------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    """One measured figure: which provider it needs, how to call, and how many callers.

    For a ``pushed`` figure the callers are the provider's (one per listener), spread
    over ``clients`` clients in ``processes`` consumer processes.
    """

    provider: str
    concurrency: int
    async_setup: AsyncSetup | None = None
    sync_setup: SyncSetup | None = None
    pushed: PushedRun | None = None
    clients: int = 1
    processes: int = 1
    #: OpenTelemetry's state in both processes (bench/tracing.py); "" leaves it alone
    tracing: str = ""
    #: a pushed figure whose provider notifies with backchannel.gather, one caller
    gather: bool = False
    #: provider processes; the consumer gets ``static://`` and their addresses when it
    #: is more than 0 (a cluster, whose calls each choose a provider), else one address
    cluster: int = 0
    #: both processes' ``$BACKCHANNEL_TRANSPORT`` (a raw figure's: the library it uses)
    transport: str = "grpcio"
    #: both processes' event loop, ``$BENCH_LOOP``: "asyncio" or "uvloop"
    loop: str = "asyncio"


_GRPCIO_FIGURES: dict[str, Figure] = {
    "bc-async-seq": Figure("backchannel", 1, async_setup=_bc_async("")),
    "raw-aio-pingpong": Figure("raw", 1, async_setup=_raw_aio_pingpong),
    "bc-async-64": Figure("backchannel", 64, async_setup=_bc_async("")),
    "raw-aio-unary-64": Figure("raw", 64, async_setup=_raw_aio_unary),
    # the same 64 callers with OpenTelemetry not installed, installed with no provider,
    # and the SDK tracing every call (both ends; spans dropped by a no-op exporter)
    "bc-async-64-otel-absent": Figure("backchannel", 64, _bc_async(""), tracing="absent"),
    "bc-async-64-otel-no-provider": Figure("backchannel", 64, _bc_async(""), tracing="no-provider"),
    "bc-async-64-otel-sdk": Figure("backchannel", 64, _bc_async(""), tracing="sdk"),
    # the 64 callers on a cluster: one provider (the cost of choosing per call), three
    "bc-async-64-cluster-1": Figure("backchannel", 64, _bc_async(""), cluster=1),
    "bc-async-64-cluster-3": Figure("backchannel", 64, _bc_async(""), cluster=3),
    "bc-sync-seq": Figure("backchannel", 1, sync_setup=_bc_sync("")),
    "bc-sync-seq-def": Figure("backchannel", 1, sync_setup=_bc_sync(SYNC_GROUP)),
    "raw-sync-seq": Figure("raw", 1, sync_setup=_raw_sync_unary),
    "bc-sync-8": Figure("backchannel", 8, sync_setup=_bc_sync("")),
    # bench/peers.py: 64 threads on one sync Client, beside the peers' 64 threads
    "bc-sync-64": Figure("backchannel", 64, sync_setup=_bc_sync("")),
    "bc-sync-8-def": Figure("backchannel", 8, sync_setup=_bc_sync(SYNC_GROUP)),
    "raw-sync-8": Figure("raw", 8, sync_setup=_raw_sync_unary),
    "bc-callback-seq": Figure("backchannel", 1, pushed=_bc_pushed),
    "raw-push-pingpong": Figure("raw", 1, pushed=_raw_pushed(RAW_PUSH)),
    "bc-fanout-1000": Figure(
        "backchannel",
        FANOUT_LISTENERS,
        pushed=_bc_pushed,
        clients=FANOUT_CLIENTS,
        processes=FANOUT_PROCESSES,
    ),
    "bc-fanout-1000-gather": Figure(
        "backchannel",
        FANOUT_LISTENERS,
        pushed=_bc_pushed,
        clients=FANOUT_CLIENTS,
        processes=FANOUT_PROCESSES,
        gather=True,
    ),
    "raw-fanout-1000": Figure(
        "raw",
        FANOUT_LISTENERS,
        pushed=_raw_pushed(RAW_FANOUT),
        clients=FANOUT_CLIENTS,
        processes=FANOUT_PROCESSES,
    ),
}

#: the raw grpclib baselines (``bench/raw_grpclib.py``), on plain asyncio; each also
#: runs on uvloop as NAME + "-uvloop"
_RAW_GRPCLIB: dict[str, Figure] = {
    "raw-grpclib-pingpong": Figure("raw-grpclib", 1, async_setup=_grpclib_setup("pingpong")),
    "raw-grpclib-unary-64": Figure("raw-grpclib", 64, async_setup=_grpclib_setup("unary")),
    "raw-grpclib-pipelined-64": Figure("raw-grpclib", 64, async_setup=_grpclib_setup("pipelined")),
    "raw-grpclib-push-pingpong": Figure("raw-grpclib", 1, pushed=_grpclib_pushed(RAW_PUSH)),
    "raw-grpclib-fanout-1000": Figure(
        "raw-grpclib",
        FANOUT_LISTENERS,
        pushed=_grpclib_pushed(RAW_FANOUT),
        clients=FANOUT_CLIENTS,
        processes=FANOUT_PROCESSES,
    ),
}

#: the fast transport: a backchannel figure's name + FAST is the same figure with both
#: processes on grpclib and uvloop (+ "-grpclib": grpclib on plain asyncio)
FAST = "-grpclib-uvloop"
VARIANTS = {"-grpclib": ("grpclib", "asyncio"), FAST: ("grpclib", "uvloop")}


def _figures() -> dict[str, Figure]:
    """Every figure: grpcio's, their grpclib twins, the raw grpclib ones on both loops."""
    figures = dict(_GRPCIO_FIGURES)
    for name, figure in _GRPCIO_FIGURES.items():
        if figure.provider == "backchannel":
            for suffix, (transport, loop) in VARIANTS.items():
                figures[name + suffix] = replace(figure, transport=transport, loop=loop)
    for name, figure in _RAW_GRPCLIB.items():
        figures[name] = replace(figure, transport="grpclib")
        figures[name + "-uvloop"] = replace(figure, transport="grpclib", loop="uvloop")
    return figures


FIGURES = _figures()


async def _measure_async(
    setup: AsyncSetup, address: str, concurrency: int, warmup: float, duration: float
) -> Measurement:
    """Warm up, then time an asyncio figure."""
    async with contextlib.AsyncExitStack() as stack:
        op = await setup(stack, address)
        return await warm_then_drive(op, concurrency, warmup, duration)


def _measure_sync(
    setup: SyncSetup, address: str, concurrency: int, warmup: float, duration: float
) -> Measurement:
    """Warm up, then time a threaded figure."""
    with contextlib.ExitStack() as stack:
        op = setup(stack, address)
        drive_threads(op, concurrency, warmup)
        return drive_threads(op, concurrency, duration)


def measure(name: str, address: str, warmup: float, duration: float) -> Measurement:
    """Measure the figure ``name`` against the provider at ``address``."""
    figure = FIGURES[name]
    if figure.pushed is not None:
        clients = figure.clients // figure.processes
        return asyncio.run(figure.pushed(figure, clients, address, warmup, duration))
    if figure.async_setup is not None:
        return asyncio.run(
            _measure_async(figure.async_setup, address, figure.concurrency, warmup, duration)
        )
    assert figure.sync_setup is not None
    return _measure_sync(figure.sync_setup, address, figure.concurrency, warmup, duration)


def main() -> None:
    """Parse the command line, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("figure", choices=sorted(FIGURES))
    parser.add_argument("address")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=2.0)
    args = parser.parse_args()
    figure = FIGURES[args.figure]
    # bench/run.py sets both for the provider too; a consumer started by hand must match it
    found = {"transport": os.environ.get(TRANSPORT_ENVIRONMENT) or "grpcio"}
    found["loop"] = use_event_loop()
    wanted = {"transport": figure.transport, "loop": figure.loop}
    if found != wanted:
        raise SystemExit(
            f"{args.figure} runs with ${TRANSPORT_ENVIRONMENT}={figure.transport} and "
            f"${LOOP_ENVIRONMENT}={figure.loop}; this process has {found}"
        )
    result = measure(args.figure, args.address, args.warmup, args.duration)
    print(json.dumps(result.to_json()), flush=True)


if __name__ == "__main__":
    main()
