"""Fuzzing a real provider with hostile Connect streams, while a good consumer calls away.

Hypothesis draws sequences of frames (every kind, ids 0 / small / huge / repeated, Values
empty, nested, bogus callback references and Any payloads, batches and nested batches,
unknown services and methods, wrong argument counts, Results, Cancels and Releases for ids
nobody used, frames before the hello) and mutations of valid frames' serialized bytes. They
are written to a real provider on 127.0.0.1 over one long-lived stream, frame by frame.

After every example the same stream must still answer a well-formed call, and what came
back is checked against a small model of the protocol (``Book``): every call got exactly
one answer (a Result, or a Fault for a duplicate id) unless it was cancelled, no call got
two, no Result carries an id that was never sent, every frame that must be refused got its
Fault, every mistake was logged, well-formed calls returned the right value, and the
provider's own calls only target callback ids this stream exported. Meanwhile a sync
``Client`` on its own stream calls the same provider and checks every result.

Examples are derandomized (the same on every run); the fuzz test takes a few seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from conftest import RawStream, run
from google.protobuf import any_pb2
from helpers import CheckedThread, raw_stream, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from notifier import NOTIFIER_METHODS, Notifier, NotifierImpl, SyncRecorder
from services import Echo, EchoImpl

import backchannel
from backchannel.transport.portal import LoopThread
from backchannel.transport.receiver import SplitBatch, parse_frame
from backchannel.v1 import envelope_pb2 as pb

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

#: ids of the calls that check the stream after each example; the generator stays below
SENTINEL_BASE = 1 << 40


def is_sentinel(call_id: int) -> bool:
    return SENTINEL_BASE < call_id < SENTINEL_BASE + (1 << 30)


#: how long the provider may take to answer what one example sent
ANSWER_BOUND = 5.0
#: the provider calls back at most this long (the fuzz answers at once, but not always)
CALLBACK_TIMEOUT = 2.0


# ------------------------------------------------------------------ provider


class SafeEcho(EchoImpl):
    """Echo with the slow and the memory-hungry methods tamed: fuzzed args must not stall."""

    async def wait(self, seconds: float) -> str:
        await asyncio.sleep(0.001)
        return "done"

    def sync_wait(self, seconds: float) -> str:
        return "done"

    async def tracked(self, seconds: float) -> int:
        return 0

    def big(self, size: int) -> bytes:
        return b"x" * min(int(size), 1024)


class SafeNotifier(NotifierImpl):
    """The Notifier with push counts capped, so a fuzzed count cannot keep the provider busy."""

    def push(self, key: str, count: int) -> None:
        listener = self.listeners[key]
        for i in range(min(int(count), 3)):  # from this pool thread, blocking each time
            listener.changed(f"push {i}")

    async def burst(self, key: str, count: int) -> None:
        await super().burst(key, min(int(count), 3))


#: Notifier methods that make the provider call a listener back, and how often at most
CALLING_BACK = {"poke": 1, "apoke": 1, "push": 3, "burst": 3}


class MistakeLog(logging.Handler):
    """Counts the provider's log lines about protocol mistakes and faults it was sent:
    at WARNING, and at DEBUG those past a stream's share of warnings (PEER_WARNINGS)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("protocol mistake by"):
            self.counts["mistake"] += 1
        elif "reports a protocol fault" in message:
            self.counts["fault"] += 1


# ---------------------------------------------------------------- strategies

ids = st.one_of(
    st.sampled_from([0, 1, 2, 3, 1 << 63, (1 << 64) - 1]),
    st.integers(0, SENTINEL_BASE - 1),
)
small_ids = st.sampled_from([0, 1, 2, 3, 5, (1 << 64) - 1])
texts = st.text(max_size=12)
keys = st.sampled_from(["", "k", "z", "kz"])  # never "good": the good consumer's key
services = st.sampled_from(["test.Echo", "test.Echo", "test.Notifier", "", "x.Nope", "test.echo"])
exports = st.sampled_from([("", ""), ("", ""), ("cn", "1.0.0"), ("cn", ""), ("us", "9")])
methods = st.sampled_from(
    [
        *("echo", "add", "greet", "fail", "wait", "unsendable", "big", "missing", "", "_private"),
        *("addListener", "removeListener", "poke", "apoke", "ping", "push", "burst", "__init__"),
    ]
)
type_urls = st.sampled_from(
    ["", "bogus", "type.googleapis.com/no.Such", "type.googleapis.com/backchannel.v1.Hello"]
)


