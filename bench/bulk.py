"""The bulk-data benchmark (``make bench`` runs it after ``bench/run.py``, which keeps
the section this one writes).

Three measurements, each printed as a table and written to the "Bulk data" section of
``docs/performance.md``:

- **stages**: in this process, the cost of every step one echo of a payload goes through,
  timed on the library's own code paths and message classes: the consumer's codec encode,
  serialization, the provider's protobuf parse and codec
  decode, its codec encode, the serialization of its result, and the
  consumer's parse and decode. The payloads are a 150k-entry ``{str: str-or-int}`` map
  (~3.5 MB on the wire), the same data as JSON ``bytes``, and as a columnar protobuf
  message (two repeated string fields). Frames are written from serialized parts, as the
  library writes them (``backchannel.wire.frames``).
- **echo**: the wall time of ``echo(payload)`` through a sync ``Client``, against a
  provider process (sync ``Server`` or ``AsyncServer``) whose ``echo`` is a ``def`` or an
  ``async def`` method.
- **blocking**: the latency of another consumer's small calls (``add(i, 1)``, one at a
  time, on its own ``Client`` in its own process) while this process echoes the map back
  to back, and without the bulk echoes as a baseline.
- **listener results**: the same prober's latencies while the provider, back to back,
  calls a listener of this process that answers with a ~2.4 MB map (105k ``{str: int}``
  entries) or with the same number of bytes, and without that load; 3 rounds,
  interleaved. The provider decodes each answer it receives: on its event loop, every
  other stream (the prober's) waits it out.

``--profile DIR`` runs the AsyncServer provider of the blocking figure under cProfile (its
loop is the main thread) and saves ``DIR/bulk-provider.prof``.

Child modes (used by the parent): ``bulk.py provider sync|async`` prints its address and
serves until SIGTERM; ``bulk.py prober ADDRESS SECONDS`` prints ``ready``, then one line of
JSON with its latencies. ``--only listener`` measures just the listener figure (printed,
not written to the docs page: only a full run writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

import backchannel
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec
from backchannel.wire import frames as wire

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "performance.md"
SECTION = "## Bulk data"
COMMAND = "python bench/bulk.py"

ENTRIES = 150_000
ROUNDS = 3
#: a small call slower than this (ms) was held up by the bulk call
SLOW_MS = 50.0
#: entries of the listener's map answer: ~2.4 MB on the wire, the issue's figure
ANSWER_ENTRIES = 105_000


def _table_class() -> type[Message]:
    """``bench.bulk.Table``: the map's data as two columns (what a schema would send)."""
    file = descriptor_pb2.FileDescriptorProto(
        name="bench_bulk.proto", package="bench.bulk", syntax="proto3"
    )
    table = file.message_type.add(name="Table")
    for number, name in enumerate(("keys", "values"), start=1):
        table.field.add(
            name=name,
            number=number,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
        )
    pool = descriptor_pool.Default()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.bulk.Table"))


Table = _table_class()


def bulk_map(entries: int = ENTRIES) -> dict[str, object]:
    """The payload of the issue: ``{str: str-or-int}``, ~3.5 MB as a Value."""
    return {f"key-{i:06d}": (i if i % 2 else f"value-{i:06d}") for i in range(entries)}


def payloads() -> dict[str, Callable[[], object]]:
    """What is echoed, by name; each builds the same data in its own form."""
    data = bulk_map()
    return {
        "map": lambda: data,
        "json bytes": lambda: json.dumps(data).encode(),
        "protobuf message": lambda: Table(
            keys=list(data), values=[str(value) for value in data.values()]
        ),
    }


@backchannel.interface("bench.Bulk")
class Bulk:
    """The bulk service: echo a payload, or add two ints (the other consumer's call)."""

    def echo(self, value: object) -> object:
        """Return ``value``."""
        raise NotImplementedError

    def add(self, a: int, b: int) -> int:
        """a + b."""
        raise NotImplementedError


