"""Re-entrant calls never wait for a free pool thread (docs/callbacks.md, *Thread pools
and re-entrancy*): more concurrent re-entrant chains than ``max_workers``, over real
loopback, with the default pool sizes; and a pool that runs out says so, once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import run
from helpers import wait_until

import backchannel
from backchannel import Argument
from backchannel.transport.pools import CallPools
from backchannel.transport.portal import LoopThread
from backchannel.v1 import envelope_pb2 as pb

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

#: more concurrent calls than the default max_workers (32)
CONCURRENT = 40
#: per forward call: a stall fails the test quickly, well before the test's own timeout
CALL_TIMEOUT = 3.0
#: what the provider waits for a listener; a stall shows as the client's timeout first
CALLBACK_TIMEOUT = 5.0
#: all chains done within this: far under CALLBACK_TIMEOUT, so nothing waited for it
WITHIN = 2.0


@backchannel.interface("test.Approver")
class Approver:
    """What the consumer implements: it looks the request up before it answers."""

    def approve(self, request: str) -> str: ...
    def check(self, request: str, depth: int) -> str: ...


@backchannel.interface("test.Approvals")
class Approvals:
    """A provider whose submit asks the consumer's approver, which calls lookup."""

    @backchannel.method(arguments=[Argument(index=1)])
    def submit(self, request: str, approver: Approver) -> str: ...
    def lookup(self, request: str) -> str: ...
    @backchannel.method(arguments=[Argument(index=1)])
    def deep(self, request: str, approver: Approver, depth: int) -> str: ...


class ApprovalsImpl:
    """Plain methods: each runs in the provider's thread pool, submit blocks its thread."""

    def submit(self, request: str, approver: Any) -> str:
        return f"submitted {approver.approve(request)}"

    def lookup(self, request: str) -> str:
        return f"found {request}"

    def deep(self, request: str, approver: Any, depth: int) -> str:
        return str(approver.check(request, depth))


#: the default max_workers: when that many approvals wait at once, every provider thread
#: is blocked in submit() (on today's main, the lookups then have no thread to run on)
QUORUM = 32