def callback_refs(refs: st.SearchStrategy[int] = small_ids) -> st.SearchStrategy[pb.Value]:
    interface = st.sampled_from(["", "test.Listener", "x.Unknown"])
    return st.builds(
        lambda i, name: pb.Value(callback_value=pb.CallbackRef(id=i, interface=name)),
        refs,
        interface,
    )


def leaves(clean: bool) -> st.SearchStrategy[pb.Value]:
    plain = [
        st.just(pb.Value(null_value=0)),
        st.booleans().map(lambda b: pb.Value(bool_value=b)),
        st.integers(-(1 << 63), (1 << 63) - 1).map(lambda i: pb.Value(int_value=i)),
        st.floats(allow_nan=not clean).map(lambda f: pb.Value(double_value=f)),
        texts.map(lambda s: pb.Value(string_value=s)),
        st.binary(max_size=12).map(lambda b: pb.Value(bytes_value=b)),
    ]
    if clean:
        return st.one_of(plain)
    bogus_any = st.builds(
        lambda url, data: pb.Value(message_value=any_pb2.Any(type_url=url, value=data)),
        type_urls,
        st.binary(max_size=12),
    )
    return st.one_of([*plain, st.just(pb.Value()), callback_refs(), bogus_any])


def values(clean: bool = False) -> st.SearchStrategy[pb.Value]:
    return st.recursive(
        leaves(clean),
        lambda children: st.one_of(
            st.lists(children, max_size=4).map(
                lambda items: pb.Value(list_value=pb.ValueList(items=items))
            ),
            st.dictionaries(texts, children, max_size=3).map(
                lambda entries: pb.Value(map_value=pb.ValueMap(entries=entries))
            ),
        ),
        max_leaves=5,
    )


VALUES = values()
CLEAN_VALUES = values(clean=True)


@st.composite
def any_call(draw: st.DrawFn) -> pb.Call:
    """Anything a Call can hold, mostly nonsense."""
    group, version = draw(exports)
    return pb.Call(
        id=draw(ids),
        service=draw(services),
        group=group,
        version=version,
        method=draw(methods),
        args=draw(st.lists(st.one_of(VALUES, KEY_VALUES), max_size=3)),
        callback_id=draw(st.sampled_from([0, 0, 0, 1, 7, (1 << 64) - 1])),
        parent_id=draw(st.sampled_from([0, 0, 1, 3, (1 << 64) - 1])),
        one_way=draw(st.sampled_from([False, False, False, True])),
        json_args=draw(st.sampled_from(["", "", "", "[1]", "[", "{}", '["a", 2]', "[[[]]]"])),
    )


