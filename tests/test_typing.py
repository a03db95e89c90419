"""One interface declaration typed for both APIs (docs/typing.md): the typed example passes
mypy --strict and basedpyright, wrong calls are reported on the sync and the asyncio API,
the generated stub is what ``backchannel stubs`` writes and ``--check`` sees it go stale,
and the example runs end to end over 127.0.0.1 (on each transport)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

import backchannel
from backchannel import cli
from backchannel.rpc.interface import find_interface_spec, interface_spec

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
EXAMPLE = ROOT / "examples" / "typed"
WAIT = 30

#: calls both checkers must report, on the sync and the asyncio API; each such line is
#: marked ``# wrong``, and no other line may be reported
BAD_CALLS = '''\
"""Wrong calls (test_typing writes this file)."""

from __future__ import annotations

from prices import PriceFeed, PriceListener

import backchannel


class LateListener(PriceListener):
    async def price(self, symbol: str, value: float) -> None: ...  # wrong


def sync_calls(client: backchannel.Client) -> None:
    feed = client.reference(PriceFeed)
    feed.publish("ACME", "high")  # wrong
    feed.pubilsh("ACME", 1.0)  # wrong
    feed.subscribe("ACME", 42)  # wrong
    count: str = feed.publish("ACME", 1.0)  # wrong
    print(count)


async def async_calls(client: backchannel.AsyncClient) -> None:
    feed = client.reference(PriceFeed)
    await feed.publish("ACME", "high")  # wrong
    await feed.pubilsh("ACME", 1.0)  # wrong
    await feed.subscribe("ACME", 42)  # wrong
    count: str = await feed.publish("ACME", 1.0)  # wrong
    print(count)
    feed.symbols().sort()  # wrong


def push(listeners: list[PriceListener]) -> None:
    backchannel.gather_each((one.price for one in listeners), "ACME", "high")  # wrong
    backchannel.gather_each((one.prise for one in listeners), "ACME", 1.0)  # wrong
'''


def _marked(path: Path) -> set[int]:
    lines = path.read_text().splitlines()
    return {number for number, line in enumerate(lines, 1) if line.endswith("# wrong")}


@pytest.fixture
def bad_calls(tmp_path: Path) -> Path:
    path = tmp_path / "bad_calls.py"
    path.write_text(BAD_CALLS)
    return path


def _example_files() -> list[str]:
    return [str(p) for p in sorted(EXAMPLE.glob("*.py*"))]


@pytest.mark.timeout(300)
def test_mypy_strict_passes_the_example_and_reports_every_wrong_call(bad_calls: Path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")),
            *("--strict", "--show-error-codes", "--no-pretty", str(EXAMPLE), str(bad_calls)),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    errors = re.findall(r"^(.+?):(\d+): error: (.*)$", done.stdout, re.MULTILINE)
    assert errors, done.stdout + done.stderr
    elsewhere = [e for e in errors if Path(e[0]).name != bad_calls.name]
    assert not elsewhere, done.stdout  # the example itself is clean
    reported = {int(line) for _, line, _ in errors}
    assert reported == _marked(bad_calls), done.stdout
    text = done.stdout
    assert '"PriceFeed" has no attribute "pubilsh"' in text
    assert '"PriceFeedAsync" has no attribute "pubilsh"' in text
    assert 'Argument 2 to "publish" of "PriceFeedAsync" has incompatible type "str"' in text
    assert "[override]" in text  # an async def method subclassing the sync interface


def _basedpyright() -> str:
    found = shutil.which("basedpyright", path=str(Path(sys.executable).parent))
    found = found or shutil.which("basedpyright")
    if found is None:
        pytest.skip("basedpyright is not installed: pip install -e '.[dev]' (make venv)")
    return found


@pytest.mark.timeout(300)
def test_basedpyright_passes_the_example_and_reports_every_wrong_call(
    bad_calls: Path, tmp_path: Path
) -> None:
    program = _basedpyright()
    # the project's settings ([tool.basedpyright]), for files outside the project
    config = {
        "typeCheckingMode": "strict",
        "pythonVersion": "3.11",
        "extraPaths": [str(SRC), str(EXAMPLE)],
    }
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config))
    done = subprocess.run(
        [
            *(program, "--outputjson", "--project", str(tmp_path / "pyrightconfig.json")),
            *("--pythonpath", sys.executable, *_example_files(), str(bad_calls)),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    report = json.loads(done.stdout)
    found = report["generalDiagnostics"]
    assert found, done.stdout
    elsewhere = [d for d in found if Path(d["file"]).name != bad_calls.name]
    assert not elsewhere, elsewhere  # the example is clean: no error, no warning
    reported = {d["range"]["start"]["line"] + 1 for d in found if d["severity"] == "error"}
    assert reported == _marked(bad_calls), found
    messages = " ".join(d["message"] for d in found)
    assert 'Cannot access attribute "pubilsh" for class "PriceFeed"' in messages
    assert 'Cannot access attribute "pubilsh" for class "PriceFeedAsync"' in messages


# --- the stub generator ---------------------------------------------------------------------

SOURCE = '''\
"""Interfaces."""

from __future__ import annotations

import typing
from typing import Optional, Protocol, TypeVar, Union

import backchannel

T = TypeVar("T")
LIMIT: int = 3


@backchannel.interface("x.Listener")
class Listener(Protocol):
    """Called back."""

    def changed(self, msg: str, seq: int = 0) -> None: ...

    def _private(self) -> None: ...


@backchannel.interface("x.Service")
class Service:
    @backchannel.method(arguments=[backchannel.Argument(index=1)])
    def add(self, key: str, listener: Listener | None, extra: "Listener") -> bool:
        raise NotImplementedError

    def keys(self, *prefixes: str) -> list[str]:
        raise NotImplementedError

    async def watch(
        self,
        first: Optional[Listener],
        second: typing.Optional["Listener"],
        third: Union[Listener, None],
    ) -> int:
        raise NotImplementedError


class Printer(Listener):
    def changed(self, msg: str, seq: int = 0) -> None:
        print(msg)


def helper(value: T, default: list[int] = [1, 2]) -> T:
    return value


if __name__ == "__main__":
    helper(1)
'''

STUB = """\
# Generated by `backchannel stubs` from {name}.py: do not edit; run it again after changing
# {name}.py (`backchannel stubs --check` fails while this file is out of date). docs/typing.md
# ruff: noqa
# fmt: off
import typing
from typing import Optional, Protocol, TypeVar, Union
import backchannel

