"""The backchannel benchmark suite (``make bench``).

Every figure runs in fresh processes on 127.0.0.1: a provider (``bench/provider.py``,
which prints its address) and a consumer (``bench/consumer.py``, which warms up, times
calls for a fixed duration and prints JSON), or several consumers at once for the
fan-out figures. The callback figures are timed in the provider, which pushes; its
consumers print what it measured. Each backchannel figure is compared with a raw grpcio
figure measured in the same run. The table is printed and written, with the machine's
details, to ``docs/performance.md``.

``--profile DIR`` runs both processes under cProfile and saves ``DIR/FIGURE-{provider,
consumer}.prof`` (only the main thread is profiled: the sync Client's loop thread is not).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import google.protobuf
import grpc
from common import FANOUT_CLIENTS, FANOUT_LISTENERS, RAW_CALLBACK_PAYLOAD, RAW_PAYLOAD
from consumer import FANOUT_PROCESSES, FIGURES

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "performance.md"
COMMAND = "make bench"
BULK_SECTION = "## Bulk data"
PEERS_SECTION = "## Against RPyC and Pyro5"


@dataclass(frozen=True)
class Scenario:
    """A backchannel figure next to its raw grpc counterpart, and the target ratio."""

    label: str
    backchannel: str
    raw: str
    #: "latency" compares mean µs per call (lower is better), "throughput" calls/s
    metric: str
    #: ``ratio <= target`` for latency, ``ratio >= target`` for throughput
    target: float
    explanation: str
    #: throughput only: backchannel's figure must also reach this many calls/s
    floor: float | None = None

    def value(self, result: dict[str, float]) -> float:
        """The scenario's metric out of one figure's measurement."""
        return result["mean_us"] if self.metric == "latency" else result["calls_per_second"]

    def met(self, ratio: float, ours: float) -> bool:
        """Whether ``ratio`` (backchannel / raw) and backchannel's figure meet the target."""
        if self.metric == "latency":
            return ratio <= self.target
        return ratio >= self.target and (self.floor is None or ours >= self.floor)

    def target_text(self) -> str:
        """The target in words, as the table shows it."""
        if self.metric == "latency":
            return f"<= {self.target:.2f}x"
        floor = "" if self.floor is None else f", >= {self.floor / 1000:g}k/s"
        return f">= {self.target:.1f}x{floor}"