def str_value(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[pb.Value]:
    return strategy.map(lambda s: pb.Value(string_value=s))


KEY_VALUES = str_value(keys)
TEXT_VALUES = str_value(texts)
INT_VALUES = st.integers(-(1 << 61), 1 << 61).map(lambda i: pb.Value(int_value=i))
GOOD_ARGS = st.one_of(
    st.tuples(st.just("echo"), st.lists(CLEAN_VALUES, min_size=1, max_size=1)),
    st.tuples(st.just("add"), st.lists(INT_VALUES, min_size=2, max_size=2)),
    st.tuples(st.just("greet"), st.lists(TEXT_VALUES, min_size=1, max_size=2)),
    st.tuples(
        st.just("fail"),
        st.tuples(str_value(st.sampled_from(["ValueError", "OutOfStock", "?"])), texts),
    ),
)


@st.composite
def good_call(draw: st.DrawFn) -> pb.Call:
    """A well-formed call whose answer the model can predict (or at least check)."""
    group, version = draw(st.sampled_from([("", ""), ("cn", "1.0.0")]))
    method, args = draw(GOOD_ARGS)
    if method == "fail":
        args = [args[0], pb.Value(string_value=args[1])]
    return pb.Call(
        id=draw(ids), service="test.Echo", group=group, version=version, method=method, args=args
    )


SECOND_ARGS = {
    "addListener": callback_refs(st.sampled_from([1, 2, 9, 1 << 40])),
    "removeListener": callback_refs(st.sampled_from([1, 2, 9])),
    "push": st.integers(0, 3).map(lambda i: pb.Value(int_value=i)),
    "burst": st.integers(0, 3).map(lambda i: pb.Value(int_value=i)),
}


@st.composite
def notifier_call(draw: st.DrawFn) -> pb.Call:
    """Listeners added by (bogus) reference, removed, poked: the provider calls back."""
    method = draw(st.sampled_from(["addListener", "addListener", "removeListener", "poke"]))
    method = draw(st.sampled_from([method, "apoke", "push", "burst", "ping"]))
    args = [draw(KEY_VALUES), draw(SECOND_ARGS.get(method, TEXT_VALUES))]
    return pb.Call(
        id=draw(ids), service="test.Notifier", method=method, args=args[: draw(st.integers(1, 3))]
    )


def simple_frames() -> st.SearchStrategy[pb.Frame]:
    results = st.builds(
        lambda i, value, error: (
            pb.Result(id=i, value=value) if value else pb.Result(id=i, error=error)
        ),
        ids,
        st.one_of(st.none(), VALUES),
        st.builds(pb.Error, code=st.sampled_from([0, 2, 5, 99]), type=texts, message=texts),
    )
    return st.one_of(
        st.builds(
            lambda v, name: pb.Frame(hello=pb.Hello(protocol_version=v, application=name)),
            st.sampled_from([0, 1, 1, 1, 2, (1 << 32) - 1]),
            texts,
        ),
        st.just(pb.Frame(welcome=pb.Welcome(protocol_version=1))),
        any_call().map(lambda c: pb.Frame(call=c)),
        good_call().map(lambda c: pb.Frame(call=c)),
        good_call().map(lambda c: pb.Frame(call=c)),
        notifier_call().map(lambda c: pb.Frame(call=c)),
        results.map(lambda r: pb.Frame(result=r)),
        st.builds(lambda i, why: pb.Frame(cancel=pb.Cancel(id=i, reason=why)), ids, texts),
        small_ids.map(lambda i: pb.Frame(release=pb.Release(callback_id=i))),
        texts.map(lambda why: pb.Frame(go_away=pb.GoAway(reason=why))),
        st.builds(lambda why, i: pb.Frame(fault=pb.Fault(message=why, call_id=i)), texts, ids),
        st.just(pb.Frame()),  # no kind: what a frame of a newer kind parses to
    )


def frames() -> st.SearchStrategy[pb.Frame]:
    def batches(children: st.SearchStrategy[pb.Frame]) -> st.SearchStrategy[pb.Frame]:
        return st.lists(children, max_size=5).map(lambda fs: pb.Frame(batch=pb.Batch(frames=fs)))

    return st.recursive(simple_frames(), batches, max_leaves=4)


FRAMES = frames()


@st.composite
def mutated(draw: st.DrawFn) -> pb.Frame | bytes:
    """A valid frame with bits flipped and maybe cut short.

    If the bytes still parse, the parsed frame is sent (and modelled); if they do not, they
    are sent as they are, now and then (``bytes``), else the frame is dropped (None).
    """
    data = bytearray(draw(FRAMES).SerializeToString())
    for position, bit in draw(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 7)))):
        if data:
            data[position % len(data)] ^= 1 << bit
    cut = draw(st.one_of(st.none(), st.integers(0, 1 << 16)))
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    try:
        return pb.Frame.FromString(bytes(data))
    except Exception:
        send_raw = draw(st.sampled_from([False, False, False, True]))
        return bytes(data) if send_raw else pb.Frame(hello=pb.Hello(protocol_version=1))


@dataclass
class Example:
    """What one hypothesis example sends."""

    fresh: bool  # on a new stream (so frames before the hello are frames before the hello)
    actions: list[pb.Frame | bytes]