T = TypeVar("T")
LIMIT: int

class Listener(backchannel.Interface[ListenerAsync]):
    def changed(self, msg: str, seq: int = 0) -> None: ...

class ListenerAsync(Protocol):
    async def changed(self, msg: str, seq: int = 0) -> None: ...

class Service(backchannel.Interface[ServiceAsync]):
    def add(
        self,
        key: str,
        listener: Listener | ListenerAsync | None,
        extra: Listener | ListenerAsync,
    ) -> bool: ...
    def keys(self, *prefixes: str) -> list[str]: ...
    def watch(
        self,
        first: Optional[Listener | ListenerAsync],
        second: typing.Optional[Listener | ListenerAsync],
        third: Union[Listener | ListenerAsync, None],
    ) -> int: ...

class ServiceAsync(Protocol):
    async def add(
        self,
        key: str,
        listener: Listener | ListenerAsync | None,
        extra: Listener | ListenerAsync,
    ) -> bool: ...
    async def keys(self, *prefixes: str) -> list[str]: ...
    async def watch(
        self,
        first: Optional[Listener | ListenerAsync],
        second: typing.Optional[Listener | ListenerAsync],
        third: Union[Listener | ListenerAsync, None],
    ) -> int: ...

class Printer(Listener):
    def changed(self, msg: str, seq: int = 0) -> None: ...