SCENARIOS = [
    Scenario(
        "a. async sequential round trip (µs/call)",
        "bc-async-seq",
        "raw-aio-pingpong",
        "latency",
        1.2,
        "One asyncio task awaits `calc.add(i, 1)` (an `async def` method) in a loop on one "
        "`AsyncClient`; raw grpc.aio writes one message on a bidi stream and reads one back "
        "in a loop. The figure is the mean latency per call.",
    ),
    Scenario(
        "b. async 64 callers, one client (calls/s)",
        "bc-async-64",
        "raw-aio-unary-64",
        "throughput",
        10.0,
        "64 asyncio tasks call `add` concurrently on ONE `AsyncClient` (one stream; frames "
        "that are ready together are batched); raw grpc.aio runs 64 tasks making unary "
        "calls on one channel. The figure is calls per second.",
    ),
    Scenario(
        "c. sync sequential, async def (µs/call)",
        "bc-sync-seq",
        "raw-sync-seq",
        "latency",
        1.0,
        "One thread calls `add` in a loop through the sync `Client` (a background event "
        "loop thread); raw sync grpc (`grpc.insecure_channel`, `unary_unary`) makes unary "
        "calls in a loop. Target: no slower.",
    ),
    Scenario(
        "c. sync sequential, def (µs/call)",
        "bc-sync-seq-def",
        "raw-sync-seq",
        "latency",
        1.0,
        "As above, but the provider method is a plain `def`, which backchannel runs in the "
        "provider's thread pool.",
    ),
    Scenario(
        "c. sync 8 threads, async def (calls/s)",
        "bc-sync-8",
        "raw-sync-8",
        "throughput",
        1.5,
        "8 threads share one sync `Client`; raw sync grpc runs 8 threads making unary calls "
        "on one channel. The figure is calls per second.",
    ),
    Scenario(
        "c. sync 8 threads, def (calls/s)",
        "bc-sync-8-def",
        "raw-sync-8",
        "throughput",
        1.5,
        "As above, with the plain `def` provider method.",
    ),
    Scenario(
        "d. callback round trip (µs/callback)",
        "bc-callback-seq",
        "raw-push-pingpong",
        "latency",
        1.2,
        "The consumer (one `AsyncClient`) adds one listener, whose `async def changed(msg)` "
        "returns `msg`, with a forward call (`addListener`), then calls `drive`; the "
        "provider then awaits `listener.changed(i)` in a loop and checks each answer, "
        "timing on the provider (provider -> consumer -> provider). Raw grpc.aio is "
        "server-push ping-pong on a bidi stream: the server handler writes one message "
        "and reads the client's reply, in a loop, timing on the server; the client echoes. "
        "The figure is the mean latency per callback.",
    ),
    Scenario(
        f"e. fan-out, {FANOUT_LISTENERS:,} listeners (callbacks/s)",
        "bc-fanout-1000",
        "raw-fanout-1000",
        "throughput",
        10.0,
        f"One provider calls back {FANOUT_LISTENERS:,} listeners spread over "
        f"{FANOUT_CLIENTS} `AsyncClient`s ({FANOUT_LISTENERS // FANOUT_CLIENTS} each, "
        f"in {FANOUT_PROCESSES} consumer processes of {FANOUT_CLIENTS // FANOUT_PROCESSES} "
        "clients rather than ten processes: on a 2-core machine ten Python processes, each "
        "with its own event loop and gRPC threads, crowd out the provider and lower both "
        "figures, raw grpc's most), with one task per listener awaiting "
        f"`listener.changed(i)` back to back, so {FANOUT_LISTENERS:,} callbacks are "
        "outstanding at all times. The "
        "baseline is one gRPC message per callback: raw grpc.aio where the server pushes "
        f"one message per callback to each of {FANOUT_CLIENTS} client streams (one "
        "channel each, in the same processes) and each client answers one message per "
        "message, with the same tasks and outstanding count. Both are timed in the "
        "server. The figure is callbacks finished per second; the target is also an "
        "absolute one.",
        floor=50_000.0,
    ),
    Scenario(
        f"e. fan-out, {FANOUT_LISTENERS:,} listeners, gather (callbacks/s)",
        "bc-fanout-1000-gather",
        "raw-fanout-1000",
        "throughput",
        10.0,
        "As e, but the provider notifies all the listeners at once from one task, in "
        "rounds of `await backchannel.gather(listener.changed(i) for listener in "
        "listeners)`; each callback's latency is its round's. The baseline is the same.",
        floor=50_000.0,
    ),
]


#: the tracing figures (64 callers, as scenario b): OpenTelemetry's state, the figure
TRACING = [
    ("not installed", "bc-async-64-otel-absent"),
    ("installed, no provider configured", "bc-async-64-otel-no-provider"),
    ("SDK, spans dropped by a no-op exporter", "bc-async-64-otel-sdk"),
]
TRACING_HEADER = ["OpenTelemetry", "calls/s", "vs not installed", "time per call"]

#: the cluster figures (64 callers, as scenario b): how the client was given providers
CLUSTER = [
    ("one address (no choice to make)", "bc-async-64"),
    ("`static://` list of 1 provider (the cluster path)", "bc-async-64-cluster-1"),
    ("`static://` list of 3 providers, `random`", "bc-async-64-cluster-3"),
]
CLUSTER_HEADER = ["providers", "calls/s", "vs one address", "time per call"]
RELATIVE_TABLES = [(TRACING_HEADER, TRACING), (CLUSTER_HEADER, CLUSTER)]


