"""Overload from a peer that misbehaves: calls never answered, streams never read.

Nothing is lost silently and no memory grows without bound; other streams go on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from conftest import RawStream, run
from services import Echo, EchoImpl

import backchannel
from backchannel import Argument, Limits, Method
from backchannel.v1 import envelope_pb2 as pb

# ------------------------------------------------------------------ expiry cascade

#: callbacks the provider pushes at once to a consumer that never answers
FLOOD = 5000
#: the slow consumer's in-flight limit, as it states in its hello
SLOTS = 10


@backchannel.interface("test.Flood")
class Flood:
    """A listener, and a burst of callback calls to it."""

    def subscribe(self, listener: Any) -> None: ...
    def flood(self, count: int) -> list[float]: ...


class FloodImpl:
    def __init__(self) -> None:
        self.listener: Any = None

    def subscribe(self, listener: Any) -> None:
        self.listener = listener

    async def flood(self, count: int) -> list[float]:
        """Push ``count`` callback calls in one loop turn; [seconds the burst took to
        make, how many failed with DeadlineExceeded]."""
        started = time.monotonic()
        calls = [self.listener.changed(i) for i in range(count)]
        made = time.monotonic() - started
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        expired = sum(isinstance(outcome, backchannel.DeadlineExceeded) for outcome in outcomes)
        return [made, float(expired)]


FLOOD_METHODS = [Method("subscribe", arguments=[Argument(index=0, callback=True)])]


def test_callbacks_that_expire_waiting_for_a_slot_are_never_sent() -> None:
    """A consumer states 10 in-flight slots and never answers: 5,000 callbacks pushed at
    once expire, and only a few are ever sent (each sent one holds its slot until it
    expires; one that waited until little of its time was left is not sent), while
    another consumer's 1 s calls all succeed."""
    with backchannel.Server(callback_timeout=1.0) as server:
        server.export(Flood, FloodImpl(), methods=FLOOD_METHODS)
        server.export(Echo, EchoImpl())

        async def body() -> None:
            stream = RawStream(server.address)
            hello = pb.Hello(protocol_version=1, application="silent", max_calls_in_flight=SLOTS)
            await stream.send(pb.Frame(hello=hello))
            assert (await stream.recv()).WhichOneof("kind") == "welcome"
            listener = pb.Value(callback_value=pb.CallbackRef(id=1))
            await stream.send(
                pb.Frame(
                    call=pb.Call(id=1, service="test.Flood", method="subscribe", args=[listener])
                )
            )
            assert (await stream.recv()).result.id == 1
            count = pb.Value(int_value=FLOOD)
            await stream.send(
                pb.Frame(call=pb.Call(id=2, service="test.Flood", method="flood", args=[count]))
            )
            done = asyncio.Event()

            async def well_behaved() -> int:
                answered = 0
                async with backchannel.AsyncClient(server.address, timeout=1.0) as client:
                    echo = client.reference(Echo)
                    while not done.is_set():
                        assert await echo.add(answered, 1) == answered + 1  # within 1 s
                        answered += 1
                return answered

            other = asyncio.create_task(well_behaved())
            calls = cancels = 0
            while True:  # what the provider sends the silent consumer, until flood returns
                frame = await stream.recv(timeout=10)
                kind = frame.WhichOneof("kind")
                if kind == "call":
                    calls += 1
                elif kind == "cancel":
                    cancels += 1
                elif kind == "result" and frame.result.id == 2:
                    break
            done.set()
            assert await other > 0
            made, expired = frame.result.value.list_value.items
            assert expired.double_value == FLOOD  # every call failed, none was lost
            # each slot takes a call at most once per tenth of the timeout (1 s), and only
            # while calls made in the burst still have more than that left
            bound = SLOTS * (1 + int(made.double_value / 0.1) + 1)
            assert calls <= bound, f"{calls} of {FLOOD} expired callbacks were sent"
            assert cancels == calls  # a Cancel for each call sent, none for the others
            await stream.close()

        run(body())


def test_calls_that_expire_waiting_for_a_slot_do_not_pile_up() -> None:
    """The provider runs one call at a time and one never ends: rounds of calls expire
    while they wait for its slot, and the queue of waiting calls does not keep them."""
    with backchannel.Server(limits=Limits(max_calls_in_flight=1)) as server:
        server.export(Echo, EchoImpl())

        async def body() -> None:
            async with backchannel.AsyncClient(server.address) as client:
                quick = client.reference(Echo, timeout=0.05)
                assert await quick.add(1, 1) == 2
                session = client._session
                assert session is not None
                # runs first (tasks start in order): the one slot is taken before the rest
                hold = asyncio.create_task(client.reference(Echo, timeout=30).wait(20))
                for _round in range(5):
                    outcomes = await asyncio.gather(
                        *(quick.add(i, 1) for i in range(2000)), return_exceptions=True
                    )
                    assert all(isinstance(o, backchannel.DeadlineExceeded) for o in outcomes)
                assert not hold.done()  # the slot was held throughout
                # main kept all 10,000 expired calls queued
                assert len(session._waiting) <= 4096
                hold.cancel()

        run(body())
