"""backchannel against RPyC 6 and Pyro5, in the same run (``make bench`` runs this after
``bench/run.py``): ``python bench/peers.py [--rounds N]``.

Four scenarios, each peer in its own provider and consumer processes on 127.0.0.1 (this
script, ``serve`` and ``measure``), interleaved round by round with backchannel's own
figures for them on both transports, grpcio and grpclib on uvloop (``bench/run.py``'s
processes and figure names):

- sequential call latency: one thread calls ``add(i, 1)`` in a loop;
- 64 concurrent callers: 64 threads, each with its own connection (RPyC) or proxy
  (Pyro5: a proxy belongs to one thread), against backchannel's 64 threads sharing one
  sync ``Client`` and 64 asyncio tasks on one ``AsyncClient``;
- callback round trip: the consumer hands the provider a callable (RPyC: a plain function,
  which arrives as a netref; Pyro5: an object registered in a daemon on the consumer's
  side, the documented Pyro5 callback pattern), and the provider times calling it back;
- fan-out to 1,000 listeners over 10 connections in 2 consumer processes: both peers call
  them from 64 provider threads, each calling its share of the listeners in turn (a
  Pyro5 proxy claimed by its thread). RPyC's ``rpyc.async_`` (start every callback, then
  wait for all) was tried first and did not finish within 90 s; if RPyC finishes no
  callback at all, the table says "failed".

The table, with ratios backchannel ÷ peer and the fast transport's targets against Pyro5
(:data:`TARGETS`), is printed and written to the "Against RPyC and Pyro5" section of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common import FANOUT_CLIENTS, FANOUT_LISTENERS, JOIN_TIMEOUT, drive_threads, summarise
from consumer import FANOUT_PROCESSES, FAST
from report import DOC, FAST_NAME, GRPCIO, markdown_table
from run import consumer, consumers_result, median_run, serving
from run import measure as measure_backchannel

HERE = Path(__file__).resolve().parent
SECTION = "## Against RPyC and Pyro5"
COMMAND = "python bench/peers.py"
CALLERS = 64
#: Pyro5 fan-out: provider threads, each calling its share of the listeners in turn
FANOUT_THREADS = 64

# --------------------------------------------------------------- providers


class Bench:
    """The provider object of both peers: add, and timing callbacks to its listeners."""

    def __init__(self, fan_out: Callable[[list[Any], float], Any]) -> None:
        self.listeners: list[Any] = []
        self.joined = threading.Condition()
        self.fan_out = fan_out
        self.result: dict[str, Any] | None = None
        self.running = threading.Lock()

    def add(self, a: int, b: int) -> int:
        return a + b

    def add_listener(self, listener: Any) -> None:
        with self.joined:
            self.listeners.append(listener)
            self.joined.notify_all()

    def drive(self, listeners: int, warmup: float, seconds: float) -> str:
        """Once ``listeners`` are in, time callbacks to them; the Measurement as JSON."""
        with self.joined:
            if not self.joined.wait_for(lambda: len(self.listeners) >= listeners, JOIN_TIMEOUT):
                raise TimeoutError(f"only {len(self.listeners)} of {listeners} listeners joined")
        with self.running:  # the first consumer to ask runs it; the others get its figures
            if self.result is None:
                chosen = self.listeners[:listeners]
                if listeners == 1:
                    if hasattr(chosen[0], "_pyroClaimOwnership"):  # Pyro5: for this thread
                        chosen[0]._pyroClaimOwnership()
                    changed = chosen[0].changed  # RPyC: one netref, not a getattr per call

                    def op(i: int) -> None:
                        if changed(i) != i:
                            raise AssertionError("the callback answered wrong")

                    drive_threads(op, 1, warmup)
                    self.result = drive_threads(op, 1, seconds).to_json()
                else:
                    self.fan_out(chosen, warmup)
                    self.result = self.fan_out(chosen, seconds).to_json()
        return json.dumps(self.result)


def fan_out(listeners: list[Any], seconds: float) -> Any:
    """FANOUT_THREADS threads, each calling its own share of the listeners in turn."""
    deadline = time.perf_counter() + seconds

    def share(proxies: list[Any]) -> list[float]:
        for proxy in proxies:
            if hasattr(proxy, "_pyroClaimOwnership"):  # a Pyro5 proxy: one thread at a time
                proxy._pyroClaimOwnership()
        calls = [proxy.changed for proxy in proxies]  # RPyC: one netref each, fetched once
        latencies: list[float] = []
        i = 0
        while True:
            for call in calls:
                if (start := time.perf_counter()) >= deadline:
                    return latencies
                i += 1
                if call(i) != i:
                    raise AssertionError("a callback answered wrong")
                latencies.append(time.perf_counter() - start)

    results: list[list[float]] = []
    began = time.perf_counter()
    threads = [
        threading.Thread(target=lambda n=n: results.append(share(listeners[n::FANOUT_THREADS])))
        for n in range(FANOUT_THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarise(results, time.perf_counter() - began)


def serve_rpyc() -> None:
    import rpyc
    from rpyc.utils.server import ThreadedServer

    bench = Bench(fan_out)

    class BenchService(rpyc.Service):  # type: ignore[misc]
        exposed_add = staticmethod(bench.add)
        exposed_add_listener = staticmethod(bench.add_listener)
        exposed_drive = staticmethod(bench.drive)

    config = {"allow_public_attrs": True, "sync_request_timeout": 120}
    server = ThreadedServer(BenchService, hostname="127.0.0.1", port=0, protocol_config=config)
    print(f"127.0.0.1:{server.port}", flush=True)
    server.start()


def serve_pyro() -> None:
    import Pyro5.api

    Pyro5.config.THREADPOOL_SIZE = 256  # 64 callers, and the fan-out's consumers
    bench = Bench(fan_out)

    @Pyro5.api.expose
    @Pyro5.api.behavior(instance_mode="single")
    class PyroBench:
        def add(self, a: int, b: int) -> int:
            return a + b

        def add_listener(self, listener: Any) -> None:
            bench.add_listener(listener)

        def drive(self, listeners: int, warmup: float, seconds: float) -> str:
            return bench.drive(listeners, warmup, seconds)

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    uri = daemon.register(PyroBench(), "bench")
    print(uri, flush=True)
    daemon.requestLoop()


# --------------------------------------------------------------- consumers


def _rpyc_connect(address: str) -> Any:
    import rpyc

    host, port = address.rsplit(":", 1)
    config = {"allow_public_attrs": True, "sync_request_timeout": 120}
    return rpyc.connect(host, int(port), config=config)


class RpycListener:
    """What the RPyC consumer passes: arrives on the provider as a netref."""

    def changed(self, msg: int) -> int:
        return msg


def measure_peer(
    figure: str, address: str, warmup: float, duration: float, clients: int
) -> dict[str, Any]:
    """One peer figure, measured from this (consumer) process."""
    peer, kind = figure.split("-", 1)
    listeners = FANOUT_LISTENERS if kind == "fanout-1000" else 1
    per_client = listeners // (FANOUT_CLIENTS if listeners > 1 else 1)
    if peer == "rpyc":
        import rpyc

        if kind in ("seq", "64"):
            callers = 1 if kind == "seq" else CALLERS
            conns = [_rpyc_connect(address) for _ in range(callers)]
            local = threading.local()
            pool = itertools.cycle(conns)  # the timed threads take over the warm-up's
            lock = threading.Lock()

            def op(i: int) -> None:
                if not hasattr(local, "root"):
                    with lock:
                        local.root = next(pool).root
                if local.root.add(i, 1) != i + 1:
                    raise AssertionError("add answered wrong")

            drive_threads(op, callers, warmup)
            return drive_threads(op, callers, duration).to_json()
        conns = [_rpyc_connect(address) for _ in range(clients)]
        for conn in conns:
            rpyc.BgServingThread(conn)
        kept = []  # the listeners must outlive the run (netrefs do not keep them alive)
        for conn in conns:
            for _ in range(per_client):
                kept.append(RpycListener())
                conn.root.add_listener(kept[-1])
        return json.loads(conns[0].root.drive(listeners, warmup, duration))  # type: ignore[no-any-return]
    import Pyro5.api

    uri = address
    if kind in ("seq", "64"):
        callers = 1 if kind == "seq" else CALLERS
        local = threading.local()

        def op(i: int) -> None:
            if not hasattr(local, "proxy"):
                local.proxy = Pyro5.api.Proxy(uri)
            if local.proxy.add(i, 1) != i + 1:
                raise AssertionError("add answered wrong")

        drive_threads(op, callers, warmup)
        return drive_threads(op, callers, duration).to_json()

    Pyro5.config.SERVERTYPE = "multiplex"  # a daemon serves its 100 listeners' connections

    @Pyro5.api.expose
    class PyroListener:
        @Pyro5.api.callback
        def changed(self, msg: int) -> int:
            return msg

    daemons = [Pyro5.api.Daemon(host="127.0.0.1") for _ in range(clients)]
    for daemon in daemons:
        threading.Thread(target=daemon.requestLoop, daemon=True).start()
    for daemon in daemons:
        bench = Pyro5.api.Proxy(uri)
        for _ in range(per_client):
            listener = PyroListener()
            daemon.register(listener)
            bench.add_listener(listener)  # passed as a proxy to the registered object
    return json.loads(Pyro5.api.Proxy(uri).drive(listeners, warmup, duration))  # type: ignore[no-any-return]


# --------------------------------------------------------------- the run

PEER_FIGURES = [
    f"{peer}-{kind}"
    for peer in ("rpyc", "pyro")
    for kind in ("seq", "64", "callback", "fanout-1000")
]

#: (scenario, metric, backchannel figures (on grpcio) with their labels, the peers' kind);
#: each backchannel figure is measured on both transports (its FAST twin)
SCENARIOS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    ("sequential call (µs/call)", "latency", [("sync Client", "bc-sync-seq")], "seq"),
    (
        f"{CALLERS} concurrent callers (calls/s)",
        "throughput",
        [
            ("64 threads, one sync Client", "bc-sync-64"),
            ("64 tasks, one AsyncClient", "bc-async-64"),
        ],
        "64",
    ),
    ("callback round trip (µs/callback)", "latency", [("", "bc-callback-seq")], "callback"),
    (
        f"fan-out, {FANOUT_LISTENERS:,} listeners (callbacks/s)",
        "throughput",
        [
            ("a task per listener", "bc-fanout-1000"),
            ("backchannel.gather", "bc-fanout-1000-gather"),
        ],
        "fanout-1000",
    ),
]

#: the fast transport's targets against Pyro5: its figure -> ratio (<= for µs, >= for
#: calls/s; backchannel ÷ Pyro5)
TARGETS = {
    "bc-sync-seq" + FAST: 1.0,
    "bc-callback-seq" + FAST: 1.0,
    "bc-fanout-1000-gather" + FAST: 12.0,
}


@contextlib.contextmanager
def peer_provider(peer: str) -> Iterator[str]:
    """Run ``peer``'s provider process (this script's ``serve``); yield its address."""
    with serving(
        [sys.executable, str(Path(__file__)), "serve", peer], f"the {peer} provider"
    ) as address:
        yield address


def measure(figure: str, warmup: float, duration: float) -> dict[str, float]:
    """A peer figure in a fresh provider process and fresh consumer process(es)."""
    if not figure.startswith(("rpyc-", "pyro-")):
        return measure_backchannel(figure, warmup, duration, None)
    fan_out = figure.endswith("fanout-1000")
    processes = FANOUT_PROCESSES if fan_out else 1
    clients = FANOUT_CLIENTS // FANOUT_PROCESSES if fan_out else 1
    deadline = time.monotonic() + 40 + 2 * (warmup + duration)
    with peer_provider(figure.split("-")[0]) as address, contextlib.ExitStack() as stack:
        command = [sys.executable, str(Path(__file__)), "measure", figure, address]
        command += ["--warmup", str(warmup), "--duration", str(duration)]
        command += ["--clients", str(clients)]
        runs = [stack.enter_context(consumer(command)) for _ in range(processes)]
        return consumers_result(figure, runs, deadline)


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "failed"
    return f"{value:,.1f} µs" if metric == "latency" else f"{value:,.0f}/s"


def _target(name: str, metric: str, ratio: float | None) -> tuple[str, str]:
    """The target of backchannel's figure ``name`` against Pyro5, and whether it is met."""
    if name not in TARGETS:
        return "", ""
    target = TARGETS[name]
    text = f"<= {target:.2f}x" if metric == "latency" else f">= {target:g}x"
    text += " Pyro5"
    if ratio is None:
        return text, "NOT met (a figure failed)"
    met = ratio <= target if metric == "latency" else ratio >= target
    return text, "met" if met else "NOT met"