@st.composite
def listener_scenario(draw: st.DrawFn) -> list[pb.Frame]:
    """A listener added by reference, then calls that make the provider call it back."""
    key = draw(KEY_VALUES)
    ref = draw(callback_refs(st.sampled_from([0, 1, 2, 1 << 40])))
    frames = [notifier_frame(draw(ids), "addListener", key, ref)]
    for method in draw(st.lists(st.sampled_from(sorted(CALLING_BACK)), min_size=1, max_size=3)):
        second = draw(SECOND_ARGS.get(method, TEXT_VALUES))
        frames.append(notifier_frame(draw(ids), method, key, second))
    if draw(st.booleans()):
        frames.append(notifier_frame(draw(ids), "removeListener", key, ref))
    return frames


def notifier_frame(call_id: int, method: str, *args: pb.Value) -> pb.Frame:
    return pb.Frame(call=pb.Call(id=call_id, service="test.Notifier", method=method, args=args))


examples = st.builds(
    Example,
    fresh=st.sampled_from([False, False, False, True]),
    actions=st.lists(
        st.one_of(FRAMES.map(lambda f: [f]), mutated().map(lambda f: [f]), listener_scenario()),
        max_size=6,
    ).map(lambda groups: [action for group in groups for action in group]),
)


# --------------------------------------------------------------------- model


def clean(value: pb.Value) -> bool:
    """A value that echoes back unchanged (no empty kinds, references, Any or NaN)."""
    kind = value.WhichOneof("kind")
    if kind in (None, "callback_value", "message_value"):
        return False
    if kind == "double_value":
        return not math.isnan(value.double_value)
    if kind == "list_value":
        return all(clean(item) for item in value.list_value.items)
    if kind == "map_value":
        return all(clean(item) for item in value.map_value.entries.values())
    return True


def expected_outcome(call: pb.Call) -> pb.Result | None:
    """What a call of test.Echo must return, when the model can tell; else None."""
    if (
        call.service != "test.Echo"
        or (call.group, call.version) not in (("", ""), ("cn", "1.0.0"))
        or call.callback_id
        or call.json_args
    ):
        return None
    args = list(call.args)
    kinds = [arg.WhichOneof("kind") for arg in args]
    if call.method == "echo" and len(args) == 1 and clean(args[0]):
        return pb.Result(id=call.id, value=args[0])
    if call.method == "add" and kinds == ["int_value", "int_value"]:
        total = args[0].int_value + args[1].int_value
        if -(1 << 63) <= total < 1 << 63:
            return pb.Result(id=call.id, value=pb.Value(int_value=total))
    if call.method == "greet" and kinds in (["string_value"], ["string_value"] * 2):
        greeting = args[1].string_value if len(args) == 2 else "Hello"
        text = f"{greeting}, {args[0].string_value}!"
        return pb.Result(id=call.id, value=pb.Value(string_value=text))
    if call.method == "fail" and kinds == ["string_value"] * 2:
        kind = args[0].string_value
        known = {"ValueError": "ValueError", "OutOfStock": "services.OutOfStock"}
        if kind in known:
            error = pb.Error(type=known[kind], message=args[1].string_value)
        else:  # the impl looks the kind up in a dict: KeyError(kind)
            error = pb.Error(type="KeyError", message=repr(kind))
        return pb.Result(id=call.id, error=error)
    return None