def relative_rows(
    table: list[tuple[str, str]], results: dict[str, dict[str, float]]
) -> list[list[str]]:
    """A table of throughputs relative to its first row's: calls/s, the ratio, and the
    time per call as a percentage more (or less) than the first row's."""
    base = results[table[0][1]]["calls_per_second"]
    rows = []
    for label, name in table:
        rate = results[name]["calls_per_second"]
        row = [label, _fmt(rate, "throughput"), f"{rate / base:.3f}x", f"{base / rate - 1:+.1%}"]
        rows.append(row)
    return rows


def _python(
    script: str, *args: str, profile: Path | None, name: str, tracing: str = ""
) -> list[str]:
    """The command line running ``bench/script`` (under cProfile when ``profile``; with
    OpenTelemetry in the state ``tracing`` names, through bench/tracing.py, if any)."""
    command = [sys.executable]
    if profile is not None:
        command += ["-m", "cProfile", "-o", str(profile / f"{name}.prof")]
    if tracing:
        command += [str(HERE / "tracing.py"), tracing]
    return [*command, str(HERE / script), *args]


@contextlib.contextmanager
def provider(kind: str, profile: Path | None, name: str, tracing: str = "") -> Iterator[str]:
    """Run a provider process of ``kind`` (its profile saved as ``name``-provider, with
    OpenTelemetry in the state ``tracing``); yield the address it printed; stop it."""
    name = f"{name}-provider"
    command = _python("provider.py", kind, profile=profile, name=name, tracing=tracing)
    with serving(command, f"the {kind} provider") as address:
        yield address