class SyncBulk:
    """``def`` methods: run in the provider's thread pool."""

    def echo(self, value: object) -> object:
        """Return ``value``."""
        return value

    def add(self, a: int, b: int) -> int:
        """a + b."""
        return a + b


class AsyncBulk:
    """``async def`` methods: run on the provider's loop."""

    async def echo(self, value: object) -> object:
        """Return ``value``."""
        return value

    async def add(self, a: int, b: int) -> int:
        """a + b."""
        return a + b


@backchannel.interface("bench.Answer")
class Answer:
    """A consumer's listener: answers the provider with a big value."""

    def table(self) -> object:
        """The big value."""
        raise NotImplementedError


class Answers(Answer):
    """Answers with the same value every time."""

    def __init__(self, value: object) -> None:
        self.value = value

    def table(self) -> object:
        """The value."""
        return self.value


def answers() -> dict[str, Answers]:
    """The listeners, by what they answer: the map, and as many bytes as its encoding."""
    data = {f"entry-{i:07d}": i for i in range(ANSWER_ENTRIES)}
    size = codec.encode(data, "").ByteSize()
    return {"map": Answers(data), "bytes": Answers(b"\x00" * size)}


@backchannel.interface("bench.Pull")
class Pull:
    """The provider calls the listener it is given and counts what it answered."""

    @backchannel.method(arguments=[backchannel.Argument(index=0)])
    def pull(self, answer: Answer) -> int:
        """len(answer.table())."""
        raise NotImplementedError


class SyncPull:
    """A ``def`` method: its pool thread waits for the listener's answer."""

    def pull(self, answer: Any) -> int:
        """len(answer.table())."""
        return len(answer.table())


class AsyncPull:
    """An ``async def`` method: awaits the listener's answer on the loop."""

    async def pull(self, answer: Any) -> int:
        """len(await answer.table())."""
        return len(await answer.table())


# ------------------------------------------------------------------ stages


def best_ms(step: Callable[[], object], rounds: int = ROUNDS) -> tuple[float, Any]:
    """The fastest of ``rounds`` runs of ``step`` in ms, and what it returned."""
    best, out = float("inf"), None
    for _ in range(rounds):
        began = time.perf_counter()
        out = step()
        best = min(best, time.perf_counter() - began)
    return best * 1e3, out


def stages(name: str, make: Callable[[], object]) -> dict[str, float]:
    """The cost in ms of every step of one echo of a payload, and its size in MB."""
    obj = make()
    where = "bench"
    out: dict[str, float] = {}

    def into_call() -> pb.Call:  # as the client does: the arguments encoded in place
        call = pb.Call(id=1, service="bench.Bulk", method="echo")
        codec.encode_args([obj], (), where, None, call.args)
        return call

    out["consumer encode"], call = best_ms(into_call)
    out["serialize call"], data = best_ms(lambda: wire.call_frame(call.SerializeToString()))
    out["provider parse"], parsed = best_ms(lambda: pb.Frame.FromString(data))
    out["provider decode"], args = best_ms(lambda: codec.decode_args(parsed.call.args, where))
    out["provider encode"], value = best_ms(lambda: codec.encode(args[0], where))
    out["serialize result"], reply = best_ms(
        lambda: wire.result_frame(wire.value_result(1, value.SerializeToString()))
    )
    out["consumer parse"], back = best_ms(lambda: pb.Frame.FromString(reply))
    out["consumer decode"], echoed = best_ms(lambda: codec.decode(back.result.value, where))
    if echoed != obj:
        raise RuntimeError(f"{name}: the stages did not round-trip the payload")
    out["MB"] = len(data) / 1e6
    return out


# ------------------------------------------------------------------ processes


