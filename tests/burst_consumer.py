"""A consumer in a process of its own, subscribed through ZooKeeper while providers
register one by one: it reports its memory, for tests/test_cluster_deadline.py's
registry-burst test.

``python burst_consumer.py ZOOKEEPER SERVICE COUNT [CALLERS] [busy]``: logs at INFO to stderr (as an
application would), subscribes an AsyncClient to SERVICE (its first call finds no
provider), prints ``ready RSS_KIB``, then waits until it
knows COUNT providers (at most 120 s) and prints ``done RSS_KIB PEAK_KIB SECONDS``: its
resident memory then and its peak (VmHWM) over the whole run, from /proc/self/status.
With CALLERS, that many tasks call ``ping`` meanwhile (timeout 1 s), over and over, and
the line ends with how many calls succeeded, how many failed, and how many callers
had not returned 10 s after being told to stop. With ``busy``, its event loop is held
(as by a long computation) from ``ready`` until a line arrives on stdin: the registry's
updates meanwhile wait for it.
"""

import asyncio
import contextlib
import logging
import sys
import time

import backchannel
from backchannel.cluster.loadbalance import NoProvider


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


async def main(zookeeper: str, service: str, count: int, callers: int, busy: bool) -> None:
    @backchannel.interface(service)
    class Burst:
        def ping(self) -> None: ...

    async with backchannel.AsyncClient(zookeeper, timeout=5) as client:
        reference = client.reference(Burst)
        with contextlib.suppress(NoProvider):  # none yet: the subscription is made anyway
            await reference.ping()
        directory = client._directories[(service, "", "")]
        outcomes = {"ok": 0, "failed": 0}
        calling = True

        async def caller() -> None:
            while calling:
                try:
                    await reference.ping()
                    outcomes["ok"] += 1
                except Exception:
                    outcomes["failed"] += 1
                    await asyncio.sleep(0.01)  # no provider at all: not a busy loop

        tasks = [asyncio.ensure_future(caller()) for _ in range(callers)]
        print("ready", status_kib("VmRSS"), flush=True)
        if busy:
            sys.stdin.readline()  # the loop is held: nothing it is posted runs meanwhile
        started = time.monotonic()
        while len(directory.urls) < count:  # told on this loop; no event to wait on
            assert time.monotonic() - started < 120, f"{len(directory.urls)} of {count}"
            await asyncio.sleep(0.05)
        seconds = time.monotonic() - started
        calling = False
        rss, peak = status_kib("VmRSS"), status_kib("VmHWM")
        if tasks:
            _done, stuck = await asyncio.wait(tasks, timeout=10)
            for task in stuck:
                task.cancel()
        else:
            stuck = set()
        print(
            "done",
            rss,
            peak,
            f"{seconds:.2f}",
            outcomes["ok"],
            outcomes["failed"],
            len(stuck),
            flush=True,
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    callers = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    busy = sys.argv[5:] == ["busy"]
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), callers, busy))