class BytesStream(RawStream):
    """A RawStream that also writes bytes as they are: messages that are no Frame."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = self.channel.stream_stream(
            "/backchannel.v1.Envelope/Connect",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=pb.Frame.FromString,
        )()
        self._buffer: list[pb.Frame] = []


@dataclass
class Book:
    """The model of one stream: what was sent, what must and may come back, what did."""

    open: bool = False
    sentinels: int = 0
    # call ids: every Call sent, non-one-way ones, and the ones that must be answered
    calls: collections.Counter[int] = field(default_factory=collections.Counter)
    answerable: collections.Counter[int] = field(default_factory=collections.Counter)
    required: collections.Counter[int] = field(default_factory=collections.Counter)
    pending: list[int] = field(default_factory=list)  # required, not yet cancelled
    expected: dict[int, pb.Result] = field(default_factory=dict)
    # Results sent, and the Faults about them that must come back
    results_sent: collections.Counter[int] = field(default_factory=collections.Counter)
    unknown_required: collections.Counter[int] = field(default_factory=collections.Counter)
    callback_bound: int = 0  # the provider's own calls to this stream number at most this
    refs: set[int] = field(default_factory=set)  # callback ids this stream sent
    welcomes_expected: int = 0
    # Faults about no single call the model expects (refused frames) and that came back
    generic_expected: int = 0
    generic_faults: int = 0
    faults_total: int = 0
    refused_before_hello: int = 0  # calls before the hello: each is a logged mistake
    faults_sent: int = 0  # Faults this side sent: each is logged
    unreadable: int = 0  # calls in frames that did not parse, answered: each is logged
    # the provider's log lines before this stream
    logged_mistakes: int = 0
    logged_faults: int = 0
    # what came back
    results: collections.Counter[int] = field(default_factory=collections.Counter)
    duplicate_faults: collections.Counter[int] = field(default_factory=collections.Counter)
    unknown_faults: collections.Counter[int] = field(default_factory=collections.Counter)
    welcomes: int = 0
    provider_calls: int = 0
    failures: list[str] = field(default_factory=list)


class Fuzzer:
    """Drives raw Connect streams at the provider from a loop thread of its own."""

    def __init__(self, address: str, log: MistakeLog) -> None:
        self.address = address
        self.log = log
        self.portal = LoopThread("fuzz-driver")
        self.stream: BytesStream | None = None
        self.book = Book()
        self.streams = 0
        self.garbage_sent = 0
        self.checked = 0  # answers checked against the model's prediction
        self.provider_calls = 0  # callback calls the provider made to the fuzz

    # ------------------------------------------------------------- streams

    async def _reopen(self) -> None:
        if self.stream is not None:
            await self.stream.close()
        self.stream = BytesStream(self.address)
        # what was queued just before a stream broke may be lost: count from here
        counts = self.log.counts
        self.book = Book(logged_mistakes=counts["mistake"], logged_faults=counts["fault"])
        self.streams += 1

    def close(self) -> None:
        if self.stream is not None:
            self.portal.run(self.stream.close())
        self.portal.close()

    def run_example(self, example: Example) -> None:
        self.portal.run(asyncio.wait_for(self._example(example), 3 * ANSWER_BOUND))

    # ---------------------------------------------------------- an example

    async def _example(self, example: Example) -> None:
        if example.fresh or self.stream is None:
            await self._reopen()
        assert self.stream is not None
        for action in example.actions:
            if isinstance(action, bytes):  # no Frame: the stream goes on, nothing is lost
                self._model_bytes(action)
                await self.stream.send(action)  # type: ignore[arg-type]
                self.garbage_sent += 1
                continue
            self._model(action, nested=False)
            await self.stream.send(action)
        if not self.book.open:
            hello = pb.Frame(hello=pb.Hello(protocol_version=1, application="fuzz"))
            self._model(hello, nested=False)
            await self.stream.send(hello)
        await self._check_round_trip()

    async def _check_round_trip(self) -> None:
        """A well-formed call is answered; then everything owed has come back, and fits."""
        assert self.stream is not None
        book = self.book
        book.sentinels += 1
        sentinel = SENTINEL_BASE + book.sentinels
        call = pb.Call(
            id=sentinel, service="test.Echo", method="echo", args=[pb.Value(int_value=sentinel)]
        )
        self._model(pb.Frame(call=call), nested=False)
        await self.stream.send(pb.Frame(call=call))
        deadline = time.monotonic() + ANSWER_BOUND
        while not self._all_answered():
            try:
                frame = await self.stream.recv(max(deadline - time.monotonic(), 0))
            except TimeoutError:
                owed = {i: n for i, n in book.required.items() if self._answers(i) < n}
                unknown = {
                    i: n for i, n in book.unknown_required.items() if book.unknown_faults[i] < n
                }
                pytest.fail(
                    f"nothing more within {ANSWER_BOUND} s; still owed: answers to calls {owed}, "
                    f"faults about results {unknown}, "
                    f"{book.generic_expected - book.generic_faults} other faults, "
                    f"{book.welcomes_expected - book.welcomes} welcomes"
                )
            await self._observe(frame)
        self._check_accounts()

    def _answers(self, call_id: int) -> int:
        return self.book.results[call_id] + self.book.duplicate_faults[call_id]

    def _all_answered(self) -> bool:
        book = self.book
        return (
            all(self._answers(i) >= n for i, n in book.required.items())
            and all(book.unknown_faults[i] >= n for i, n in book.unknown_required.items())
            and book.welcomes >= book.welcomes_expected
            and book.generic_faults >= book.generic_expected
        )

    def _check_accounts(self) -> None:
        book = self.book
        assert book.failures == []
        for call_id, answers in (book.results + book.duplicate_faults).items():
            # each call is answered once at most: no duplicated results
            assert answers <= book.calls[call_id], (call_id, answers, book.calls[call_id])
            assert book.results[call_id] <= book.answerable[call_id], call_id
        for call_id, faults in book.unknown_faults.items():
            assert faults <= book.results_sent[call_id], call_id
        assert book.welcomes == book.welcomes_expected
        # every Fault the model owes (and no more) came back, so every mistake that is
        # deterministic got its Fault; each was logged, as was every fault this side sent
        assert book.generic_faults == book.generic_expected
        mistakes = self.log.counts["mistake"] - book.logged_mistakes
        assert mistakes == book.faults_total + book.refused_before_hello + book.unreadable
        assert self.log.counts["fault"] - book.logged_faults == book.faults_sent

    # --------------------------------------------------------------- model

    def _model(self, frame: pb.Frame, nested: bool) -> None:
        """What the provider must answer to ``frame``, from the protocol's rules."""
        book = self.book
        kind = frame.WhichOneof("kind")
        if kind == "batch":
            if nested:
                self.book.generic_expected += 1  # a batch in a batch: refused, its frames dropped
            else:
                for inner in frame.batch.frames:
                    self._model(inner, nested=True)
        elif kind is None or kind in ("welcome", "multicast"):  # a provider takes neither
            self.book.generic_expected += 1
        elif kind == "hello":
            if book.open or frame.hello.protocol_version > 1:
                self.book.generic_expected += 1
            else:
                book.open = True
                book.welcomes_expected += 1
        elif not book.open:
            if kind == "call" and frame.call.one_way:  # no Result to answer: a Fault
                self.book.generic_expected += 1
            elif kind == "call":
                self.book.refused_before_hello += 1
                if frame.call.id:  # an error Result says why
                    self._call_sent(frame.call, required=True, checked=False)
            else:
                self.book.generic_expected += 1
        elif kind == "call":
            call = frame.call
            if call.id == 0:
                self.book.generic_expected += 1
            else:
                self._call_sent(call, required=not call.one_way, checked=True)
                if call.service == "test.Notifier":
                    book.callback_bound += CALLING_BACK.get(call.method, 0)
                if call.method == "addListener":
                    for arg in call.args:
                        if arg.WhichOneof("kind") == "callback_value" and arg.callback_value.id:
                            book.refs.add(arg.callback_value.id)  # id 0 is refused
        elif kind == "result":
            call_id = frame.result.id
            book.results_sent[call_id] += 1
            if not 0 < call_id <= book.callback_bound:  # cannot be one of the provider's
                book.unknown_required[call_id] += 1
        elif kind == "cancel":
            call_id = frame.cancel.id
            dropped = [i for i in book.pending if i == call_id]
            book.pending = [i for i in book.pending if i != call_id]
            book.required[call_id] -= len(dropped)  # a cancelled call may go unanswered
        elif kind == "fault":
            self.book.faults_sent += 1

    def _model_bytes(self, data: bytes) -> None:
        """What the provider must answer to a message that is no Frame.

        The model reads it as the provider's deserializer does (``parse_frame``: a Batch
        is split and its frames parsed one by one, an unparseable frame is searched for a
        Call's or Result's id); the rules for what each piece is owed are the model's.
        """
        parsed = parse_frame(data)
        pieces = parsed.frames if isinstance(parsed, SplitBatch) else [parsed]
        for piece in pieces:
            if isinstance(piece, pb.Frame):
                self._model(piece, nested=True)
            elif piece.call_id and not piece.one_way:  # an error Result (or duplicate Fault)
                self._call_sent(pb.Call(id=piece.call_id), required=True, checked=False)
            else:  # a one-way call, a Result, anything else: one Fault says so
                self.book.generic_expected += 1

    def _call_sent(self, call: pb.Call, required: bool, checked: bool) -> None:
        book = self.book
        if book.calls[call.id]:
            book.expected.pop(call.id, None)  # two calls, one id: which answer is which?
        else:
            outcome = expected_outcome(call) if checked and required else None
            if outcome is not None:
                book.expected[call.id] = outcome
        book.calls[call.id] += 1
        if not call.one_way:
            book.answerable[call.id] += 1
        if required:
            book.required[call.id] += 1
            book.pending.append(call.id)

    # ------------------------------------------------------------- observe

    async def _observe(self, frame: pb.Frame) -> None:
        """Account for one frame from the provider; answer its calls."""
        assert self.stream is not None
        book = self.book
        kind = frame.WhichOneof("kind")
        if kind == "welcome":
            book.welcomes += 1
        elif kind == "result":
            self._observe_result(frame.result)
        elif kind == "fault":
            self.book.faults_total += 1
            fault = frame.fault
            if not fault.message:
                book.failures.append(f"a fault without a message: {fault}")
            if fault.message.startswith("duplicate call id"):
                book.duplicate_faults[fault.call_id] += 1
            elif fault.message.startswith("result for unknown call id"):
                book.unknown_faults[fault.call_id] += 1
            else:
                self.book.generic_faults += 1
        elif kind == "call":
            call = frame.call
            book.provider_calls += 1
            self.provider_calls += 1
            if call.callback_id not in book.refs:
                book.failures.append(f"the provider called a callback never sent: {call}")
            if call.id > book.callback_bound:
                book.failures.append(f"more provider calls than could be: {call}")
            if not call.one_way:  # answer, so the provider's thread is not held up
                value = pb.Value(string_value=f"ack {call.id}")
                result = pb.Frame(result=pb.Result(id=call.id, value=value))
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await self.stream.send(result)  # fails when the stream ended: recv says so
        elif kind == "cancel":
            if not 0 < frame.cancel.id <= book.callback_bound:
                book.failures.append(f"a cancel of a call the provider never made: {frame}")
        elif kind == "release":
            if frame.release.callback_id not in book.refs:
                book.failures.append(f"a release of a callback never sent: {frame}")
        else:
            book.failures.append(f"the provider sent a {kind} frame: {frame}")

    def _observe_result(self, result: pb.Result) -> None:
        book = self.book
        book.results[result.id] += 1
        if is_sentinel(result.id) and result.value.int_value != result.id:
            book.failures.append(f"a well-formed call failed: {result}")
        outcome = result.WhichOneof("outcome")
        if outcome is None:
            book.failures.append(f"a result with no outcome: {result}")
        elif outcome == "error":
            error = result.error
            if error.message.startswith(f"call {result.id} could not be read:"):
                book.unreadable += 1  # answered for the unparseable frame it came in
            if not error.type:
                book.failures.append(f"an error that does not say what went wrong: {result}")
            if error.code not in pb.Code.values():
                book.failures.append(f"an error with an unknown code: {result}")
        expected = book.expected.get(result.id)
        if expected is None or book.results[result.id] > 1:
            return
        self.checked += 1
        if expected.HasField("value"):
            if result != expected:
                book.failures.append(f"wrong answer: expected {expected}, got {result}")
        elif (result.error.type, result.error.message) != (
            expected.error.type,
            expected.error.message,
        ):
            book.failures.append(f"wrong error: expected {expected}, got {result}")