def helper(value: T, default: list[int] = ...) -> T: ...
"""


@pytest.fixture
def module(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """An interface module in its own file, named for the test (they load into sys.modules)."""
    name = "ifaces_" + re.sub(r"\W", "_", request.node.name)
    path = tmp_path / f"{name}.py"
    path.write_text(SOURCE)
    yield path
    sys.modules.pop(name, None)


def test_the_stub_declares_each_interface_and_its_async_twin(
    module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["stubs", str(module)]) == 0
    assert capsys.readouterr().out == f"wrote {module.with_suffix('.pyi')}\n"
    assert module.with_suffix(".pyi").read_text() == STUB.format(name=module.stem)


def test_stubs_check_fails_while_the_stub_is_missing_or_stale_and_writes_nothing(
    module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stub = module.with_suffix(".pyi")
    assert cli.main(["stubs", "--check", str(module)]) == 1
    assert f"{stub} is missing: run `backchannel stubs {module}`" in capsys.readouterr().err
    assert not stub.exists()
    assert cli.main(["stubs", str(module)]) == 0
    assert cli.main(["stubs", "--check", str(module)]) == 0
    written = stub.read_text()
    module.write_text(
        SOURCE.replace("def keys(self", "def count(self) -> int: ...\n\n    def keys(self")
    )
    capsys.readouterr()
    assert cli.main(["stubs", "--check", str(module)]) == 1
    assert f"{stub} is out of date" in capsys.readouterr().err
    assert stub.read_text() == written
    assert cli.main(["stubs", str(module)]) == 0
    assert "    async def count(self) -> int: ..." in stub.read_text()
    assert cli.main(["stubs", "--check", str(module)]) == 0


def test_stubs_takes_a_module_name(
    module: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(module.parent))
    assert cli.main(["stubs", module.stem]) == 0
    assert module.with_suffix(".pyi").read_text() == STUB.format(name=module.stem)


#: an app of the generated stub of SOURCE (module ``{name}``): an ``async def`` interface
#: method is a plain call on Client and awaited on AsyncClient, and ``Optional[L]`` /
#: ``Union[L, None]`` parameters take an ``async def`` listener; the ``# wrong`` line only
#: is reported
APP = """\
from __future__ import annotations

import backchannel
from {name} import Listener, Service


class AsyncPrinter:
    async def changed(self, msg: str, seq: int = 0) -> None: ...


class SyncPrinter(Listener):
    def changed(self, msg: str, seq: int = 0) -> None: ...


def sync_calls(client: backchannel.Client) -> int:
    service = client.reference(Service)
    service.watch("no listener", None, None)  # wrong
    return service.watch(AsyncPrinter(), SyncPrinter(), AsyncPrinter())


async def async_calls(client: backchannel.AsyncClient) -> int:
    service = client.reference(Service)
    count: int = await service.watch(AsyncPrinter(), AsyncPrinter(), None)
    return count
