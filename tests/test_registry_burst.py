"""What a burst of registry updates costs a consumer (docs/cluster.md, "A burst of
registry updates"): providers registering one by one in a real ZooKeeper under a
subscribed consumer in a process of its own, whose memory is read from /proc."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import run
from helpers import checked_threads, read_line
from kazoo.client import KazooClient
from zookeeper import ZooKeeper

from backchannel.cluster.registry import Subscription
from backchannel.cluster.service_url import ServiceURL, encode
from backchannel.transport.handoff import inbox

CONSUMER = Path(__file__).with_name("burst_consumer.py")
#: the consumer imports this checkout's backchannel, whatever the venv has installed
SOURCE = str(Path(__file__).resolve().parents[1] / "src")
#: providers registered one by one in the burst
BURST = 2000
#: what the burst may add to the consumer's peak resident memory (measured: 5-7 MiB
#: now; 90-130 MiB before, growing with the square of the burst)
BURST_MIB = 40


def provider_url(service: str, i: int) -> ServiceURL:
    """The ``i``-th provider of ``service``, at an address nobody calls."""
    host = f"127.{1 + i // 62500}.{i // 250 % 250}.{1 + i % 250}"
    return ServiceURL.provider(service, host, 1, application="burst", methods=["ping"])


def test_a_burst_of_2000_registrations_under_a_busy_consumer_costs_bounded_memory(
    zookeeper: ZooKeeper,
) -> None:
    """2,000 providers register one by one while the consumer's loop is held (busy):
    its peak RSS grows by less than BURST_MIB, and once free it knows all 2,000.
    Failed before: every update was parsed again in full and queued for the loop as a
    set of new URL objects (48 -> 138 MiB peak for 2,000, 175 MiB for 3,000)."""
    service = f"burst.Service{time.monotonic_ns()}"
    consumer = subprocess.Popen(
        [sys.executable, str(CONSUMER), zookeeper.address, service, str(BURST), "0", "busy"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=CONSUMER.parent,
        env={**os.environ, "PYTHONPATH": SOURCE},
    )
    writer = KazooClient(hosts=zookeeper.hosts)
    writer.start(timeout=10)
    try:
        ready = read_line(consumer, 30, "the consumer's ready line").split()
        assert ready[0] == "ready", ready
        before = int(ready[1])
        path = f"/dubbo/{encode(service)}/providers"
        for i in range(BURST):  # one by one: each a change the consumer is told of
            url = provider_url(service, i)
            writer.create(f"{path}/{encode(url.to_string())}", b"", ephemeral=True)
        assert consumer.stdin is not None
        consumer.stdin.write("go\n")
        consumer.stdin.flush()
        done = read_line(consumer, 40, "the consumer's done line").split()
        assert done[0] == "done", done
        peak = int(done[2])
        grown = (peak - before) / 1024
        assert grown < BURST_MIB, f"the peak RSS grew by {grown:.1f} MiB"
        assert consumer.wait(10) == 0
    finally:
        writer.stop()
        writer.close()
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait(5)


def test_offers_faster_than_the_loop_takes_them_are_delivered_as_the_latest_only() -> None:
    """100 offers from another thread while the subscriber's loop is held: one delivery,
    of the last set (it was 100 deliveries, each set queued until then)."""
    delivered: list[frozenset[ServiceURL]] = []

    async def body() -> None:
        loop = asyncio.get_running_loop()
        got = asyncio.Event()

        def listener(providers: frozenset[ServiceURL]) -> None:
            delivered.append(providers)
            got.set()

        subscription = Subscription("burst.Unit", "", "", listener, loop)
        urls = [provider_url("burst.Unit", i) for i in range(100)]
        offered = threading.Event()

        def offer() -> None:
            for n in range(1, 101):
                subscription.offer(urls[:n])
            offered.set()

        with checked_threads(10) as start:  # an offer that raised fails the test
            start(offer)
            assert offered.wait(10)  # holds the loop: nothing posted to it runs meanwhile
        async with asyncio.timeout(5):
            await got.wait()
        # every delivery the offers posted runs before this (the inbox runs in order)
        drained = loop.create_future()
        inbox(loop).post(drained.set_result, None)
        async with asyncio.timeout(5):
            await drained
        assert not subscription._posted  # and none is left due on a later turn
        assert len(delivered) == 1 and delivered[0] == frozenset(urls)
        assert subscription.providers == frozenset(urls)
        got.clear()
        subscription.offer(urls[:1])  # a later change is delivered too
        async with asyncio.timeout(5):  # it may wait its turn
            await got.wait()
        assert len(delivered) == 2 and delivered[-1] == frozenset(urls[:1])

    run(body())
