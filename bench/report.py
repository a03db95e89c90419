"""What ``bench/run.py`` reports: the scenarios, their targets, the tables, and the page.

:data:`SCENARIOS` names each scenario's backchannel figure (on grpcio; its twin on the fast
transport, grpclib on uvloop, is the name + ``consumer.FAST``) and its raw baselines (raw
grpcio; raw grpclib, whose uvloop twin is the name + ``-uvloop``). :data:`TARGETS` are the
ratios the project holds itself to, each a backchannel figure against one baseline figure.
The tables are built from the figures' measurements (a figure that failed is "failed"),
and :func:`write_doc` writes them, with how they were measured, to docs/performance.md.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common import FANOUT_CLIENTS, FANOUT_LISTENERS, RAW_CALLBACK_PAYLOAD, RAW_PAYLOAD
from consumer import FANOUT_PROCESSES, FAST, FIGURES

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "performance.md"
COMMAND = "make bench"
BULK_SECTION = "## Bulk data"
PEERS_SECTION = "## Against RPyC and Pyro5"
#: the transports' names in the tables
GRPCIO, FAST_NAME = "grpcio", "grpclib+uvloop"

Results = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Scenario:
    """A backchannel figure on both transports, beside its raw baselines."""

    label: str
    #: the figure on grpcio; on the fast transport it is this + FAST
    backchannel: str
    #: "latency" compares mean µs per call (lower is better), "throughput" calls/s
    metric: str
    explanation: str
    #: the raw grpcio baseline (grpc.aio or sync grpc), if any
    raw: str | None
    #: the raw grpclib baseline on plain asyncio, if any; on uvloop it is this + "-uvloop"
    raw_grpclib: str | None

    @property
    def fast(self) -> str:
        """The figure on the fast transport."""
        return self.backchannel + FAST

    def value(self, results: Results, figure: str | None) -> float | None:
        """The scenario's metric of ``figure`` (None: no such figure, or it failed)."""
        if figure is None or figure not in results:
            return None
        key = "mean_us" if self.metric == "latency" else "calls_per_second"
        return results[figure][key]


def _fanout_text() -> str:
    return (
        f"One provider calls back {FANOUT_LISTENERS:,} listeners spread over "
        f"{FANOUT_CLIENTS} `AsyncClient`s ({FANOUT_LISTENERS // FANOUT_CLIENTS} each, "
        f"in {FANOUT_PROCESSES} consumer processes of {FANOUT_CLIENTS // FANOUT_PROCESSES} "
        "clients rather than ten processes: on a 2-core machine ten Python processes, each "
        "with its own event loop and gRPC threads, crowd out the provider and lower both "
        "figures, raw grpc's most), with one task per listener awaiting "
        f"`listener.changed(i)` back to back, so {FANOUT_LISTENERS:,} callbacks are "
        "outstanding at all times. The baseline is one gRPC message per callback: the raw "
        f"server pushes one message per callback to each of {FANOUT_CLIENTS} client streams "
        "(one channel each, in the same processes) and each client answers one message per "
        "message, with the same tasks and outstanding count. Both are timed in the server. "
        "The figure is callbacks finished per second."
    )