# ------------------------------------------------------------ good consumer


class GoodConsumer:
    """A well-behaved sync Client calling the provider from a thread, checking every result."""

    def __init__(self, address: str) -> None:
        self.client = backchannel.Client(address, timeout=10)
        self.failures: list[str] = []
        self.calls = 0
        self._stop = threading.Event()
        self._thread = CheckedThread(self._work, name="good-consumer")

    def __enter__(self) -> GoodConsumer:
        self._thread.start()
        return self

    def _work(self) -> None:
        echo = self.client.reference(Echo)
        notifier = self.client.reference(Notifier)
        listener = SyncRecorder()
        # any error at all is a failure of the good consumer: __exit__ raises it
        notifier.addListener("good", listener)
        i = 0
        while not self._stop.is_set():
            payload = {"i": i, "items": [i, str(i), bytes([i % 256]), None, i / 3]}
            if (got := echo.echo(payload)) != payload:
                self.failures.append(f"echo({payload}) returned {got}")
            if (total := echo.add(i, -2 * i)) != -i:
                self.failures.append(f"add({i}, {-2 * i}) returned {total}")
            if (answer := notifier.poke("good", f"m{i}")) != f"ok m{i}":
                self.failures.append(f"poke #{i} returned {answer}")
            self.calls += 3
            i += 1
        if listener.received != [f"m{j}" for j in range(i)]:
            self.failures.append(f"the listener got {listener.received[:5]}...")

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(20)
        self.client.close()
        self._thread.check(0)  # still running, or raised: the test fails