def rows(results: dict[str, dict[str, float]]) -> list[list[str]]:
    table = []
    for scenario, metric, ours, kind in SCENARIOS:
        key = "mean_us" if metric == "latency" else "calls_per_second"
        peers = [results.get(f"{peer}-{kind}", {}).get(key) for peer in ("rpyc", "pyro")]
        for label, base in ours:
            for name, transport in ((base, GRPCIO), (base + FAST, FAST_NAME)):
                value = results.get(name, {}).get(key)
                ratios = [None if not peer or value is None else value / peer for peer in peers]
                row = [f"{scenario}{', ' + label if label else ''}", transport]
                row += [_fmt(value, metric), *(_fmt(peer, metric) for peer in peers)]
                row += [f"{ratio:.2f}x" if ratio else "-" for ratio in ratios]
                table.append([*row, *_target(name, metric, ratios[1])])
    return table


HEADER = ["scenario", "transport", "backchannel", "RPyC", "Pyro5", "bc ÷ RPyC", "bc ÷ Pyro5"]
HEADER += ["target", "met?"]


def write_section(table: str, rounds: int, warmup: float, duration: float) -> None:
    """Put this run's table in docs/performance.md's section, before Bulk data."""
    import Pyro5
    import rpyc

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = f"""{SECTION}

Generated by `{COMMAND}` (run by `make bench` after `bench/run.py`) on {now}, with
RPyC {rpyc.__version__} and Pyro5 {Pyro5.__version__}: the median of {rounds} rounds,
the peers' figures interleaved with backchannel's, each figure in fresh processes on
127.0.0.1, warmed up for {warmup:g} s and timed for {duration:g} s. Ratios are
backchannel ÷ peer: for µs lower is better, for calls/s higher is better. backchannel is
measured on both transports, {GRPCIO} and {FAST_NAME} (the fast transport, whose targets
against Pyro5 are the last columns). How each peer is driven is in the docstring of
`bench/peers.py`; backchannel's figures are those of the tables above, measured again
here (`bc-sync-64` is the sync-Client counterpart of b).

{table}

"""
    page = DOC.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## )", re.S | re.M)
    if SECTION in page:
        page = pattern.sub(lambda _: text, page, count=1)
    else:
        at = page.index("## Bulk data") if "## Bulk data" in page else len(page)
        page = page[:at] + text + page[at:]
    DOC.write_text(page, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("peer", choices=["rpyc", "pyro"])
    one = sub.add_parser("measure")
    one.add_argument("figure", choices=PEER_FIGURES)
    one.add_argument("address")
    one.add_argument("--clients", type=int, default=1)
    for each in (one, parser):
        each.add_argument("--warmup", type=float, default=0.5)
        each.add_argument("--duration", type=float, default=2.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    if args.command == "serve":
        serve_rpyc() if args.peer == "rpyc" else serve_pyro()
        return
    if args.command == "measure":
        result = measure_peer(args.figure, args.address, args.warmup, args.duration, args.clients)
        print(json.dumps(result), flush=True)
        return
    figures = []
    for _scenario, _metric, ours, kind in SCENARIOS:
        figures += [name + twin for _label, name in ours for twin in ("", FAST)]
        figures += [f"rpyc-{kind}", f"pyro-{kind}"]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in figures}
    for round_number in range(1, args.rounds + 1):
        for name in figures:
            print(f"round {round_number}: measuring {name} ...", file=sys.stderr, flush=True)
            try:
                runs[name].append(measure(name, args.warmup, args.duration))
            except RuntimeError as exc:  # a peer that cannot do a scenario: say so, go on
                print(f"{name} failed: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
    results = {name: median_run(found) for name, found in runs.items() if found}
    table = markdown_table(HEADER, rows(results))
    print(table)
    if not args.no_doc:
        write_section(table, args.rounds, args.warmup, args.duration)
        print(f"\nwritten to {DOC.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