SCENARIOS = [
    Scenario(
        "a. async sequential round trip (µs/call)",
        "bc-async-seq",
        "latency",
        "One asyncio task awaits `calc.add(i, 1)` (an `async def` method) in a loop on one "
        "`AsyncClient`; raw grpc.aio and raw grpclib write one message on a bidi stream and "
        "read one back in a loop. The figure is the mean latency per call.",
        "raw-aio-pingpong",
        "raw-grpclib-pingpong",
    ),
    Scenario(
        "b. async 64 callers, one client (calls/s)",
        "bc-async-64",
        "throughput",
        "64 asyncio tasks call `add` concurrently on ONE `AsyncClient` (one stream; frames "
        "that are ready together are batched); raw grpc.aio and raw grpclib run 64 tasks "
        "making unary calls on one channel. The figure is calls per second.",
        "raw-aio-unary-64",
        "raw-grpclib-unary-64",
    ),
    Scenario(
        "b. async 64 callers, against pipelining (calls/s)",
        "bc-async-64",
        "throughput",
        "The same backchannel figures as b, against raw grpclib's 64 tasks pipelining "
        "calls on ONE bidi stream (each writes its message and waits for a reply; the "
        "server answers in order, so a reply settles the oldest waiter): one stream, as "
        "backchannel's, without the ids and frames.",
        None,
        "raw-grpclib-pipelined-64",
    ),
    Scenario(
        "c. sync sequential, async def (µs/call)",
        "bc-sync-seq",
        "latency",
        "One thread calls `add` in a loop through the sync `Client` (a background event "
        "loop thread); raw sync grpc (`grpc.insecure_channel`, `unary_unary`) makes unary "
        "calls in a loop (grpclib has no sync API). Target: no slower.",
        "raw-sync-seq",
        None,
    ),
    Scenario(
        "c. sync sequential, def (µs/call)",
        "bc-sync-seq-def",
        "latency",
        "As above, but the provider method is a plain `def`, which backchannel runs in the "
        "provider's thread pool.",
        "raw-sync-seq",
        None,
    ),
    Scenario(
        "c. sync 8 threads, async def (calls/s)",
        "bc-sync-8",
        "throughput",
        "8 threads share one sync `Client`; raw sync grpc runs 8 threads making unary calls "
        "on one channel. The figure is calls per second.",
        "raw-sync-8",
        None,
    ),
    Scenario(
        "c. sync 8 threads, def (calls/s)",
        "bc-sync-8-def",
        "throughput",
        "As above, with the plain `def` provider method.",
        "raw-sync-8",
        None,
    ),
    Scenario(
        "d. callback round trip (µs/callback)",
        "bc-callback-seq",
        "latency",
        "The consumer (one `AsyncClient`) adds one listener, whose `async def changed(msg)` "
        "returns `msg`, with a forward call (`addListener`), then calls `drive`; the "
        "provider then awaits `listener.changed(i)` in a loop and checks each answer, "
        "timing on the provider (provider -> consumer -> provider). Raw grpc.aio and raw "
        "grpclib are server-push ping-pong on a bidi stream: the server handler writes one "
        "message and reads the client's reply, in a loop, timing on the server; the client "
        "echoes. The figure is the mean latency per callback.",
        "raw-push-pingpong",
        "raw-grpclib-push-pingpong",
    ),
    Scenario(
        f"e. fan-out, {FANOUT_LISTENERS:,} listeners (callbacks/s)",
        "bc-fanout-1000",
        "throughput",
        _fanout_text(),
        "raw-fanout-1000",
        "raw-grpclib-fanout-1000",
    ),
    Scenario(
        f"e. fan-out, {FANOUT_LISTENERS:,} listeners, gather (callbacks/s)",
        "bc-fanout-1000-gather",
        "throughput",
        "As e, but the provider notifies all the listeners at once from one task, in "
        "rounds of `await backchannel.gather(listener.changed(i) for listener in "
        "listeners)`: the same method and argument to every listener, which gather sends "
        "as one multicast frame per consumer stream (see callbacks.md); each callback's "
        "latency is its round's. The baselines are the same.",
        "raw-fanout-1000",
        "raw-grpclib-fanout-1000",
    ),
]
#: each backchannel figure's first scenario (b's figures also serve "against pipelining")
_BY_FIGURE: dict[str, Scenario] = {}
for _scenario in SCENARIOS:
    _BY_FIGURE.setdefault(_scenario.backchannel, _scenario)


@dataclass(frozen=True)
class Target:
    """One target: a backchannel figure's ratio to a baseline figure, and/or a floor."""

    scenario: Scenario
    #: the figure on the fast transport (else on grpcio)
    fast: bool
    baseline: str
    #: the baseline in words, for the table
    against: str
    #: ``ratio <= this`` for latency, ``>=`` for throughput; None: no ratio target
    ratio: float | None
    #: throughput only: backchannel's own figure must reach this many calls/s
    floor: float | None = None

    @property
    def ours(self) -> str:
        """The backchannel figure the target is about."""
        return self.scenario.fast if self.fast else self.scenario.backchannel

    def met(self, ratio: float, ours: float) -> bool:
        """Whether ``ratio`` (ours / baseline) and our figure meet the target."""
        if self.scenario.metric == "latency":
            return self.ratio is None or ratio <= self.ratio
        if self.ratio is not None and ratio < self.ratio:
            return False
        return self.floor is None or ours >= self.floor

    def text(self) -> str:
        """The target in words, as the table shows it."""
        if self.scenario.metric == "latency":
            return f"<= {self.ratio:.2f}x"
        parts = [] if self.ratio is None else [f">= {self.ratio:.1f}x"]
        parts += [] if self.floor is None else [f">= {self.floor / 1000:g}k/s"]
        return ", ".join(parts)