def export(server: backchannel.Server | backchannel.AsyncServer) -> None:
    """Bulk and Pull, ``def`` methods under group "sync", ``async def`` under "async"."""
    server.export(Bulk, SyncBulk(), group="sync")
    server.export(Bulk, AsyncBulk(), group="async")
    server.export(Pull, SyncPull(), group="sync")
    server.export(Pull, AsyncPull(), group="async")


#: the provider's callback timeout (s): a big answer on a busy machine must not time out
CALLBACK_TIMEOUT = 30.0


def provider_main(kind: str) -> None:
    """Child: serve Bulk and Pull (see :func:`export`)."""
    if kind == "sync":
        server = backchannel.Server(
            "127.0.0.1:0", application="bulk-bench", callback_timeout=CALLBACK_TIMEOUT
        )
        export(server)
        server.start()
        stopped = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopped
            stopped = True

        signal.signal(signal.SIGTERM, stop)
        print(server.address, flush=True)
        while not stopped:
            signal.pause()
        server.stop()
        return

    async def serve() -> None:
        server = backchannel.AsyncServer(
            "127.0.0.1:0", application="bulk-bench", callback_timeout=CALLBACK_TIMEOUT
        )
        export(server)
        await server.start()
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        print(server.address, flush=True)
        await stopped.wait()
        await server.stop()

    asyncio.run(serve())


def prober_main(address: str, seconds: float) -> None:
    """Child: small calls one at a time for ``seconds``; print their latencies (ms)."""
    with backchannel.Client(address, timeout=None) as client:
        calc = client.reference(Bulk, group="async")
        for i in range(200):  # warm up
            calc.add(i, 1)
        print("ready", flush=True)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds
        i = 0
        while (began := time.perf_counter()) < deadline:
            if calc.add(i, 1) != i + 1:
                raise RuntimeError("wrong answer")
            latencies.append((time.perf_counter() - began) * 1e3)
            i += 1
    print(json.dumps(latencies), flush=True)


@contextmanager
def provider(kind: str, profile: Path | None = None) -> Iterator[str]:
    """A provider process of ``kind``; yields its address."""
    command = [sys.executable]
    if profile is not None:
        command += ["-m", "cProfile", "-o", str(profile)]
    command += [str(Path(__file__)), "provider", kind]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """calls, p50, p99 and max of a list of ms latencies."""
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "calls": len(latencies),
        "p50": cuts[49],
        "p99": cuts[98],
        "max": max(latencies),
        "slow": sum(1 for latency in latencies if latency > SLOW_MS),
    }


def probe(address: str, seconds: float, bulk: Callable[[], object] | None) -> dict[str, float]:
    """Run a prober process for ``seconds``; meanwhile call ``bulk`` back to back (if
    given). Returns the prober's latency summary and how many bulk calls ran."""
    latencies, bulk_calls = probe_latencies(address, seconds, bulk)
    return {**latency_summary(latencies), "bulk calls": bulk_calls}


def probe_latencies(
    address: str, seconds: float, bulk: Callable[[], object] | None
) -> tuple[list[float], int]:
    """:func:`probe`'s measurement: the prober's latencies (ms) and the bulk calls made."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__)), "prober", address, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError("the prober did not start")
    bulk_calls = 0
    began = time.perf_counter()
    while bulk is not None and time.perf_counter() - began < seconds:
        bulk()
        bulk_calls += 1
    latencies: list[float] = json.loads(process.stdout.readline())
    process.wait(30)
    return latencies, bulk_calls


def echo_figures(made: dict[str, object]) -> dict[tuple[str, str, str], float]:
    """Median ms of ``echo(payload)``, by (provider kind, method kind, payload)."""
    figures: dict[tuple[str, str, str], float] = {}
    for kind in ("sync", "async"):
        with provider(kind) as address, backchannel.Client(address, timeout=None) as client:
            for group in ("sync", "async"):
                bulk = client.reference(Bulk, group=group)
                for name, obj in made.items():
                    times = []
                    for _ in range(ROUNDS):
                        began = time.perf_counter()
                        echoed = bulk.echo(obj)
                        times.append((time.perf_counter() - began) * 1e3)
                        if echoed != obj:
                            raise RuntimeError(f"echo of {name} came back different")
                    figures[(kind, group, name)] = statistics.median(times)
    return figures


def blocking_figures(
    data: dict[str, object], seconds: float, profile: Path | None
) -> dict[tuple[str, ...], dict[str, float]]:
    """The other consumer's latencies, by (provider kind, bulk method kind or "none")."""
    figures: dict[tuple[str, ...], dict[str, float]] = {}
    for kind in ("sync", "async"):
        prof = profile / "bulk-provider.prof" if profile is not None and kind == "async" else None
        with provider(kind, prof) as address, backchannel.Client(address, timeout=None) as client:
            figures[(kind, "none")] = probe(address, seconds, None)
            for group in ("sync", "async"):
                bulk = client.reference(Bulk, group=group)
                figures[(kind, group)] = probe(address, seconds, lambda b=bulk: b.echo(data))
    return figures


