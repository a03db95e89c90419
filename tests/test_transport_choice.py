"""Choosing a transport by name: transport=, $BACKCHANNEL_TRANSPORT, [protocol] transport."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import backchannel
from backchannel.config import ConfigError, load_config
from backchannel.transport import default
from backchannel.transport.grpcio import TRANSPORT as GRPCIO

SRC = Path(__file__).resolve().parent.parent / "src"


def test_no_name_and_no_environment_is_grpcio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(default.ENVIRONMENT, raising=False)
    assert default.resolve() is GRPCIO
    assert default.resolve("grpcio") is GRPCIO


def test_the_environment_names_the_transport_when_none_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(default.ENVIRONMENT, "bogus")
    with pytest.raises(ValueError, match=r"\$BACKCHANNEL_TRANSPORT must be one of 'grpcio'"):
        default.resolve()
    assert default.resolve("grpcio") is GRPCIO  # a name given wins over the environment


def test_an_unknown_name_is_refused_by_every_facade() -> None:
    for make in (
        lambda: backchannel.Client("127.0.0.1:1", transport="netty"),
        lambda: backchannel.AsyncClient("127.0.0.1:1", transport="netty"),
        lambda: backchannel.Server(transport="netty"),
        lambda: backchannel.AsyncServer(transport="netty"),
    ):
        with pytest.raises(ValueError, match=r"transport= must be one of .*got 'netty'"):
            make()


def test_a_toml_transport_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[protocol]\ntransport = "netty"\n')
    with pytest.raises(ConfigError, match=r"protocol.transport: expected 'grpcio' or 'grpclib'"):
        load_config(path)
    path.write_text('[protocol]\ntransport = "grpcio"\n')
    assert load_config(path).protocol.transport == "grpcio"


def test_the_sync_facades_loop_runs_on_uvloop_when_it_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast extra's uvloop runs a sync Client's and Server's loop thread; the
    environment can keep asyncio's."""
    uvloop = pytest.importorskip("uvloop")
    from backchannel.transport.portal import LOOP_ENVIRONMENT, LoopThread

    monkeypatch.delenv(LOOP_ENVIRONMENT, raising=False)
    with backchannel.Server() as server, backchannel.Client(server.address) as client:
        assert isinstance(server._portal.loop, uvloop.Loop)  # type: ignore[union-attr]
        assert isinstance(client._portal.loop, uvloop.Loop)
    monkeypatch.setenv(LOOP_ENVIRONMENT, "asyncio")
    thread = LoopThread("test")
    try:
        assert not isinstance(thread.loop, uvloop.Loop)
    finally:
        thread.close()


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=False,
    )


def test_without_the_fast_extra_nothing_of_it_is_imported_or_needed() -> None:
    """grpclib and uvloop blocked as if not installed: a sync Server and Client on grpcio
    work on asyncio's loop, and choosing grpclib says which extra to install."""
    done = _python(
        """
        import sys
        sys.modules["grpclib"] = None  # import grpclib -> ImportError, as when not installed
        sys.modules["uvloop"] = None
        import backchannel
        from backchannel.transport.default import resolve
        with backchannel.Server() as server, backchannel.Client(server.address) as client:
            print(type(client._portal.loop).__module__)
        try:
            resolve("grpclib")
        except ImportError as exc:
            print(exc)
        """
    )
    assert done.returncode == 0, done.stderr
    loop_module, error = done.stdout.splitlines()
    assert loop_module.startswith("asyncio"), loop_module
    assert "transport 'grpclib' needs grpclib (pip install 'backchannel[fast]')" in error


def test_the_default_transport_imports_neither_grpclib_nor_h2() -> None:
    done = _python(
        """
        import os, sys
        os.environ.pop("BACKCHANNEL_TRANSPORT", None)
        import backchannel
        with backchannel.Server() as server, backchannel.Client(server.address) as client:
            pass
        print(sorted(m for m in ("grpclib", "h2") if m in sys.modules))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_mistyped_loop_choice_is_refused_not_guessed(monkeypatch: pytest.MonkeyPatch) -> None:
    from backchannel.transport.portal import LOOP_ENVIRONMENT

    monkeypatch.setenv(LOOP_ENVIRONMENT, "asycnio")
    with pytest.raises(ValueError, match=r"\$BACKCHANNEL_LOOP must be 'asyncio' or 'uvloop'"):
        backchannel.Client("127.0.0.1:1")
