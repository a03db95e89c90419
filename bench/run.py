"""The backchannel benchmark suite (``make bench``).

Every figure runs in fresh processes on 127.0.0.1: a provider (``bench/provider.py``,
which prints its address) and a consumer (``bench/consumer.py``, which warms up, times
calls for a fixed duration and prints JSON), or several consumers at once for the
fan-out figures. The callback figures are timed in the provider, which pushes; its
consumers print what it measured. Both processes of a figure run on the figure's
transport and event loop (``$BACKCHANNEL_TRANSPORT`` and ``$BENCH_LOOP``, set here): each
scenario is measured on grpcio and on the fast transport (grpclib on uvloop), beside raw
grpc.aio and raw grpclib (plain asyncio and uvloop) figures measured in the same run,
every figure interleaved round by round. The tables (``bench/report.py``) are printed and
written, with the machine's details, to ``docs/performance.md``. A figure that fails is
reported and the run goes on; the exit status is 1 if a figure failed every round.

``--profile DIR`` runs both processes under cProfile and saves ``DIR/FIGURE-{provider,
consumer}.prof`` (only the main thread is profiled: the sync Client's loop thread is not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from common import LOOP_ENVIRONMENT
from consumer import FIGURES
from report import DOC, default_figures, print_tables, write_doc

from backchannel.transport.default import ENVIRONMENT as TRANSPORT_ENVIRONMENT

HERE = Path(__file__).resolve().parent


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


def environment(figure: str) -> dict[str, str]:
    """The environment of ``figure``'s processes: this one's, with the figure's transport
    and event loop."""
    wanted = {TRANSPORT_ENVIRONMENT: FIGURES[figure].transport}
    return {**os.environ, **wanted, LOOP_ENVIRONMENT: FIGURES[figure].loop}


@contextlib.contextmanager
def provider(
    kind: str,
    profile: Path | None,
    name: str,
    tracing: str = "",
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Run a provider process of ``kind`` (its profile saved as ``name``-provider, with
    OpenTelemetry in the state ``tracing``, in the environment ``env``); yield the address
    it printed; stop it."""
    name = f"{name}-provider"
    command = _python("provider.py", kind, profile=profile, name=name, tracing=tracing)
    with serving(command, f"the {kind} provider", env) as address:
        yield address


@contextlib.contextmanager
def serving(command: list[str], what: str, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Run a provider process (``what``, for the error; ``env``, if given, its
    environment); yield the address it prints first; stop it (terminate, then kill after
    10 s) on the way out."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
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
def consumer(
    command: list[str], env: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run one consumer process (``env``, if given, its environment), its output in a
    temporary directory; kill it if it is still running on the way out (a failed or
    timed-out figure)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp)
        with (out / "stdout").open("wb") as stdout, (out / "stderr").open("wb") as stderr:
            process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
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
    env = environment(figure)
    with contextlib.ExitStack() as stack:
        kind, tracing = FIGURES[figure].provider, FIGURES[figure].tracing
        names = [f"{figure}{n if cluster > 1 else ''}" for n in range(max(cluster, 1))]
        addresses = [stack.enter_context(provider(kind, profile, n, tracing, env)) for n in names]
        args[1] = "static://" + ",".join(addresses) if cluster else addresses[0]
        runs = []
        for n in range(processes):
            name = f"{figure}-consumer{n if processes > 1 else ''}"
            command = _python("consumer.py", *args, profile=profile, name=name, tracing=tracing)
            runs.append(stack.enter_context(consumer(command, env)))
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
    figures = args.only or default_figures()
    # rounds interleave every figure, so a noisy moment on a shared machine hits both
    # sides of a ratio alike; the median run of each figure is kept
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in figures}
    for round_number in range(1, args.rounds + 1):
        for name in figures:
            print(f"round {round_number}: measuring {name} ...", file=sys.stderr, flush=True)
            try:
                runs[name].append(measure(name, args.warmup, args.duration, args.profile))
            except RuntimeError as exc:  # say so and go on: one broken figure costs one row
                print(f"{name} failed: {_last_lines(str(exc))}", file=sys.stderr, flush=True)
    results = {name: median_run(found) for name, found in runs.items() if found}
    failed = [name for name, found in runs.items() if not found]
    print_tables(results, failed, everything=not args.only)
    if not args.only and not args.no_doc:
        write_doc(results, failed, args.warmup, args.duration, args.rounds)
        print(f"\nwritten to {DOC.relative_to(HERE.parent)}")
    if failed:
        sys.exit(f"failed in every round: {', '.join(failed)}")


def _last_lines(text: str, count: int = 3) -> str:
    """The end of an error (a consumer's traceback ends with what went wrong)."""
    return "\n  ".join(text.strip().splitlines()[-count:])


if __name__ == "__main__":
    main()