def _targets() -> list[Target]:
    s = _BY_FIGURE
    fanout, gather = s["bc-fanout-1000"], s["bc-fanout-1000-gather"]
    return [
        # grpcio: the targets it had before this transport came (nothing slower than before)
        Target(s["bc-async-seq"], False, "raw-aio-pingpong", "raw grpc.aio", 1.2),
        Target(s["bc-async-64"], False, "raw-aio-unary-64", "raw grpc.aio", 10.0),
        Target(s["bc-sync-seq"], False, "raw-sync-seq", "raw sync grpcio", 1.0),
        Target(s["bc-sync-seq-def"], False, "raw-sync-seq", "raw sync grpcio", 1.0),
        Target(s["bc-sync-8"], False, "raw-sync-8", "raw sync grpcio", 1.5),
        Target(s["bc-sync-8-def"], False, "raw-sync-8", "raw sync grpcio", 1.5),
        Target(s["bc-callback-seq"], False, "raw-push-pingpong", "raw grpc.aio", 1.2),
        Target(fanout, False, "raw-fanout-1000", "raw grpc.aio", 10.0, floor=50_000.0),
        Target(gather, False, "raw-fanout-1000", "raw grpc.aio", 10.0, floor=50_000.0),
        # the fast transport (the peers' targets are in bench/peers.py's table)
        Target(s["bc-async-seq"], True, "raw-grpclib-pingpong-uvloop", f"raw {FAST_NAME}", 1.2),
        Target(s["bc-async-seq"], True, "bc-async-seq", f"backchannel on {GRPCIO}", 0.7),
        Target(s["bc-async-64"], True, "raw-aio-unary-64", "raw grpc.aio", 12.0, floor=60_000.0),
        Target(gather, True, "raw-grpclib-fanout-1000-uvloop", f"raw {FAST_NAME}", None, 100_000.0),
    ]


TARGETS = _targets()

#: the tracing figures (64 callers, as scenario b, on grpcio): OpenTelemetry's state
TRACING = [
    ("not installed", "bc-async-64-otel-absent"),
    ("installed, no provider configured", "bc-async-64-otel-no-provider"),
    ("SDK, spans dropped by a no-op exporter", "bc-async-64-otel-sdk"),
]
TRACING_HEADER = ["OpenTelemetry", "calls/s", "vs not installed", "time per call"]

#: the cluster figures (64 callers, as scenario b, on grpcio): how providers were given
CLUSTER = [
    ("one address (no choice to make)", "bc-async-64"),
    ("`static://` list of 1 provider (the cluster path)", "bc-async-64-cluster-1"),
    ("`static://` list of 3 providers, `random`", "bc-async-64-cluster-3"),
]
CLUSTER_HEADER = ["providers", "calls/s", "vs one address", "time per call"]
RELATIVE_TABLES = [(TRACING_HEADER, TRACING), (CLUSTER_HEADER, CLUSTER)]


def default_figures() -> list[str]:
    """What a full run measures, in order: every scenario's figures on both transports
    and its raw baselines, then the tracing and cluster figures (on grpcio)."""
    names: list[str] = []
    for s in SCENARIOS:
        names += [s.backchannel, s.fast]
        names += [] if s.raw is None else [s.raw]
        names += [] if s.raw_grpclib is None else [s.raw_grpclib, s.raw_grpclib + "-uvloop"]
    names += [name for _label, name in TRACING] + [name for _label, name in CLUSTER]
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- tables


def fmt(value: float | None, metric: str) -> str:
    """A figure for a table: µs with one decimal, calls/s as a whole number."""
    if value is None:
        return "failed"
    return f"{value:,.1f} µs" if metric == "latency" else f"{value:,.0f}/s"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "-" if ours is None or theirs is None else f"{ours / theirs:.2f}x"


def _cell(value: float | None, figure: str | None, metric: str) -> str:
    """A baseline's cell: "-" where the scenario has no such baseline."""
    return "-" if figure is None else fmt(value, metric)


OVERVIEW_HEADER = [
    "scenario",
    GRPCIO,
    FAST_NAME,
    f"{FAST_NAME} ÷ {GRPCIO}",
    "raw grpcio",
    "raw grpclib",
    f"raw {FAST_NAME}",
    f"{FAST_NAME} ÷ raw {FAST_NAME}",
]


def overview_rows(results: Results) -> list[list[str]]:
    """One row per scenario: backchannel on both transports, the raw baselines, ratios."""
    rows = []
    for s in SCENARIOS:
        ours, fast = s.value(results, s.backchannel), s.value(results, s.fast)
        raw_lib = s.value(results, s.raw_grpclib)
        raw_fast = s.value(results, s.raw_grpclib and s.raw_grpclib + "-uvloop")
        raw = s.value(results, s.raw)
        rows.append(
            [
                s.label,
                fmt(ours, s.metric),
                fmt(fast, s.metric),
                _ratio(fast, ours),
                _cell(raw, s.raw, s.metric),
                _cell(raw_lib, s.raw_grpclib, s.metric),
                _cell(raw_fast, s.raw_grpclib, s.metric),
                _ratio(fast, raw_fast),
            ]
        )
    return rows


