"""The wire stays language-neutral: examples/node/consumer.js, a Node.js consumer written
from docs/protocol.md and envelope.proto with @grpc/grpc-js, adds a listener to the seed's
provider (examples/callback/provider.py, a real process on 127.0.0.1), answers its
callbacks, removes the listener and ends the stream cleanly.

Node.js and npm are Debian's ``nodejs`` and ``npm`` (``make node`` installs them as root,
and the example's packages with ``npm ci``); without node_modules this module runs
``npm ci`` itself.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# end to end: the module runs once per transport of the Python provider (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

ROOT = Path(__file__).resolve().parent.parent
NODE_EXAMPLE = ROOT / "examples" / "node"
PROVIDER = ROOT / "examples" / "callback" / "provider.py"


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the example's packages installed (npm ci when missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "Node.js is not installed (node and npm): apt-get install nodejs npm "
            "(`make node` installs them)",
            pytrace=False,
        )
    if not (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
            cwd=NODE_EXAMPLE,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci in examples/node failed:\n{done.stderr}", pytrace=False)
    return node


@contextlib.contextmanager
def seed_provider() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The seed's provider in a process of its own, pushing every 0.2 s; it and its
    address."""
    process = subprocess.Popen(
        [sys.executable, "-u", str(PROVIDER), "127.0.0.1:0", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    try:
        assert line.startswith("listening on "), line
        yield process, line.split()[-1]
    finally:
        process.kill()
        process.wait(5)


@pytest.fixture(scope="module")
def provider(transport: str) -> Iterator[str]:
    """The address of a seed's provider shared by the module's tests."""
    with seed_provider() as (_, address):
        yield address


def run_consumer(node: str, address: str, count: int) -> list[str]:
    """Run the Node consumer to its end (bounded); the lines it printed."""
    done = subprocess.run(
        [node, "consumer.js", address, "--count", str(count)],
        cwd=NODE_EXAMPLE,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.stderr == ""
    return done.stdout.splitlines()


def test_the_node_consumer_adds_a_listener_answers_its_callbacks_and_ends_cleanly(
    node: str, provider: str
) -> None:
    lines = run_consumer(node, provider, count=4)
    assert lines[0] == "welcome from callback-provider (protocol 1): com.callback.CallbackService"
    # an error Result names its code and the library's type name
    assert lines[1].startswith(
        "noSuchMethod failed: UNIMPLEMENTED backchannel.MethodNotFound: "
        "com.callback.CallbackService has no method 'noSuchMethod'"
    )
    # the callback made during addListener (parent_id) is answered before its Result (a
    # timed push may come in between: the listener is registered by then)
    assert re.fullmatch(r"callback 1: Changed: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", lines[2])
    assert "addListener returned null" in lines[3:]
    callbacks = [line for line in lines if line.startswith("callback ")]
    assert [line.split(":")[0] for line in callbacks[:4]] == [f"callback {n}" for n in range(1, 5)]
    times = [line.split(": Changed: ")[1] for line in callbacks]
    assert times == sorted(times)  # in the order the provider pushed them
    # removeListener: the provider's Release comes before the call's Result
    assert lines[-3:] == ["released callback 1", "removeListener returned null", "stream ended: OK"]


def test_two_node_consumers_one_after_the_other_each_get_their_own_callbacks(
    node: str, provider: str
) -> None:
    """Callback ids are per stream: a second consumer's instance 1 is its own."""
    for _ in range(2):
        lines = run_consumer(node, provider, count=2)
        assert lines[-1] == "stream ended: OK"
        assert "released callback 1" in lines


def test_the_node_consumer_ends_its_stream_when_the_provider_goes_away(
    node: str, transport: str
) -> None:
    with seed_provider() as (provider, address):
        consumer = subprocess.Popen(
            [node, "consumer.js", address, "--count", "1000"],
            cwd=NODE_EXAMPLE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert consumer.stdout is not None
            lines = []
            for line in consumer.stdout:  # bounded: the consumer gives up after 30 s
                lines.append(line.rstrip("\n"))
                if line.startswith("callback 2:"):
                    break
            provider.send_signal(signal.SIGINT)  # server.stop(grace=1): GoAway first
            out, err = consumer.communicate(timeout=20)
        finally:
            consumer.kill()
            consumer.wait(5)
    lines += out.splitlines()
    assert "provider going away: server shutting down" in lines, lines
    assert lines[-1].startswith("stream ended: "), lines
    assert consumer.returncode == 0, err
