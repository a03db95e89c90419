"""The package's shape, checked: no module over 500 lines and no class over 300, and the
lowest layer free of asyncio and grpc at run time (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import backchannel

PACKAGE = Path(backchannel.__file__).parent
GENERATED = PACKAGE / "v1"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if GENERATED not in p.parents)


def _too_long() -> tuple[list[str], list[str]]:
    modules, classes = [], []
    for path in _modules():
        text = path.read_text()
        name = path.relative_to(PACKAGE.parent)
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            modules.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    classes.append(f"{name}: class {node.name}: {length} lines")
    return modules, classes


def test_no_module_over_500_lines() -> None:
    modules, _ = _too_long()
    assert not modules, modules


def test_no_class_over_300_lines() -> None:
    _, classes = _too_long()
    assert not classes, classes


def test_the_count_sees_every_layer() -> None:
    folders = {p.parent.name for p in _modules()}
    assert {"backchannel", "wire", "transport", "rpc", "cluster"} <= folders


def test_importing_the_wire_layer_loads_neither_asyncio_nor_grpc() -> None:
    code = (
        "import sys, backchannel.wire.protocol, backchannel.wire.codec\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('asyncio', 'grpc')))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    assert found == "[]"


def test_the_subprocess_check_does_see_asyncio_where_it_is_imported() -> None:
    code = (
        "import sys, backchannel.transport.session\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'asyncio', 'grpc'}))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    assert found != "[]"


def test_the_packages_modules_are_still_its_attributes_after_a_plain_import() -> None:
    code = (
        "import sys, backchannel\n"
        "assert 'backchannel.telemetry' not in sys.modules\n"
        "print(callable(backchannel.telemetry.configure), backchannel.errors.StreamBroken,\n"
        "      backchannel.settings.Limits is backchannel.Limits, 'wire' in dir(backchannel))\n"
        "try:\n"
        "    backchannel.nothing_here\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()
    assert found == [
        "True <class 'backchannel.errors.StreamBroken'> True True",
        "module 'backchannel' has no attribute 'nothing_here'",
    ]


def test_every_public_name_is_loaded_from_the_module_its_home_says() -> None:
    code = (
        "import backchannel\n"
        "homes = backchannel._HOMES\n"
        "names = backchannel.__all__\n"
        "assert sorted(homes) == sorted(names), set(homes) ^ set(names)\n"
        "print(all(getattr(backchannel, n) is not None for n in names))\n"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert found.returncode == 0 and found.stdout.strip() == "True", found.stderr[-2000:]
