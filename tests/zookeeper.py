"""A throwaway standalone ZooKeeper server (Debian's ``zookeeper`` package) for tests.

Its own config and data directory, a free 127.0.0.1 port, no admin server; ready when
``srvr`` gives its mode (it serves). It can be stopped and started again on the same port
with the same data, as a ZooKeeper that goes away and comes back.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_address
from kazoo.client import KazooClient

from backchannel.cluster.service_url import ServiceURL, decode, encode

#: the server's jar; its manifest's Class-Path names the other jars it needs
JAR = Path(os.environ.get("ZOOKEEPER_JAR", "/usr/share/java/zookeeper.jar"))
MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"
#: ZooKeeper's clock: sessions may be as short as two ticks, so short ones expire fast
TICK_MS = 200


def missing() -> str:
    """Why no server can be started here ('' if one can)."""
    if not JAR.exists():
        return f"ZooKeeper is not installed ({JAR} is missing): apt-get install zookeeper"
    if shutil.which("java") is None:
        return "java is not installed (Debian's zookeeper package pulls in default-jre)"
    return ""


class ZooKeeper:
    """One standalone server in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = int(free_address().rpartition(":")[2])
        self.hosts = f"127.0.0.1:{self.port}"
        self.address = f"zookeeper://{self.hosts}"
        self.process: subprocess.Popen[bytes] | None = None
        (directory / "data").mkdir(parents=True, exist_ok=True)
        self.config = directory / "zoo.cfg"
        self.config.write_text(
            f"tickTime={TICK_MS}\n"
            f"dataDir={directory / 'data'}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=ruok,srvr,cons\n"
            "maxClientCnxns=0\n"
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until it serves, at most ``timeout`` seconds."""
        assert self.process is None, "already running"
        log = (self.directory / "server.log").open("ab")
        self.process = subprocess.Popen(
            [
                "java",
                "-Xms32m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Dzookeeper.jmx.log4j.disable=true",
                "-cp",
                str(JAR),
                MAIN,
                str(self.config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        log.close()
        # the one bounded poll: a server starting has no event to wait on but its port
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                output = (self.directory / "server.log").read_text(errors="replace")[-2000:]
                self.process = None
                raise AssertionError(f"ZooKeeper exited while starting:\n{output}")
            assert time.monotonic() < deadline, f"ZooKeeper not serving within {timeout} s"
            time.sleep(0.05)

    def _answers(self) -> bool:
        # `ruok` says imok as soon as the process runs; `srvr` gives the mode only once
        # it serves (before: "not currently serving requests"), after loading its data
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                probe.sendall(b"srvr")
                answer = b""
                while chunk := probe.recv(4096):
                    answer += chunk
                return b"Mode: " in answer
        except OSError:
            return False

    def stop(self) -> None:
        """Stop it (SIGKILL: nothing to flush that its transaction log does not have)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


def providers_of(reader: KazooClient, interface: str, group: str) -> list[ServiceURL]:
    """The provider URLs of ``interface`` and ``group`` registered in ZooKeeper, as
    ``reader`` (a plain kazoo client) reads them; none when the folder is missing."""
    path = f"/dubbo/{encode(interface)}/providers"
    if not reader.exists(path):
        return []
    urls = [ServiceURL.parse(decode(child)) for child in reader.get_children(path)]
    return [url for url in urls if url.group == group]
