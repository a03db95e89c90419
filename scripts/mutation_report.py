"""Summarise a finished `make mutate` run: the score per module and every survivor's diff.

    .venv/bin/python scripts/mutation_report.py            # scores, then survivors per module
    .venv/bin/python scripts/mutation_report.py --survivors backchannel.wire.codec  # one module's

It reads what mutmut left under ``mutants/`` (each module's ``.meta`` results and the mutated
source, where every mutant is a copy of its function named ``<function>__mutmut_<n>``), so it
runs in a second and needs nothing but the standard library and mutmut's own status codes.
Each survivor is printed with the lines its mutation changed, and its verdict from
``docs/mutants/<module>.toml`` (why it is equivalent), or ``UNEXPLAINED`` when it has none.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

MUTANTS = Path("mutants/src/backchannel")
VERDICTS = Path("docs/mutants")

# mutmut's exit codes (mutmut/stats.py); everything else is "suspicious"
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests"}
STATUS[None] = "not checked"
STATUS |= dict.fromkeys((36, 24, -24, 152, 255), "timeout")
CAUGHT = ("killed", "timeout")


def results() -> dict[str, str]:
    """Every mutant's status, by mutant name."""
    found: dict[str, str] = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        found |= {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
    return found


def functions(module: str) -> dict[str, str]:
    """Source of every function in a mutated module, by name (mutants and originals)."""
    path = MUTANTS.joinpath(*module.split(".")[1:]).with_suffix(".py")
    text = path.read_text()
    lines = text.splitlines()  # sliced by line numbers: get_source_segment splits per call
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
            found[node.name] = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    return found


def change(name: str, sources: dict[str, str]) -> str:
    """The lines a mutant changed, as ``- old`` / ``+ new`` (its own name left out)."""
    function = name.rsplit(".", 1)[1]
    original = sources.get(function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", "")
    mutated = sources.get(function, "")
    lines = difflib.unified_diff(
        original.splitlines()[1:], mutated.splitlines()[1:], lineterm="", n=0
    )
    kept = [line for line in lines if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    return "\n".join("    " + line.strip() for line in kept)


def scores(status: dict[str, str], modules: list[str], markdown: bool) -> None:
    """The table of scores: one row a module, then the total."""
    header = ("mutants", "caught", "survived", "no tests", "score")
    if markdown:
        print("| module |", " | ".join(header), "|\n|---|" + "---:|" * len(header))
    else:
        print(f"{'module':24}", *(f"{column:>8}" for column in header))
    for module in [*modules, "total"]:
        mine = [s for n, s in status.items() if module == "total" or n.rsplit(".", 1)[0] == module]
        count = Counter(mine)
        caught = sum(count[c] for c in CAUGHT)
        row = (len(mine), caught, count["survived"], count["no tests"])
        score = f"{caught / len(mine) if mine else 0.0:.1%}"
        if markdown:
            print(f"| `{module}` |", " | ".join(map(str, row)), f"| {score} |")
        else:
            print(f"{module:24}", *(f"{value:8}" for value in row), f"{score:>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--survivors", metavar="PREFIX", default="backchannel.")
    parser.add_argument("--markdown", action="store_true", help="as docs/testing.md lists them")
    args = parser.parse_args()
    if not MUTANTS.is_dir():
        sys.exit("no mutants/ here: run `make mutate` first")
    verdicts: dict[str, str] = {}
    for found in sorted(VERDICTS.glob("*.toml")):
        verdicts |= tomllib.loads(found.read_text()).get("equivalent", {})
    status = results()
    modules = sorted({name.rsplit(".", 1)[0] for name in status})
    scores(status, modules, args.markdown)
    unexplained = 0
    for module in modules:
        if not (module + ".").startswith(args.survivors) and not args.survivors.startswith(module):
            continue
        sources = functions(module)
        survivors = [
            name
            for name, state in sorted(status.items())
            if state not in CAUGHT
            and name.startswith(args.survivors)
            and name.rsplit(".", 1)[0] == module
        ]
        if args.markdown and survivors:
            print(f"\n**`{module}`** ({len(survivors)})\n")
        for name in survivors:
            verdict = verdicts.get(name.removeprefix("backchannel."))
            unexplained += verdict is None
            lines = change(name, sources)
            if args.markdown:
                short = " → ".join(f"`{line.strip()[1:].strip()}`" for line in lines.splitlines())
                print(f"- `{name.rsplit('.', 1)[1]}`: {short}: {verdict or 'UNEXPLAINED'}")
            else:
                print(f"\n{name}: {status[name]}: {verdict or 'UNEXPLAINED'}\n{lines}")
    stale = sorted(n for n in verdicts if status.get("backchannel." + n) in CAUGHT)
    if stale:
        print(f"\nverdicts of mutants now caught (remove them): {', '.join(stale)}")
    print(f"\n{unexplained} survivors without a verdict in {VERDICTS}/*.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