TARGETS_HEADER = ["scenario", "transport", "backchannel", "against", "its figure", "ratio"]
TARGETS_HEADER += ["target", "met?"]


def target_rows(results: Results) -> list[list[str]]:
    """One row per target: the two figures, their ratio, the target, met or not."""
    rows = []
    for t in TARGETS:
        metric = t.scenario.metric
        ours, theirs = t.scenario.value(results, t.ours), t.scenario.value(results, t.baseline)
        if ours is None or theirs is None:
            met = "NOT met (a figure failed)"
        else:
            met = "met" if t.met(ours / theirs, ours) else "NOT met"
        transport = FAST_NAME if t.fast else GRPCIO
        row = [t.scenario.label, transport, fmt(ours, metric), t.against, fmt(theirs, metric)]
        rows.append([*row, _ratio(ours, theirs), t.text(), met])
    return rows


def relative_rows(table: list[tuple[str, str]], results: Results) -> list[list[str]]:
    """A table of throughputs relative to its first row's: calls/s, the ratio, and the
    time per call as a percentage more (or less) than the first row's."""
    base = results.get(table[0][1], {}).get("calls_per_second")
    rows = []
    for label, name in table:
        rate = results.get(name, {}).get("calls_per_second")
        if rate is None or base is None:
            rows.append([label, fmt(rate, "throughput"), "-", "-"])
            continue
        row = [label, fmt(rate, "throughput"), f"{rate / base:.3f}x", f"{base / rate - 1:+.1%}"]
        rows.append(row)
    return rows


DETAIL_HEADER = ["figure", "callers", "calls", "calls/s", "mean µs", "p50 µs", "p99 µs"]


