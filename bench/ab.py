"""Measure figures of ``bench/run.py`` on two revisions in the same run, interleaved.

``python bench/ab.py BEFORE [AFTER]`` exports each git revision (``AFTER`` defaults to the
working tree) into a temporary folder, then measures the chosen figures round by round,
alternating which side goes first (A B, then B A, ...) so that a machine growing busier or
quieter weighs on both alike. Each side runs its own ``bench/run.py`` with its own ``src/``
first on ``PYTHONPATH``, in fresh provider and consumer processes, as ``make bench`` does.
It prints every round, the medians with their ratio after / before, and the median of the
rounds' own ratios (each round's two sides ran back to back, so that one is the steadier
estimate on a noisy machine); a change that costs no speed shows ratios near 1.00.
By default it measures scenarios a, b, d and e on grpcio; ``--only`` also takes their
twins on the fast transport (``NAME-grpclib-uvloop``), for revisions whose bench has them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: the figures of scenarios a, b, d and e (docs/performance.md) on grpcio, measured by
#: default, and the metric each is read by
DEFAULT = {
    "bc-async-seq": "mean_us",  # a: async sequential round trip
    "bc-async-64": "calls_per_second",  # b: 64 async callers on one client
    "bc-callback-seq": "mean_us",  # d: callback round trip
    "bc-fanout-1000": "calls_per_second",  # e: fan-out to 1,000 listeners
    "bc-fanout-1000-gather": "calls_per_second",  # e: the same with gather
}
#: the same on the fast transport (grpclib on uvloop), with --only; both revisions'
#: bench/ must know them (bench/consumer.py's FIGURES)
FAST = {f"{name}-grpclib-uvloop": metric for name, metric in DEFAULT.items()}
FIGURES = DEFAULT | FAST

#: run inside a side's bench/ folder: one figure, printed as JSON
_MEASURE = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); import run; "
    "print(json.dumps(run.measure(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), None)))"
)


def export(revision: str, into: Path) -> Path:
    """The tree of ``revision`` (``git archive``), unpacked below ``into``."""
    folder = into / revision.replace("/", "_")
    folder.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision], cwd=ROOT, capture_output=True, check=True
    ).stdout
    tar = into / f"{folder.name}.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as opened:
        opened.extractall(folder, filter="data")
    return folder


def measure(tree: Path, figure: str, warmup: float, duration: float) -> dict[str, float]:
    """One figure measured with ``tree``'s code and ``tree``'s bench scripts."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    bench = str(tree / "bench")
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, bench, figure, str(warmup), str(duration)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if done.returncode != 0:
        sys.exit(f"{figure} failed in {tree}:\n{done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="a git revision")
    parser.add_argument("after", nargs="?", help="a git revision (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=2.5)
    parser.add_argument("--only", nargs="+", choices=sorted(FIGURES), default=list(DEFAULT))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        before = export(args.before, Path(tmp))
        after = export(args.after, Path(tmp)) if args.after else ROOT
        sides = {"before": before, "after": after}
        found: dict[str, dict[str, list[float]]] = {
            figure: {"before": [], "after": []} for figure in args.only
        }
        for n in range(args.rounds):
            order = ["before", "after"] if n % 2 == 0 else ["after", "before"]
            for figure in args.only:
                for side in order:
                    value = measure(sides[side], figure, args.warmup, args.duration)
                    found[figure][side].append(value[FIGURES[figure]])
                row = found[figure]
                print(
                    f"round {n + 1} {figure:36} before {row['before'][-1]:10.1f}"
                    f"  after {row['after'][-1]:10.1f}  ({FIGURES[figure]})",
                    flush=True,
                )
    print(f"\nmedians of {args.rounds} rounds, {args.before} -> {args.after or 'working tree'}:")
    for figure, row in found.items():
        was, now = statistics.median(row["before"]), statistics.median(row["after"])
        ratios = [a / b for a, b in zip(row["after"], row["before"], strict=True)]
        spread = ", ".join(f"{ratio:.3f}" for ratio in ratios)
        # the paired estimate: each round's two sides ran back to back, under the same load
        print(
            f"{figure:36} {FIGURES[figure]:16} before {was:10.1f}  after {now:10.1f}"
            f"  medians' ratio {now / was:.3f}, median round ratio"
            f" {statistics.median(ratios):.3f} (each round: {spread})"
        )


if __name__ == "__main__":
    main()