"""


@pytest.mark.timeout(300)
def test_async_def_methods_and_optional_listeners_type_check_on_both_apis(module: Path) -> None:
    assert cli.main(["stubs", str(module)]) == 0
    app = module.parent / "app.py"
    app.write_text(APP.format(name=module.stem))
    done = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")),
            *("--strict", "--show-error-codes", "--no-pretty", "--no-incremental", str(app)),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=module.parent,
    )
    errors = re.findall(r"^(.+?):(\d+): error: (.*)$", done.stdout, re.MULTILINE)
    assert {int(line) for _, line, _ in errors} == _marked(app), done.stdout + done.stderr
    assert 'Argument 1 to "watch" of "Service" has incompatible type "str"' in done.stdout


@pytest.mark.timeout(300)
def test_async_def_methods_and_optional_listeners_pass_basedpyright(module: Path) -> None:
    program = _basedpyright()
    assert cli.main(["stubs", str(module)]) == 0
    app = module.parent / "app.py"
    app.write_text(APP.format(name=module.stem))
    config = {"typeCheckingMode": "strict", "pythonVersion": "3.11", "extraPaths": [str(SRC)]}
    (module.parent / "pyrightconfig.json").write_text(json.dumps(config))
    done = subprocess.run(
        [program, "--outputjson", "--pythonpath", sys.executable, str(app)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=module.parent,
    )
    found = json.loads(done.stdout)["generalDiagnostics"]
    reported = {d["range"]["start"]["line"] + 1 for d in found if d["severity"] == "error"}
    assert reported == _marked(app), found
    assert all(d["severity"] == "error" for d in found), found  # no warning either


def test_the_typed_examples_stub_is_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stubs", "--check", str(EXAMPLE / "prices.py")]) == 0, capsys.readouterr()


@pytest.mark.parametrize(
    ("target", "source", "error"),
    [
        ("nothing.py", None, "nothing.py: no such file"),
        ("no_such_module_here", None, "no_such_module_here: no such module"),
        ("plain.py", "class A:\n    def f(self) -> None: ...\n", "no class declared with"),
        ("broken.py", "import no_such_dependency\n", "importing it failed: ModuleNotFoundError"),
        ("syntax.py", "def (:\n", "importing it failed: SyntaxError"),
    ],
)
def test_stubs_of_what_declares_no_interface_is_a_one_line_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    target: str,
    source: str | None,
    error: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / target).write_text(source)
    assert cli.main(["stubs", target]) == 1
    err = capsys.readouterr().err
    assert err.startswith("backchannel stubs: ") and error in err
    assert err.count("\n") == 1


# --- Protocol interfaces at run time -------------------------------------------------------


def test_a_protocol_class_is_an_interface_with_only_its_declared_methods() -> None:
    @backchannel.interface("x.Feed")
    class Feed(Protocol):
        def quote(self, symbol: str) -> float: ...

        def symbols(self) -> list[str]: ...

    spec = interface_spec(Feed)
    assert sorted(spec.methods) == ["quote", "symbols"]
    assert spec.methods["quote"].parameters == ("symbol",)

    class Impl(Feed):  # a sync implementation subclasses it, as a plain class
        def quote(self, symbol: str) -> float:
            return 1.0

        def symbols(self) -> list[str]:
            return []

    assert find_interface_spec(Impl) is spec
    assert Impl().quote("x") == 1.0


# --- the example, end to end ---------------------------------------------------------------


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("flavour", ["threads", "asyncio"])
def test_the_typed_example_runs_with_both_clients_and_both_kinds_of_listener(
    flavour: str,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}  # this checkout's backchannel
    command = [sys.executable, "-u", str(EXAMPLE / "provider.py"), "127.0.0.1:0"]
    provider = subprocess.Popen(
        command + (["--asyncio"] if flavour == "asyncio" else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",  # the example runs from any directory
        env=env,
    )
    try:
        assert provider.stdout is not None
        line = provider.stdout.readline()
        assert line.startswith("listening on "), line
        done = subprocess.run(
            [sys.executable, str(EXAMPLE / "consumer.py"), line.split()[-1]],
            capture_output=True,
            text=True,
            timeout=WAIT,
            cwd="/",
            env=env,
        )
    finally:
        provider.kill()
        provider.wait(WAIT)
    said = f"consumer's stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, said
    out = done.stdout.splitlines()
    for who in ("sync client, def", "sync client, async def"):
        assert f"{who} listener: ACME 1.5" in out, said
    for who in ("async client, def", "async client, async def"):
        assert f"{who} listener: ACME 2.5" in out, said
    # each publish reached the two listeners of the consumer that made it; the sync
    # client's, gone with it, were dropped when the asyncio client's publish failed them
    assert "sync client: delivered to 2, symbols ['ACME']" in out, said
    assert "async client: delivered to 2, symbols ['ACME']" in out, said