def detail_rows(results: Results, failed: Sequence[str] = ()) -> list[list[str]]:
    """Every figure's raw numbers (and a row for each figure that failed every round)."""
    rows = [
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
    failures = [[name, str(FIGURES[name].concurrency), *["failed"] * 5] for name in failed]
    return rows + failures


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table, columns padded for plain-text reading too."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def print_tables(results: Results, failed: list[str], everything: bool) -> None:
    """Print the tables the figures measured allow (``everything``: all of them)."""
    if everything:
        print(markdown_table(OVERVIEW_HEADER, overview_rows(results)))
        print()
        print(markdown_table(TARGETS_HEADER, target_rows(results)))
        print()
    for header, table in RELATIVE_TABLES:
        if everything or all(name in results for _label, name in table):
            print(markdown_table(header, relative_rows(table, results)))
            print()
    print(markdown_table(DETAIL_HEADER, detail_rows(results, failed)))


# ---------------------------------------------------------------- the page


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


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> list[str]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    libraries = ("grpcio", "grpclib", "h2", "uvloop", "protobuf")
    return [
        f"nproc: {os.cpu_count()} ({cpu})",
        f"OS: {platform.platform()}",
        f"Python: {platform.python_version()} ({platform.python_implementation()})",
        ", ".join(f"{name}: {_version(name)}" for name in libraries),
        f"backchannel: git {revision()}",
    ]


def write_doc(
    results: Results, failed: list[str], warmup: float, duration: float, rounds: int
) -> None:
    """Overwrite docs/performance.md with this run's tables (keeping the peers' and the
    bulk sections, which their own scripts write)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    scenarios = "\n".join(f"- **{s.label}**: {s.explanation}" for s in SCENARIOS)
    text = f"""# Performance

Generated by `{COMMAND}` (`bench/run.py`) on {now}; every run overwrites this file.

backchannel on its two transports, **{GRPCIO}** (`grpc.aio`, the default) and
**{FAST_NAME}** (`transport="grpclib"` with the process's event loop on uvloop: the fast
transport), beside the raw libraries' cheapest round trips:

{markdown_table(OVERVIEW_HEADER, overview_rows(results))}

The targets:

{markdown_table(TARGETS_HEADER, target_rows(results))}

Ratio is backchannel / the figure it is compared with: for µs/call lower is better
(target `<=`), for calls/s higher is better (target `>=`; a `k/s` target is a floor for
backchannel's own figure). The fast transport's targets against RPyC and Pyro5 are in
[the peers' table](#against-rpyc-and-pyro5). Each figure is the median of {rounds} runs,
all figures interleaved round by round, both transports and the raw ones alike
(`--rounds`); single runs on this small shared machine vary by 2-3x, so compare ratios
rather than absolute figures. Where a target is not met, what limits it and what was
tried is in [performance-notes.md](performance-notes.md).

## How it is measured

- Every figure runs in a fresh provider process (`bench/provider.py`) and a fresh consumer
  process (`bench/consumer.py`), both on 127.0.0.1 with an ephemeral port.
- Both processes of a figure run on one transport and one event loop, which
  `bench/run.py` sets in their environment: `BACKCHANNEL_TRANSPORT` (every `Client` and
  `Server` made without `transport=` takes it) and `BENCH_LOOP` (`uvloop` installs
  uvloop's event loop policy first thing, so `asyncio.run` and the sync `Client`'s loop
  thread both run on it). A figure's name says which: `bc-...` on {GRPCIO} with asyncio,
  `bc-...{FAST}` on {FAST_NAME}, `raw-grpclib-...` on plain asyncio and
  `raw-grpclib-...-uvloop` on uvloop; the raw grpcio figures' processes on asyncio.
- The consumer warms up for {warmup:g} s, then calls back to back for {duration:g} s; the
  figure is the mean latency of the calls (sequential scenarios) or the calls finished per
  second (concurrent scenarios).
- backchannel calls `Calculator.add(i, 1)` and checks the answer; the provider method is
  `async def` unless the scenario says `def`. The raw figures echo bytes the size of
  backchannel's call frame ({len(RAW_PAYLOAD)} bytes) without parsing them: the cheapest
  possible gRPC round trip. Raw grpc.aio serves them with generic handlers (no generated
  stubs); raw grpclib with a handler mapping written by hand (`__mapping__` returning
  `grpclib.const.Handler`) and a codec that passes the bytes through
  (`bench/raw_grpclib.py`).
- The callback scenarios (d, e) are timed where the calls start, in the provider: the
  consumer registers its listeners with `CallbackBench.addListener` (a callback argument)
  and calls `CallbackBench.drive`, which waits until every listener is in, warms up for
  {warmup:g} s and times callbacks for {duration:g} s, then returns the same figures to
  every consumer, which prints them. The callbacks are made from a task of their own, as
  by a background pusher, not as children of the `drive` call. The raw servers push the
  bytes of backchannel's callback frame ({len(RAW_CALLBACK_PAYLOAD)} bytes) and the client
  echoes them; they time the same way (`bench/rawpush.py`, one code for both libraries).
  In the table below, "callers" of a callback figure are the provider's tasks, one per
  listener.

{scenarios}

Comparing two revisions: `python bench/ab.py BEFORE [AFTER]` measures the backchannel
figures of scenarios a, b, d and e on two git revisions in one run (on {GRPCIO}; their
`{FAST}` twins with `--only`, on revisions that have them). Each revision is exported
with `git archive` and runs its own `bench/run.py` with its own `src/`, and the rounds
alternate which side goes first. It prints the ratio of the medians and the median of
the rounds' own ratios; the second is steadier here, since a round's two sides run back
to back under the same load.

## Tracing overhead

Scenario b (64 asyncio callers on one `AsyncClient`, on {GRPCIO}) with OpenTelemetry in
three states, both processes alike (`bench/tracing.py`); see
[observability.md](observability.md).

{markdown_table(TRACING_HEADER, relative_rows(TRACING, results))}

## Several providers

Scenario b (64 asyncio callers on one `AsyncClient`, on {GRPCIO}) against one provider
process given as a plain address, the same provider given as a `static://` list (each
call then takes the cluster path: the directory, the availability check, failover
bookkeeping; with one provider the strategy has nothing to choose), and three provider
processes, chosen per call by `random`; see [cluster.md](cluster.md). "time per call" is
how much longer each call takes than with the plain address. `python bench/loadbalance.py`
(also run by `make bench`) times the choice alone.

{markdown_table(CLUSTER_HEADER, relative_rows(CLUSTER, results))}

## Machine

{chr(10).join(f"- {item}" for item in machine())}

## Every figure

{markdown_table(DETAIL_HEADER, detail_rows(results, failed))}
"""
    # the peers' section (bench/peers.py) and Bulk data (bench/bulk.py): kept as they are
    page = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    kept = [page.index(s) for s in (PEERS_SECTION, BULK_SECTION) if s in page]
    bulk = page[min(kept) :] if kept else ""
    DOC.write_text(text + ("\n" + bulk if bulk else ""), encoding="utf-8")