class Quorum:
    """Holds each approval until ``QUORUM`` of them are held at once, whatever the timing
    of the callers; the later ones pass at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self.reached = threading.Event()

    def wait(self) -> None:
        with self._lock:
            self._count += 1
            if self._count >= QUORUM:
                self.reached.set()
        assert self.reached.wait(CALL_TIMEOUT), f"never {QUORUM} approvals at once"


class AsyncQuorum:
    """The same for listeners on one event loop."""

    def __init__(self) -> None:
        self._count = 0
        self.reached = asyncio.Event()

    async def wait(self) -> None:
        self._count += 1
        if self._count >= QUORUM:
            self.reached.set()
        await asyncio.wait_for(self.reached.wait(), CALL_TIMEOUT)


class SyncApprover:
    """A plain listener (the client's pool runs it) that calls the provider from there."""

    def __init__(self, service: Any, quorum: Any = None) -> None:
        self.service = service
        self.quorum = quorum

    def approve(self, request: str) -> str:
        if self.quorum is not None:
            self.quorum.wait()
        return f"approved {self.service.lookup(request)}"

    def check(self, request: str, depth: int) -> str:
        """Back to the provider ``depth`` more times, each call nested in the last."""
        if depth == 0:
            return f"leaf {request}"
        return str(self.service.deep(request, self, depth - 1))


class AsyncApprover(SyncApprover):
    """The same listener for an AsyncClient, on its loop."""

    async def approve(self, request: str) -> str:  # type: ignore[override]
        if self.quorum is not None:
            await self.quorum.wait()
        return f"approved {await self.service.lookup(request)}"

    async def check(self, request: str, depth: int) -> str:  # type: ignore[override]
        if depth == 0:
            return f"leaf {request}"
        return str(await self.service.deep(request, self, depth - 1))


def expected(i: int) -> str:
    return f"submitted approved found r{i}"


@pytest.fixture(params=["Server", "AsyncServer"])
def provider(request: pytest.FixtureRequest) -> Iterator[str]:
    """The address of a provider with default pools: a sync Server, or an AsyncServer
    on a loop thread of its own (both run the plain methods in their pool)."""
    if request.param == "Server":
        with backchannel.Server(callback_timeout=CALLBACK_TIMEOUT) as server:
            server.export(Approvals, ApprovalsImpl())
            yield server.address
        return
    portal = LoopThread("test-provider")

    async def start() -> backchannel.AsyncServer:
        server = backchannel.AsyncServer(callback_timeout=CALLBACK_TIMEOUT)
        server.export(Approvals, ApprovalsImpl())
        await server.start()
        return server

    core = portal.run(start())
    try:
        yield core.address
    finally:
        portal.run(core.stop())
        portal.close()


def test_forty_concurrent_reentrant_approvals_with_a_sync_client(provider: str) -> None:
    with backchannel.Client(provider, timeout=CALL_TIMEOUT) as client:
        service = client.reference(Approvals)
        quorum = Quorum()
        approvers = [SyncApprover(service, quorum) for _ in range(CONCURRENT)]
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as callers:
            results = list(
                callers.map(lambda i: service.submit(f"r{i}", approvers[i]), range(CONCURRENT))
            )
        elapsed = time.monotonic() - started
    assert results == [expected(i) for i in range(CONCURRENT)]
    assert elapsed < WITHIN, f"{CONCURRENT} re-entrant chains took {elapsed:.2f} s"


def test_forty_concurrent_reentrant_approvals_with_an_async_client(provider: str) -> None:
    async def main() -> float:
        async with backchannel.AsyncClient(provider, timeout=CALL_TIMEOUT) as client:
            service = client.reference(Approvals)
            quorum = AsyncQuorum()
            started = time.monotonic()
            approvers = [AsyncApprover(service, quorum) for _ in range(CONCURRENT)]
            results = await asyncio.gather(
                *(service.submit(f"r{i}", approvers[i]) for i in range(CONCURRENT))
            )
            elapsed = time.monotonic() - started
        assert results == [expected(i) for i in range(CONCURRENT)]
        return elapsed

    elapsed = run(main())
    assert elapsed < WITHIN, f"{CONCURRENT} re-entrant chains took {elapsed:.2f} s"


def test_forty_concurrent_chains_three_calls_deep(provider: str) -> None:
    # each chain holds three provider threads and three client threads at its deepest:
    # 120 on each side, far past max_workers, each nested call on an extra thread
    with backchannel.Client(provider, timeout=CALL_TIMEOUT) as client:
        service = client.reference(Approvals)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as callers:
            results = list(
                callers.map(
                    lambda i: service.deep(f"r{i}", SyncApprover(service), 3), range(CONCURRENT)
                )
            )
        elapsed = time.monotonic() - started
    assert results == [f"leaf r{i}" for i in range(CONCURRENT)]
    assert elapsed < WITHIN, f"{CONCURRENT} chains three deep took {elapsed:.2f} s"


# ------------------------------------------------- the client's listener pool, 100 listeners

LISTENERS = 100


@backchannel.interface("test.Subscriber")
class Subscriber:
    def changed(self, msg: str) -> str: ...


@backchannel.interface("test.Broadcaster")
class Broadcaster:
    """broadcast() calls every subscriber at once; each calls relay(), which calls that
    subscriber again, nested in its own call."""

    @backchannel.method(arguments=[Argument(index=1)])
    def subscribe(self, key: str, subscriber: Subscriber) -> None: ...
    def broadcast(self) -> list[str]: ...
    def relay(self, key: str) -> str: ...


class BroadcasterImpl:
    def __init__(self) -> None:
        self.subscribers: dict[str, Any] = {}

    def subscribe(self, key: str, subscriber: Any) -> None:
        self.subscribers[key] = subscriber

    async def broadcast(self) -> list[str]:
        calls = [subscriber.changed("outer") for subscriber in self.subscribers.values()]
        return list(await asyncio.gather(*calls))

    def relay(self, key: str) -> str:
        return str(self.subscribers[key].changed("inner"))


class Relaying:
    """A plain listener: the client's pool runs it; on "outer" it calls relay()."""

    def __init__(self, key: str, service: Any) -> None:
        self.key = key
        self.service = service

    def changed(self, msg: str) -> str:
        if msg == "outer":
            return f"{self.key} relayed {self.service.relay(self.key)}"
        return f"{self.key} {msg}"


def test_a_hundred_listeners_that_call_the_provider_back_with_a_sync_client() -> None:
    with (
        backchannel.Server(callback_timeout=CALLBACK_TIMEOUT) as server,
        backchannel.Client(server.address, timeout=CALL_TIMEOUT) as client,
    ):
        server.export(Broadcaster, BroadcasterImpl())
        service = client.reference(Broadcaster)
        for i in range(LISTENERS):
            service.subscribe(f"s{i}", Relaying(f"s{i}", service))
        started = time.monotonic()
        results = service.broadcast()
        elapsed = time.monotonic() - started
    assert results == [f"s{i} relayed s{i} inner" for i in range(LISTENERS)]
    assert elapsed < WITHIN, f"{LISTENERS} re-entrant listeners took {elapsed:.2f} s"


# -------------------------------------------------------------- exhausted pools say so


@backchannel.interface("test.Gate")
class Gate:
    def hold(self) -> bool: ...


class GateImpl:
    def __init__(self) -> None:
        self.open = threading.Event()

    def hold(self) -> bool:
        return self.open.wait(CALL_TIMEOUT)


def pool_warnings(caplog: pytest.LogCaptureFixture, keyword: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "backchannel"
        and record.levelno == logging.WARNING
        and f"{keyword}=" in record.getMessage()
    ]


def test_a_full_pool_is_logged_once_with_the_keyword_to_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="backchannel")
    gate = GateImpl()
    with (
        backchannel.Server(max_workers=2) as server,
        backchannel.Client(server.address, timeout=CALL_TIMEOUT) as client,
        concurrent.futures.ThreadPoolExecutor(3) as callers,
    ):
        server.export(Gate, gate)
        service = client.reference(Gate)
        pool = server._core._pools.regular
        for _round in range(2):  # the pool runs out twice; the second time is not logged
            holding = [callers.submit(service.hold) for _ in range(3)]  # one waits
            # the third is queued for a thread: the pool has run out (again); the warning
            # follows the queueing, and the count after the server stopped says if the
            # second time logged it too
            wait_until(lambda: pool.queued == 1, 5, "the third call queued")
            wait_until(lambda: pool_warnings(caplog, "max_workers"), 5, "the warning")
            gate.open.set()
            assert [call.result(CALL_TIMEOUT) for call in holding] == [True] * 3
            gate.open.clear()
    [warning] = pool_warnings(caplog, "max_workers")
    assert "provider thread pool is exhausted" in warning
    assert "all 2 threads (max_workers=2) are busy" in warning
    assert "raise max_workers= on the Server or AsyncServer" in warning


