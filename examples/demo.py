"""`make demo`: start an example provider process, run its consumer against it, stop both.

Exits by itself: the provider is killed when the consumer is done, and every wait
is bounded.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = "callback"
WAIT = 30  # seconds for any single step


def start_provider(folder: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start provider.py, wait for its 'listening on ADDRESS' line, return both."""
    provider = subprocess.Popen(
        [sys.executable, "-u", str(folder / "provider.py"), "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    found: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        assert provider.stdout is not None
        for line in provider.stdout:
            if line.startswith("listening on ") and not found:
                found.append(line.split()[-1])
                ready.set()
            else:
                print(f"[provider] {line}", end="")
        ready.set()

    threading.Thread(target=watch, daemon=True).start()
    if not ready.wait(WAIT) or not found:
        provider.kill()
        sys.exit("the provider did not start")
    return provider, found[0]


def main() -> None:
    folder = HERE / EXAMPLE
    provider, address = start_provider(folder, "--interval", "0.5")
    print(f"provider of examples/{EXAMPLE} listening on {address}")
    try:
        consumer = subprocess.run(
            [sys.executable, "-u", str(folder / "consumer.py"), address, "--count", "5"],
            timeout=WAIT,
        )
    finally:
        provider.terminate()
        try:
            provider.wait(5)
        except subprocess.TimeoutExpired:
            provider.kill()
    sys.exit(consumer.returncode)


if __name__ == "__main__":
    main()