@contextlib.contextmanager
def serving(command: list[str], what: str) -> Iterator[str]:
    """Run a provider process (``what``, for the error); yield the address it prints
    first; stop it (terminate, then kill after 10 s) on the way out."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"{what} exited with {process.wait()}")
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def consumer(command: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run one consumer process, its output in a temporary directory; kill it if it is
    still running on the way out (a failed or timed-out figure)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp)
        with (out / "stdout").open("wb") as stdout, (out / "stderr").open("wb") as stderr:
            process = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        try:
            yield process, out
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


def measure(figure: str, warmup: float, duration: float, profile: Path | None) -> dict[str, float]:
    """Measure one figure in a fresh provider process and fresh consumer process(es)."""
    processes, cluster = FIGURES[figure].processes, FIGURES[figure].cluster
    args = [figure, "", "--warmup", str(warmup), "--duration", str(duration)]
    deadline = time.monotonic() + 60 + warmup + duration
    with contextlib.ExitStack() as stack:
        kind, tracing = FIGURES[figure].provider, FIGURES[figure].tracing
        names = [f"{figure}{n if cluster > 1 else ''}" for n in range(max(cluster, 1))]
        addresses = [stack.enter_context(provider(kind, profile, n, tracing)) for n in names]
        args[1] = "static://" + ",".join(addresses) if cluster else addresses[0]
        runs = []
        for n in range(processes):
            name = f"{figure}-consumer{n if processes > 1 else ''}"
            command = _python("consumer.py", *args, profile=profile, name=name, tracing=tracing)
            runs.append(stack.enter_context(consumer(command)))
        # with several consumers each prints the same Measurement, the provider's
        return consumers_result(figure, runs, deadline)


def consumers_result(
    figure: str, runs: list[tuple[subprocess.Popen[bytes], Path]], deadline: float
) -> dict[str, float]:
    """Wait (until ``deadline``) for a figure's consumer processes; the last line of
    JSON the first one printed."""
    for process, out in runs:
        try:
            code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"a consumer for {figure} timed out") from None
        if code != 0:
            stderr = (out / "stderr").read_text(errors="replace")
            raise RuntimeError(f"consumer for {figure} exited with {code}:\n{stderr}")
    stdout = (runs[0][1] / "stdout").read_text()
    result: dict[str, float] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _fmt(value: float, metric: str) -> str:
    """A figure for the table: µs with one decimal, calls/s as a whole number."""
    return f"{value:,.1f} µs" if metric == "latency" else f"{value:,.0f}/s"


def summary_rows(results: dict[str, dict[str, float]]) -> list[list[str]]:
    """The main table: scenario, both figures, ratio, target, met."""
    rows = []
    for s in SCENARIOS:
        ours, raw = s.value(results[s.backchannel]), s.value(results[s.raw])
        ratio = ours / raw
        met = "met" if s.met(ratio, ours) else "NOT met"
        row = [s.label, _fmt(ours, s.metric), _fmt(raw, s.metric), f"{ratio:.2f}x"]
        rows.append([*row, s.target_text(), met])
    return rows


def detail_rows(results: dict[str, dict[str, float]]) -> list[list[str]]:
    """Every figure's raw numbers."""
    return [
        [
            name,
            str(FIGURES[name].concurrency),
            f"{r['calls']:,.0f}",
            f"{r['calls_per_second']:,.0f}",
            f"{r['mean_us']:,.1f}",
            f"{r['p50_us']:,.1f}",
            f"{r['p99_us']:,.1f}",
        ]
        for name, r in results.items()
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table, columns padded for plain-text reading too."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


SUMMARY_HEADER = ["scenario", "backchannel", "raw grpc", "ratio", "target", "met?"]
DETAIL_HEADER = ["figure", "callers", "calls", "calls/s", "mean µs", "p50 µs", "p99 µs"]


def revision() -> str:
    """The git commit measured, marked when the working tree has uncommitted changes."""
    try:
        git = ["git", "-C", str(HERE.parent)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True)
    except OSError:
        return "unknown"
    text = commit.stdout.decode().strip() or "unknown"
    return f"{text} + uncommitted changes in src/" if dirty.stdout.strip() else text


def machine() -> list[str]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    return [
        f"nproc: {os.cpu_count()} ({cpu})",
        f"OS: {platform.platform()}",
        f"Python: {platform.python_version()} ({platform.python_implementation()})",
        f"grpcio: {grpc.__version__}, protobuf: {google.protobuf.__version__}",
        f"backchannel: git {revision()}",
    ]


def write_doc(
    results: dict[str, dict[str, float]], warmup: float, duration: float, rounds: int
) -> None:
    """Overwrite docs/performance.md with this run's tables."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    scenarios = "\n".join(f"- **{s.label}**: {s.explanation}" for s in SCENARIOS)
    text = f"""# Performance

Generated by `{COMMAND}` (`bench/run.py`) on {now}; every run overwrites this file.

{markdown_table(SUMMARY_HEADER, summary_rows(results))}

Ratio is backchannel / raw grpc of the scenario's figure: for µs/call lower is better
(target `<=`), for calls/s higher is better (target `>=`; a `k/s` target is also a floor
for backchannel's own figure). Each figure is the median of {rounds} runs, interleaved
with the raw figures (`--rounds`); single runs on this small shared machine vary by
2-3x, so compare ratios rather than absolute figures. Where a target is not met, what
limits it and what was tried is in [performance-notes.md](performance-notes.md).

## How it is measured

- Every figure runs in a fresh provider process (`bench/provider.py`) and a fresh consumer
  process (`bench/consumer.py`), both on 127.0.0.1 with an ephemeral port.
- The consumer warms up for {warmup:g} s, then calls back to back for {duration:g} s; the
  figure is the mean latency of the calls (sequential scenarios) or the calls finished per
  second (concurrent scenarios).
- backchannel calls `Calculator.add(i, 1)` and checks the answer; the provider method is
  `async def` unless the scenario says `def`. Raw grpc uses generic handlers (no generated
  stubs) on a grpc.aio server that echoes bytes the size of backchannel's call frame
  ({len(RAW_PAYLOAD)} bytes), without parsing them: the cheapest possible gRPC round trip.
- The callback scenarios (d, e) are timed where the calls start, in the provider: the
  consumer registers its listeners with `CallbackBench.addListener` (a callback argument)
  and calls `CallbackBench.drive`, which waits until every listener is in, warms up for
  {warmup:g} s and times callbacks for {duration:g} s, then returns the same figures to
  every consumer, which prints them. The callbacks are made from a task of their own, as
  by a background pusher, not as children of the `drive` call. Raw grpc pushes the bytes
  of backchannel's callback frame ({len(RAW_CALLBACK_PAYLOAD)} bytes) and the client echoes
  them; its server times the same way. In the table below, "callers" of a callback figure
  are the provider's tasks, one per listener.

{scenarios}

Comparing two revisions: `python bench/ab.py BEFORE [AFTER]` measures the backchannel
figures of scenarios a, b, d and e on two git revisions in one run. Each revision is
exported with `git archive` and runs its own `bench/run.py` with its own `src/`, and the
rounds alternate which side goes first. It prints the ratio of the medians and the median
of the rounds' own ratios; the second is steadier here, since a round's two sides run back
to back under the same load.

## Tracing overhead

Scenario b (64 asyncio callers on one `AsyncClient`) with OpenTelemetry in three states,
both processes alike (`bench/tracing.py`); see [observability.md](observability.md).

{markdown_table(TRACING_HEADER, relative_rows(TRACING, results))}

## Several providers

Scenario b (64 asyncio callers on one `AsyncClient`) against one provider process given
as a plain address, the same provider given as a `static://` list (each call then takes
the cluster path: the directory, the availability check, failover bookkeeping; with one
provider the strategy has nothing to choose), and three provider processes, chosen per
call by `random`; see [cluster.md](cluster.md). "time per call" is how much longer each
call takes than with the plain address. `python bench/loadbalance.py` (also run by
`make bench`) times the choice alone.

{markdown_table(CLUSTER_HEADER, relative_rows(CLUSTER, results))}

## Machine

{chr(10).join(f"- {item}" for item in machine())}

## Every figure

{markdown_table(DETAIL_HEADER, detail_rows(results))}
"""
    # the peers' section (bench/peers.py) and Bulk data (bench/bulk.py): kept as they are
    page = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    kept = [page.index(s) for s in (PEERS_SECTION, BULK_SECTION) if s in page]
    bulk = page[min(kept) :] if kept else ""
    DOC.write_text(text + ("\n" + bulk if bulk else ""), encoding="utf-8")


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median throughput (for one caller, also the median latency)."""
    ordered = sorted(runs, key=lambda run: run["calls_per_second"])
    return ordered[len(ordered) // 2]


def main() -> None:
    """Run the scenarios, print the table, write docs/performance.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds per figure")
    parser.add_argument("--duration", type=float, default=2.5, help="seconds per figure")
    parser.add_argument("--profile", type=Path, help="save cProfile output in this directory")
    parser.add_argument("--no-doc", action="store_true", help="do not write the docs page")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measure every figure this many times, interleaved, and keep the median run",
    )
    parser.add_argument(
        "--only", nargs="+", choices=sorted(FIGURES), help="measure just these figures"
    )
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    figures = args.only or list(
        dict.fromkeys(
            [
                *(n for s in SCENARIOS for n in (s.backchannel, s.raw)),
                *(name for _state, name in TRACING),
                *(name for _label, name in CLUSTER),
            ]
        )
    )
    # rounds interleave backchannel and raw figures, so a noisy moment on a shared
    # machine hits both sides of a ratio alike; the median run of each figure is kept
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in figures}
    for round_number in range(1, args.rounds + 1):
        for name in figures:
            print(f"round {round_number}: measuring {name} ...", file=sys.stderr, flush=True)
            runs[name].append(measure(name, args.warmup, args.duration, args.profile))
    results = {name: median_run(found) for name, found in runs.items()}
    if args.only:
        print(markdown_table(DETAIL_HEADER, detail_rows(results)))
        for header, table in RELATIVE_TABLES:
            if all(name in results for _label, name in table):
                print()
                print(markdown_table(header, relative_rows(table, results)))
        return
    print(markdown_table(SUMMARY_HEADER, summary_rows(results)))
    for header, table in RELATIVE_TABLES:
        print()
        print(markdown_table(header, relative_rows(table, results)))
    print()
    print(markdown_table(DETAIL_HEADER, detail_rows(results)))
    if not args.no_doc:
        write_doc(results, args.warmup, args.duration, args.rounds)
        print(f"\nwritten to {DOC.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
