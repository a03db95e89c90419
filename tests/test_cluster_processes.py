"""Clusters with real provider processes (tests/cluster_provider.py) behind the real
ZooKeeper fixture: spreading, a provider SIGKILLed under load, a provider joining, and
a resubscribed listener that outlives its provider."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_provider import Node
from conftest import run
from helpers import RANDOM_CALLS, CheckedThread, read_line, wait_until
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from notifier import Notifier, SyncRecorder
from zookeeper import ZooKeeper

import backchannel
from backchannel import Method
from backchannel.cluster.service_url import ServiceURL, decode

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

SCRIPT = Path(__file__).with_name("cluster_provider.py")
_groups = itertools.count()


class Cluster:
    """Provider processes of one group, registered in ZooKeeper."""

    def __init__(self, registry: str) -> None:
        self.registry = registry
        self.group = f"cluster{next(_groups)}"
        self.processes: dict[str, subprocess.Popen[str]] = {}

    def start(self, count: int) -> list[str]:
        """Start ``count`` providers at once; their addresses, once all are registered."""
        started = [
            subprocess.Popen(
                [sys.executable, str(SCRIPT), self.registry, self.group],
                stdout=subprocess.PIPE,
                text=True,
                cwd=SCRIPT.parent,
            )
            for _ in range(count)
        ]
        addresses = []
        for process in started:
            line = read_line(process, 20, "a cluster provider")
            assert line.startswith("ready "), f"a cluster provider printed {line!r}"
            address = line.removeprefix("ready ")
            self.processes[address] = process
            addresses.append(address)
        return addresses

    def kill(self, address: str) -> None:
        process = self.processes.pop(address)
        process.kill()
        process.wait(5)

    def close(self) -> None:
        for address in list(self.processes):
            self.kill(address)


@pytest.fixture
def cluster(zookeeper: ZooKeeper) -> Iterator[Cluster]:
    cluster = Cluster(zookeeper.address)
    yield cluster
    cluster.close()


def test_calls_spread_over_three_provider_processes_as_each_strategy_says(
    cluster: Cluster,
) -> None:
    """roundrobin: exactly 100 of 300 each; random: a third each within ±5 points of
    1,500 calls (4.1 standard deviations: outside by chance about once in 8,000 runs)."""
    addresses = cluster.start(3)
    with backchannel.Client(cluster.registry, timeout=5) as client:
        rr = client.reference(Node, group=cluster.group, loadbalance="roundrobin")
        answered = Counter(rr.whoami(i)[0] for i in range(300))
        assert answered == {address: 100 for address in addresses}
        rnd = client.reference(Node, group=cluster.group)
        answered = Counter(rnd.whoami(i)[0] for i in range(RANDOM_CALLS))
        assert set(answered) == set(addresses)
        assert all(abs(n / RANDOM_CALLS - 1 / 3) < 0.05 for n in answered.values()), answered


def test_a_provider_killed_under_64_callers(cluster: Cluster) -> None:
    """SIGKILL one of three under 64 concurrent callers: every call succeeds or fails
    with a clear connection error (only those that were in flight on the dead stream),
    none hangs; from 2 s after the kill the dead provider is given no call; a provider
    that registers meanwhile gets calls within 2 s."""
    addresses = cluster.start(3)
    victim = addresses[0]

    async def body() -> None:
        async with backchannel.AsyncClient(cluster.registry, timeout=5) as client:
            node = client.reference(Node, group=cluster.group)
            outcomes: list[tuple[float, Any]] = []
            stop = asyncio.Event()
            # what the callers saw, as events: the test waits on these, not on the clock
            seen: set[str] = set()
            all_three, joined_seen, more_load = asyncio.Event(), asyncio.Event(), asyncio.Event()
            watch: dict[str, Any] = {"joined": None, "after": 0}

            def record(outcome: Any) -> None:
                outcomes.append((time.monotonic(), outcome))
                if isinstance(outcome, list):
                    seen.add(outcome[0])
                    if outcome[0] == watch["joined"]:
                        joined_seen.set()
                if len(seen) == 3 and len(outcomes) >= 500:
                    all_three.set()
                if watch["after"] and len(outcomes) >= watch["after"]:
                    more_load.set()

            async def caller(n: int) -> None:
                for i in itertools.count():
                    if stop.is_set():
                        return
                    try:
                        outcome: Any = await node.whoami(n * 1_000_000 + i)
                    except backchannel.BackchannelError as exc:
                        outcome = exc
                    record(outcome)

            callers = [asyncio.ensure_future(caller(n)) for n in range(64)]
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(all_three.wait(), 10)  # load reaches every provider
            assert {o[0] for _, o in outcomes if isinstance(o, list)} == set(addresses)
            link = client._links[victim]  # held: the client may drop it once it is gone
            killed = time.monotonic()
            await loop.run_in_executor(None, cluster.kill, victim)
            # the bound under test is a duration: what the victim was given by 2 s after
            # its death is all it is ever given
            await asyncio.sleep(2.0)
            sent_at_2s = link.sent
            (joined,) = await loop.run_in_executor(None, cluster.start, 1)
            registered = time.monotonic()
            watch["joined"] = joined
            if any(isinstance(o, list) and o[0] == joined for _, o in outcomes):
                joined_seen.set()
            try:
                await asyncio.wait_for(joined_seen.wait(), 2 - (time.monotonic() - registered))
            except TimeoutError:
                raise AssertionError("the new provider got no call within 2 s") from None
            watch["after"] = len(outcomes) + 1000  # more load after the join
            await asyncio.wait_for(more_load.wait(), 10)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*callers), 10)  # none hangs
            assert link.sent == sent_at_2s  # nothing given to it after 2 s
            assert client._links.get(victim) in (None, link)  # nor to a new link to it
            failures = [o for _, o in outcomes if not isinstance(o, list)]
            assert all(isinstance(f, backchannel.StreamBroken) for f in failures), failures[:3]
            assert len(failures) <= 64  # at most the calls in flight on the dead stream
            late = [o for t, o in outcomes if t > killed + 0.5]
            assert late and all(isinstance(o, list) and o[0] != victim for o in late)
            assert len(outcomes) > 1000

    run(body())


def test_a_resubscribed_listener_keeps_receiving_after_its_provider_is_killed(
    cluster: Cluster,
) -> None:
    cluster.start(3)
    with backchannel.Client(cluster.registry, timeout=5) as client:
        ticker = client.reference(
            Notifier, group=cluster.group, methods=[Method("addListener", resubscribe=True)]
        )
        recorder = SyncRecorder()
        ticker.addListener("ticks", recorder)
        assert recorder.wait_for(3)
        (holder,) = [a for a, link in client._core._links.items() if link.subscriptions]
        cluster.kill(holder)
        killed = len(recorder.received)
        assert recorder.wait_for(killed + 1, timeout=2)  # "init" from its new provider
        assert "init" in recorder.received[killed:]
        assert recorder.wait_for(len(recorder.received) + 5, timeout=2)  # and ticks
        (new_holder,) = [a for a, link in client._core._links.items() if link.subscriptions]
        assert new_holder != holder
        assert client.callback_count == 1


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster"


def test_the_cluster_example_consumer_survives_its_provider_being_killed(
    zookeeper: ZooKeeper,
) -> None:
    """examples/cluster: three providers, a consumer; SIGKILL the provider its lines
    name, and the lines go on, naming another."""
    providers: dict[str, subprocess.Popen[str]] = {}
    consumer = None
    try:
        for _ in range(3):
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(EXAMPLE / "provider.py"),
                    zookeeper.address,
                    "--interval",
                    "0.2",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            line = read_line(process, 20, "examples/cluster/provider.py")
            assert line.startswith("registered "), line
            providers[line.split()[1]] = process
        consumer = subprocess.Popen(
            [sys.executable, str(EXAMPLE / "consumer.py"), zookeeper.address],
            stdout=subprocess.PIPE,
            text=True,
        )
        first = read_line(consumer, 20, "examples/cluster/consumer.py")
        assert first.startswith("callback1:Changed: "), first
        second = read_line(consumer, 5, "examples/cluster/consumer.py")  # a push: added
        assert second.startswith("callback1:Changed: "), second
        holder = second.rsplit(" from ", 1)[1]
        providers[holder].kill()
        providers[holder].wait(5)
        for _ in range(30):  # lines already on their way may still name the dead one
            line = read_line(consumer, 3, "the consumer, after the kill")
            assert line.startswith("callback1:Changed: "), line
            if line.rsplit(" from ", 1)[1] != holder:
                break
        else:
            raise AssertionError("no notification from another provider after the kill")
        assert line.rsplit(" from ", 1)[1] in providers
    finally:
        for process in [*providers.values(), *([consumer] if consumer else [])]:
            process.kill()
            process.wait(5)


@pytest.mark.parametrize("data", ["kept", "lost"])
def test_zookeeper_killed_and_restarted_under_load(own_zookeeper: ZooKeeper, data: str) -> None:
    """Three provider processes and a Client calling from 8 threads, all with 2 s
    sessions: with ZooKeeper killed, every call still succeeds (the consumer keeps its
    last providers); once it is back on the same port, the providers' nodes are there
    again, and a provider that registers after the restart gets calls within 2 s.

    "kept": back with its data after 1 s, within the sessions, which live on. "lost":
    back after 3 s with no data at all (it refuses the old sessions, having never seen
    their transactions): everyone starts a new session and makes its nodes again."""
    cluster = Cluster(f"{own_zookeeper.address}?session=2000")
    down = 1.0 if data == "kept" else 3.0
    try:
        addresses = cluster.start(3)
        with backchannel.Client(cluster.registry, timeout=5) as client:
            node = client.reference(Node, group=cluster.group)
            outcomes: list[tuple[float, Any]] = []
            stop = threading.Event()

            def caller(n: int) -> None:
                for i in itertools.count():
                    if stop.is_set():
                        return
                    try:
                        outcome: Any = node.whoami(n * 1_000_000 + i)
                    except Exception as exc:  # any failure is counted
                        outcome = exc
                    outcomes.append((time.monotonic(), outcome))

            callers = [CheckedThread(caller, n) for n in range(8)]
            for thread in callers:
                thread.start()
            try:
                wait_until(lambda: len(outcomes) > 100, 10, "calls before the kill")
                own_zookeeper.stop()
                stopped = time.monotonic()
                # the load runs on while ZooKeeper is gone
                wait_until(lambda: time.monotonic() - stopped > down, down + 5, "load while down")
                during = [o for t, o in outcomes if t > stopped]
                if data == "lost":
                    shutil.rmtree(own_zookeeper.directory / "data")
                    (own_zookeeper.directory / "data").mkdir()
                own_zookeeper.start()
                restarted = time.monotonic()
                zk = KazooClient(hosts=own_zookeeper.hosts)
                zk.start(10)
                try:
                    path = "/dubbo/test.cluster.Node/providers"

                    def registered() -> set[str]:
                        try:
                            children = zk.get_children(path)
                        except NoNodeError:  # a new ZooKeeper, before any node
                            return set()
                        return {
                            f"{u.host}:{u.port}"
                            for u in (ServiceURL.parse(decode(c)) for c in children)
                            if u.group == cluster.group
                        }

                    wait_until(lambda: registered() == set(addresses), 10, "nodes back")
                    consumers = "/dubbo/test.cluster.Node/consumers"

                    def consumer_back() -> bool:  # connected, and its own node made again
                        try:
                            children = zk.get_children(consumers)
                        except NoNodeError:
                            return False
                        registry = client._core._registry
                        return bool(registry and registry.connected) and any(
                            ServiceURL.parse(decode(c)).group == cluster.group for c in children
                        )

                    wait_until(consumer_back, 10, "the consumer back in ZooKeeper")
                    (joined,) = cluster.start(1)
                    joined_at = time.monotonic()
                    assert joined in registered()
                finally:
                    zk.stop()
                    zk.close()
                wait_until(
                    lambda: any(
                        isinstance(o, list) and o[0] == joined for t, o in outcomes if t > joined_at
                    ),
                    2,
                    "a call to the provider that registered after the restart",
                )
            finally:
                stop.set()
                for thread in callers:
                    thread.join(10)
            for thread in callers:  # none hangs, none raised
                thread.check(0)
            failures = [o for _, o in outcomes if not isinstance(o, list)]
            assert not failures, failures[:3]
            assert len(during) > 100, len(during)  # calls went on while it was down
            assert {o[0] for o in during} == set(addresses)
            after = [o for t, o in outcomes if t > restarted]
            assert after
    finally:
        cluster.close()
