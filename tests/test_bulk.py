"""Bulk data does not hold up other consumers: a big result is encoded, and big arguments
are decoded, off the provider's event loop, so other streams' small calls keep being
answered meanwhile.

The result is a dict whose encoding waits, halfway through, until another consumer's
small calls have been answered: on the provider's loop that can never happen (the loop
that would answer them is the one encoding), so the wait runs out; off the loop it is
over after a few calls. No timing is measured: the test is about what happens first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import backchannel
from backchannel import codec

#: more items than BULK_ITEMS, so an ``async def`` method's result counts as bulk too
ENTRIES = 4096
#: small calls of the other consumer that must be answered during the encoding
SMALL_CALLS = 3
#: how long the encoding waits for them before giving up (a bound, never reached when
#: they are answered)
PATIENCE = 5.0


class GatedDict(dict[str, int]):
    """A dict that, while being encoded, waits for ``answered`` halfway through."""

    def __init__(self, answered: threading.Event) -> None:
        super().__init__((f"key-{i}", i) for i in range(ENTRIES))
        self.encoding = threading.Event()
        self._answered = answered
        self.waited_for: bool | None = None  # whether the small calls came in time

    def items(self) -> Iterator[tuple[str, int]]:  # type: ignore[override]
        for n, item in enumerate(super().items()):
            if n == ENTRIES // 2 and self.waited_for is None:
                self.encoding.set()
                self.waited_for = self._answered.wait(PATIENCE)
            yield item


@backchannel.interface("test.Bulk")
class Bulk:
    def table(self) -> dict[str, int]: ...
    def add(self, a: int, b: int) -> int: ...
    def size(self, value: dict[str, int]) -> int: ...
    def echo(self, value: dict[str, int]) -> dict[str, int]: ...


class SyncBulk:
    def __init__(self, result: GatedDict) -> None:
        self.result = result

    def table(self) -> dict[str, int]:
        return self.result

    def add(self, a: int, b: int) -> int:
        return a + b

    def size(self, value: dict[str, int]) -> int:
        return len(value)

    def echo(self, value: dict[str, int]) -> dict[str, int]:
        return value


class AsyncBulk(SyncBulk):
    async def table(self) -> dict[str, int]:  # type: ignore[override]
        return self.result

    async def size(self, value: dict[str, int]) -> int:  # type: ignore[override]
        return len(value)


@pytest.mark.parametrize("kind", [SyncBulk, AsyncBulk], ids=["def", "async def"])
def test_another_consumers_calls_are_answered_while_a_big_result_is_encoded(
    kind: type[SyncBulk],
) -> None:
    answered = threading.Event()
    result = GatedDict(answered)
    stop = threading.Event()
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(Bulk, kind(result))
        with (
            backchannel.Client(server.address, timeout=30) as bulk_client,
            backchannel.Client(server.address, timeout=30) as other_client,
        ):
            other = other_client.reference(Bulk)
            assert other.add(1, 1) == 2  # its stream is up before the bulk call starts

            def small_calls() -> None:
                during = 0
                for i in range(100_000):
                    if stop.is_set():
                        return
                    encoding = result.encoding.is_set()
                    assert other.add(i, 1) == i + 1
                    during += encoding  # sent after the encoding had started
                    if during >= SMALL_CALLS:
                        answered.set()
                        return

            caller = threading.Thread(target=small_calls)
            caller.start()
            try:
                table = bulk_client.reference(Bulk).table()
            finally:
                stop.set()
                caller.join(30)
    assert not caller.is_alive()
    assert table == dict(result)
    assert result.waited_for, (
        f"{SMALL_CALLS} small calls of another consumer were not answered within "
        f"{PATIENCE} s while the provider encoded a big result: its loop was blocked"
    )


@pytest.mark.parametrize(
    ("kind", "entries", "where"),
    [
        (SyncBulk, 10, "pool"),
        (SyncBulk, 20_000, "pool"),
        (AsyncBulk, 10, "loop"),  # a small call keeps the fast path: no thread hop
        (AsyncBulk, 20_000, "pool"),
    ],
    ids=["def small", "def big", "async def small", "async def big"],
)
def test_arguments_are_decoded_off_the_loop_for_def_methods_and_bulk_data(
    kind: type[SyncBulk], entries: int, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    decode_args = codec.decode_args

    def spy(values: object, place: str, *args: object) -> list[object]:
        if place == "test.Bulk.size()":
            threads.append(threading.current_thread().name)
        return decode_args(values, place, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "decode_args", spy)
    value = {f"key-{i}": i for i in range(entries)}
    with (
        backchannel.Server("127.0.0.1:0") as server,
        backchannel.Client(server.address) as client,
    ):
        server.export(Bulk, kind(GatedDict(threading.Event())))
        assert client.reference(Bulk).size(value) == entries
    assert len(threads) == 1
    in_pool = threads[0].startswith("backchannel-provider")
    assert in_pool == (where == "pool"), f"decoded in thread {threads[0]!r}"


@pytest.mark.parametrize(
    ("entries", "where"), [(10, "loop"), (20_000, "pool")], ids=["small", "big"]
)
def test_a_consumer_decodes_a_bulk_result_off_its_loop(
    entries: int, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    decode = codec.decode

    def spy(value: object, place: str, *args: object) -> object:
        if place == "the result of test.Bulk.echo()":
            threads.append(threading.current_thread().name)
        return decode(value, place, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "decode", spy)
    value = {f"key-{i}": i for i in range(entries)}
    with (
        backchannel.Server("127.0.0.1:0") as server,
        backchannel.Client(server.address) as client,
    ):
        server.export(Bulk, SyncBulk(GatedDict(threading.Event())))
        assert client.reference(Bulk).echo(value) == value
    assert len(threads) == 1
    in_pool = threads[0].startswith("backchannel-callback")
    assert in_pool == (where == "pool"), f"decoded in thread {threads[0]!r}"
