"""Generate the protobuf modules from ``protos/`` (and examples' protos) with grpcio-tools.

``python scripts/gen_protos.py`` writes them; ``--check`` regenerates into a temporary
folder and fails when the committed modules differ from the protos (drift).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent

# (folder holding the .proto tree, folder the generated modules go under)
TARGETS: list[tuple[Path, Path]] = [
    (ROOT / "protos", ROOT / "src"),
]
TARGETS += [(p, p.parent / "generated") for p in sorted((ROOT / "examples").glob("*/protos"))]


def generate(proto_root: Path, out: Path) -> list[Path]:
    """Run protoc over every .proto below proto_root; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}"]
    if protoc.main([*args, *protos]) != 0:
        sys.exit(f"protoc failed for {proto_root}")
    written = []
    for proto in protos:
        stem = Path(proto).with_suffix("")
        written += [out / f"{stem}_pb2.py", out / f"{stem}_pb2.pyi"]
        # the descriptor with its comments, which server reflection shows to grpcurl
        documented = out / f"{stem}.binpb"
        source_info = [f"--descriptor_set_out={documented}", "--include_source_info"]
        if protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", *source_info, proto]) != 0:
            sys.exit(f"protoc failed for {proto}")
        written.append(documented)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code drifted")
    check = parser.parse_args().check
    drifted = []
    for proto_root, out in TARGETS:
        if not check:
            generate(proto_root, out)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for fresh in generate(proto_root, Path(tmp)):
                committed = out / fresh.relative_to(tmp)
                if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                    drifted.append(str(committed.relative_to(ROOT)))
    if drifted:
        sys.exit("generated code differs from protos/ (run `make gen`): " + ", ".join(drifted))


if __name__ == "__main__":
    main()