# --------------------------------------------------------------------- tests


@pytest.fixture
def provider() -> Iterator[tuple[backchannel.Server, MistakeLog]]:
    log = MistakeLog()
    logger = logging.getLogger("backchannel")
    logger.addHandler(log)
    level = logger.level
    logger.setLevel(logging.DEBUG)  # every mistake is logged: past the rate, at DEBUG
    try:
        with backchannel.Server(callback_timeout=CALLBACK_TIMEOUT) as server:
            server.export(Echo, SafeEcho())
            server.export(Echo, SafeEcho(), group="cn", version="1.0.0")
            server.export(Notifier, SafeNotifier(greet=False), methods=NOTIFIER_METHODS)
            yield server, log
    finally:
        logger.setLevel(level)
        logger.removeHandler(log)


def test_fuzzed_frames_never_break_the_provider_or_other_consumers(
    provider: tuple[backchannel.Server, MistakeLog],
) -> None:
    server, log = provider
    fuzzer = Fuzzer(server.address, log)
    try:
        with GoodConsumer(server.address) as good:

            @settings(
                max_examples=250,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(example=examples)
            def fuzz(example: Example) -> None:
                fuzzer.run_example(example)

            fuzz()
    finally:
        fuzzer.close()
    assert good.failures == []
    assert good.calls >= 30  # it really ran alongside
    # what the examples exercised: fresh streams, raw bytes, checked answers, callbacks
    assert fuzzer.streams > 10 and fuzzer.garbage_sent > 0
    assert fuzzer.checked > 100 and fuzzer.provider_calls > 50
    wait_until(lambda: server._core.session_count == 0, 2, "the provider's streams closed")


# ------------------------------------------------- messages that are no Frame


def test_a_message_that_is_no_frame_gets_a_fault_and_the_stream_goes_on(
    server: backchannel.Server,
) -> None:
    async def body() -> None:
        async with backchannel.AsyncClient(server.address) as good:
            echo = good.reference(Echo)
            assert await echo.echo("before") == "before"
            channel, call = await raw_stream(server.address)
            try:
                await call.write(b"\xff\xff\xff\xff")  # not a Frame: gRPC's framing is intact
                reply = await asyncio.wait_for(call.read(), 2)
                assert reply.WhichOneof("kind") == "fault", reply
                assert "4 bytes is not a backchannel.v1.Frame" in reply.fault.message
                ping = pb.Call(id=1, service="test.Echo", method="echo", args=[pb.Value()])
                await call.write(pb.Frame(call=ping).SerializeToString())
                assert (await asyncio.wait_for(call.read(), 2)).result.id == 1
            finally:
                call.cancel()
                await channel.close()
            assert await echo.echo("after") == "after"  # the good stream never noticed

    run(body())


def test_a_callback_reference_with_id_zero_is_refused() -> None:
    """Call.callback_id 0 means "no callback", so a CallbackRef with id 0 cannot be called."""
    with backchannel.Server(callback_timeout=CALLBACK_TIMEOUT) as server:
        impl = NotifierImpl(greet=False)
        server.export(Notifier, impl, methods=NOTIFIER_METHODS)

        async def body() -> None:
            stream = RawStream(server.address)
            try:
                await stream.hello()
                ref = pb.Value(callback_value=pb.CallbackRef(id=0, interface="test.Listener"))
                add = pb.Call(
                    id=1,
                    service="test.Notifier",
                    method="addListener",
                    args=[pb.Value(string_value="k"), ref],
                )
                await stream.send(pb.Frame(call=add))
                result = (await stream.recv()).result
                assert result.id == 1
                assert result.error.code == pb.INVALID_ARGUMENT, result
                assert "callback id 0" in result.error.message
            finally:
                await stream.close()

        run(body())
    assert impl.listeners == {}
