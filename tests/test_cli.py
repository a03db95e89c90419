"""The `backchannel` command line (`python -m backchannel`) against the example providers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_grpcurl import EXAMPLES, start_example


@pytest.fixture(scope="module")
def forward() -> Iterator[str]:
    process, address = start_example("forward")
    yield address
    process.kill()
    process.wait(5)


@pytest.fixture(scope="module")
def callback() -> Iterator[str]:
    process, address = start_example("callback", "--interval", "0.1")
    yield address
    process.kill()
    process.wait(5)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backchannel", *args], capture_output=True, text=True, timeout=30
    )


def test_describe_prints_a_table(callback: str) -> None:
    result = cli("describe", callback)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[1].split()[:4] == ["SERVICE", "GROUP", "VERSION", "METHOD"]
    add = next(line.split() for line in lines if "addListener" in line)
    expected = "com.callback.CallbackService - - addListener key, listener 1 - -"
    assert add == expected.split()


def test_call_prints_the_result_as_json(forward: str) -> None:
    common = ["com.example.Calculator", "--group", "demo", "--version", "1.0.0"]
    result = cli("call", forward, common[0], "add", "2", "3", *common[1:])
    assert (result.returncode, result.stdout.strip()) == (0, "5")
    greeting = cli("call", forward, common[0], "greet", '"Dubbo"', '"Hi"', *common[1:])
    assert json.loads(greeting.stdout) == "Hi, Dubbo!"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["call", "{forward}", "com.example.Nope", "add", "1"], "no service 'com.example.Nope'"),
        (["call", "{forward}", "com.example.Calculator", "add", "x"], "argument 0 is not JSON"),
        (["call", "127.0.0.1:1", "a.B", "c"], "UNAVAILABLE"),
        (["describe", "127.0.0.1:1"], "UNAVAILABLE"),
        (["call", "{forward}", "com.example.Calculator", "add", "1", "--timeout", "x"], "invalid"),
    ],
)
def test_mistakes_are_one_line_and_a_non_zero_exit(
    forward: str, args: list[str], message: str
) -> None:
    result = cli(*(arg.format(forward=forward) for arg in args))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_listen_prints_callbacks_until_interrupted(callback: str) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backchannel",
            "listen",
            callback,
            "com.callback.CallbackService",
            "addListener",
            '"foo.bar"',
            "--callback-arg",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    seen = [json.loads(process.stdout.readline()) for _ in range(3)]
    kinds = [next(iter(line)) for line in seen]
    assert kinds.count("callback") >= 2 and "result" in kinds
    first = next(line for line in seen if "callback" in line)
    assert first["callback"] == "changed" and first["args"][0].startswith("Changed: ")
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == 130
    assert "Traceback" not in process.stderr.read()


def test_serve_starts_the_providers_of_a_config_file(tmp_path: Path) -> None:
    text = (EXAMPLES / "callback" / "config.toml").read_text()
    config = EXAMPLES / "callback" / f"serve-{tmp_path.name}.toml"
    config.write_text(text.replace('"127.0.0.1:50051"', '"127.0.0.1:0"'))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "backchannel", "serve", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
    finally:
        config.unlink()
    assert line.startswith("listening on "), process.stderr.read()
    described = cli("describe", line.split()[-1])
    assert "addListener" in described.stdout
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == 130
    assert "Traceback" not in process.stderr.read()


def test_serve_reports_a_broken_config_in_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[[service]]\ninterface = 'nowhere:X'\nref = 'a:b'\n")
    result = cli("serve", str(broken))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "service[0].interface" in result.stderr