def test_a_full_reentrant_pool_is_logged_once_with_the_keyword_to_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # one regular and one extra thread: a chain three calls deep on the provider has
    # nowhere to run its third, which waits until the provider's callbacks time out
    caplog.set_level(logging.WARNING, logger="backchannel")
    with (
        backchannel.Server(max_workers=1, max_reentrant_workers=1, callback_timeout=0.5) as server,
        backchannel.Client(server.address, timeout=CALL_TIMEOUT) as client,
    ):
        server.export(Approvals, ApprovalsImpl())
        service = client.reference(Approvals)
        with pytest.raises(backchannel.DeadlineExceeded):
            service.deep("r", SyncApprover(service), 2)
        with pytest.raises(backchannel.DeadlineExceeded):
            service.deep("r", SyncApprover(service), 2)  # again: not logged again
    [warning] = pool_warnings(caplog, "max_reentrant_workers")
    assert "provider re-entrant thread pool is exhausted" in warning
    assert "all 1 threads (max_reentrant_workers=1)" in warning
    assert "raise max_reentrant_workers= on the Server or AsyncServer" in warning
    assert pool_warnings(caplog, "max_workers") == []  # the regular pool never queued


def test_pool_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="max_reentrant_workers must be an int >= 1, got 0"):
        backchannel.Server(max_reentrant_workers=0)
    with pytest.raises(ValueError, match="max_reentrant_workers must be an int >= 1, got 0"):
        backchannel.Client("127.0.0.1:1", max_reentrant_workers=0)


# ------------------------------------------------------------- the choice, as a unit


class Waiting:
    """A session waiting for the answers to some of its outgoing calls."""

    def __init__(self, *call_ids: int) -> None:
        self.call_ids = set(call_ids)

    def awaits(self, call_id: int) -> bool:
        return call_id in self.call_ids


def test_a_nested_call_takes_a_regular_thread_while_one_is_free_else_an_extra_one() -> None:
    pools = CallPools(1, 1, role="test", owners="Test")
    nested, fresh = pb.Call(id=7, parent_id=3), pb.Call(id=8)
    gate = threading.Event()
    try:
        assert pools.for_call(nested, Waiting(3)) is pools.regular  # a thread is free
        pools.regular.submit(gate.wait, 5)
        assert pools.for_call(fresh, Waiting(3)) is pools.regular  # queues for it
        assert pools.for_call(nested, Waiting(3)) is pools.reentrant
        assert pools.for_call(nested, Waiting()) is pools.regular  # its parent is answered
        assert pools.for_call(nested, None) is pools.regular  # not on a stream
    finally:
        gate.set()
        pools.shutdown()