def listener_figures(seconds: float) -> dict[tuple[str, ...], dict[str, float]]:
    """The other consumer's latencies while a listener of this process answers big, by
    (provider kind, pull method kind or "none", answer); ``ROUNDS`` rounds, each load
    in turn within a round, merged (``max 1``... are each round's worst)."""
    listeners = answers()
    figures: dict[tuple[str, ...], dict[str, float]] = {}
    for kind in ("sync", "async"):
        with provider(kind) as address, backchannel.Client(address, timeout=None) as client:
            loads: dict[tuple[str, ...], Callable[[], object] | None] = {(kind, "none", ""): None}
            for group in ("sync", "async"):
                pull = client.reference(Pull, group=group).pull
                for name, listener in listeners.items():
                    expected = len(listener.value)  # type: ignore[arg-type]
                    if pull(listener) != expected:  # warm up; the instance stays live
                        raise RuntimeError(f"the provider counted a wrong {name} answer")
                    loads[(kind, group, name)] = functools.partial(pull, listener)
            merged: dict[tuple[str, ...], tuple[list[float], list[float], int]] = {
                key: ([], [], 0) for key in loads
            }
            for _ in range(ROUNDS):
                for key, load in loads.items():
                    latencies, calls = probe_latencies(address, seconds, load)
                    every, worst, total = merged[key]
                    every += latencies
                    worst.append(max(latencies))
                    merged[key] = (every, worst, total + calls)
            for key, (every, worst, total) in merged.items():
                rounds = {f"max {n}": w for n, w in enumerate(worst, start=1)}
                figures[key] = {**latency_summary(every), **rounds, "bulk calls": total}
    return figures


# ------------------------------------------------------------------ output

METHOD = {"sync": "def", "async": "async def", "none": "(no bulk call)", "": "-"}
SERVER = {"sync": "Server", "async": "AsyncServer"}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in rows]
    )


def stage_table(all_stages: dict[str, dict[str, float]]) -> str:
    """Stages (rows) by payload (columns), ms; and ms per MB for the map."""
    names = list(all_stages)
    steps = [step for step in all_stages["map"] if step != "MB"]
    mb = all_stages["map"]["MB"]
    rows = [
        [
            step,
            *(f"{all_stages[n][step]:.1f}" if step in all_stages[n] else "-" for n in names),
            f"{all_stages['map'][step] / mb:.1f}",
        ]
        for step in steps
    ]
    rows.append(["size (MB)", *(f"{all_stages[n]['MB']:.2f}" for n in names), ""])
    return markdown_table(["step (ms)", *names, "map, ms per MB"], rows)


def echo_table(figures: dict[tuple[str, str, str], float], names: list[str]) -> str:
    """Echo wall time (ms) by provider and method (rows) and payload (columns)."""
    rows = [
        [SERVER[kind], METHOD[group], *(f"{figures[(kind, group, n)]:.0f}" for n in names)]
        for kind in ("sync", "async")
        for group in ("sync", "async")
    ]
    return markdown_table(["provider", "echo", *(f"{n} (ms)" for n in names)], rows)


def blocking_table(
    figures: Mapping[tuple[str, ...], dict[str, float]],
    labels: Sequence[str] = ("provider", "bulk echo"),
) -> str:
    """The other consumer's small-call latencies (ms) during bulk calls: a row per key
    (provider kind, then method kinds or other labels, one column each in ``labels``);
    with each round's worst when the figures have them (``max 1``...)."""
    rounds = sorted(k for k in next(iter(figures.values())) if k.startswith("max "))
    rows = [
        [
            SERVER[kind],
            *(METHOD.get(label, label) for label in rest),
            f"{f['bulk calls']:.0f}",
            f"{f['calls']:.0f}",
            f"{f['p50']:.1f}",
            f"{f['p99']:.1f}",
            f"{f['max']:.1f}",
            *([" / ".join(f"{f[r]:.0f}" for r in rounds)] if rounds else []),
            f"{f['slow']:.0f}",
        ]
        for (kind, *rest), f in figures.items()
    ]
    header = [
        *labels,
        "bulk calls",
        "small calls",
        "p50 ms",
        "p99 ms",
        "max ms",
        *(["max ms by round"] if rounds else []),
        f"> {SLOW_MS:g} ms",
    ]
    return markdown_table(header, rows)


def write_doc(text: str) -> None:
    """Replace the Bulk data figures in docs/performance.md (everything after the
    generated-figures marker of its section); the rest of the page stays."""
    marker = "<!-- bench/bulk.py writes below this line -->"
    page = DOC.read_text(encoding="utf-8")
    if marker not in page:
        raise SystemExit(f"{DOC}: no {marker!r} to write the figures under")
    DOC.write_text(page.split(marker)[0] + marker + "\n\n" + text + "\n", encoding="utf-8")


#: the figures, in the order they are measured and written
FIGURES = ("stages", "echo", "blocking", "listener")


def main() -> None:
    """Measure, print, and write the figures to docs/performance.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="per blocking figure")
    parser.add_argument("--profile", type=Path, help="save the provider's cProfile here")
    parser.add_argument("--no-doc", action="store_true", help="do not write the docs page")
    parser.add_argument(
        "--only", choices=FIGURES, nargs="+", help="just these (the page is not written)"
    )
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    wanted = args.only or FIGURES
    builders = payloads()
    made = {name: build() for name, build in builders.items()}
    parts: list[str] = []
    if "stages" in wanted:
        all_stages = {name: stages(name, build) for name, build in builders.items()}
        parts.append("### Where one echo's time goes (ms, best of 3)\n\n" + stage_table(all_stages))
    if "echo" in wanted:
        parts.append(
            "### Echo through a sync Client (ms, median of 3)\n\n"
            + echo_table(echo_figures(made), list(made))
        )
    if "blocking" in wanted:
        figures = blocking_figures(made["map"], args.seconds, args.profile)  # type: ignore[arg-type]
        parts.append(
            f"### Another consumer's small calls during map echoes ({args.seconds:g} s each)"
            "\n\n" + blocking_table(figures)
        )
    if "listener" in wanted:
        parts.append(
            f"### Another consumer's small calls while a listener answers big ({args.seconds:g} s"
            f" each, {ROUNDS} rounds)\n\n"
            + blocking_table(listener_figures(args.seconds), ("provider", "pull", "answer"))
        )
    text = "\n\n".join(parts)
    print(text)
    if not args.no_doc and args.only is None:
        write_doc(f"Measured by `{COMMAND}` on {time.strftime('%Y-%m-%d %H:%M')}.\n\n{text}")
        print(f"\nwritten to {DOC.relative_to(HERE.parent)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "provider":
        provider_main(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "prober":
        prober_main(sys.argv[2], float(sys.argv[3]))
    else:
        main()
