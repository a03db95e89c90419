"""Event notify (Dubbo's FutureFilter): oninvoke / onreturn / onthrow and async_, end to end
over loopback with the sync Client and the AsyncClient."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.util
import inspect
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import run
from helpers import LogSeen
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from services import Echo, EchoImpl

import backchannel
from backchannel import Method, telemetry

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

WAIT = 5.0  # the bound of every wait: a failing test fails fast instead of hanging
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "notify"


class Recorder:
    """Hooks that record what they were given and in which thread; waits are bounded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], str]] = []
        self._changed = threading.Condition()

    def hook(self, kind: str, raises: BaseException | None = None) -> Callable[..., None]:
        def record(*args: Any) -> None:
            with self._changed:
                self.calls.append((kind, args, threading.current_thread().name))
                self._changed.notify_all()
            if raises is not None:
                raise raises

        return record

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        with self._changed:
            return [args for k, args, _ in self.calls if k == kind]

    def kinds(self) -> list[str]:
        with self._changed:
            return [k for k, _, _ in self.calls]

    def threads(self) -> set[str]:
        with self._changed:
            return {thread for _, _, thread in self.calls}

    def wait(self, kind: str, count: int = 1) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.of(kind)) >= count, WAIT)


def all_hooks(rec: Recorder, name: str, **settings: Any) -> Method:
    return Method(
        name,
        oninvoke=rec.hook("oninvoke"),
        onreturn=rec.hook("onreturn"),
        onthrow=rec.hook("onthrow"),
        **settings,
    )


# --- the seed's TEST CASE, with the example's provider and NotifyImpl ------------------------


def load_example_service() -> ModuleType:
    """examples/notify/notify_service.py, loaded from its file."""
    name = "notify_example_service"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / "notify_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_provider(transport: str) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-u", str(EXAMPLE / "provider.py"), "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",  # the example runs from any directory
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        process.kill()
        process.wait(WAIT)


class GatedProvider:
    """The example's NormalDemoService in this process, each get() held at a gate."""

    def __init__(self, example: ModuleType) -> None:
        self.entered = threading.Event()  # a get() reached the provider
        self.gate = threading.Event()  # set: get() goes on
        gated = self

        class GatedDemoService(example.NormalDemoService):  # type: ignore[name-defined,misc]
            def get(self, id: int) -> Any:
                gated.entered.set()
                gated.gate.wait(WAIT)
                return super().get(id)

        self.server = backchannel.Server("127.0.0.1:0", application="rpc-callback-demo")
        self.server.export(example.IDemoService, GatedDemoService(), group="cn", version="1.0.0")


@pytest.fixture
def gated_provider() -> Iterator[GatedProvider]:
    provider = GatedProvider(load_example_service())
    with provider.server:
        try:
            yield provider
        finally:
            provider.gate.set()  # a failed test leaves no provider thread waiting


def test_seed_test_case(gated_provider: GatedProvider) -> None:
    example = load_example_service()
    notify = example.NotifyImpl()
    with backchannel.Client(gated_provider.server.address) as client:
        # <dubbo:method name="get" async="true" onreturn="demoCallback.onreturn"
        #               onthrow="demoCallback.onthrow"/>
        demo_service = client.reference(
            example.IDemoService,
            group="cn",
            version="1.0.0",
            methods=[Method("get", async_=True, onreturn=notify.onreturn, onthrow=notify.onthrow)],
        )
        request_id = 2
        ret = demo_service.get(request_id)
        assert isinstance(ret, concurrent.futures.Future)  # Dubbo's null: not the Person
        # it really returned immediately: the provider is still inside get(), at the gate
        assert gated_provider.entered.wait(WAIT)
        assert not ret.done() and notify.ret == {}
        gated_provider.gate.set()
        assert notify.wait_for(notify.ret, request_id, 2.0)
        assert notify.ret[request_id].id == request_id
        assert isinstance(notify.ret[request_id], example.Person)
        assert ret.result(WAIT) == notify.ret[request_id]

        failed = demo_service.get(11)
        assert notify.wait_for(notify.errors, 11, 2.0)
        assert isinstance(notify.errors[11], LookupError)
        assert "no person 11" in str(notify.errors[11])
        assert 11 not in notify.ret
        assert failed.exception(WAIT) is notify.errors[11]


def test_seed_test_case_asyncio(example_provider: str) -> None:
    example = load_example_service()

    async def body() -> None:
        notify = example.NotifyImpl()
        async with backchannel.AsyncClient(example_provider) as client:
            demo_service = client.reference(
                example.IDemoService,
                group="cn",
                version="1.0.0",
                methods=[Method.notify("get", notify, async_=True)],
            )
            ret = demo_service.get(2)
            assert isinstance(ret, asyncio.Future)
            person = await ret
            assert person.id == 2 and notify.ret[2] == person  # the hooks ran first
            with pytest.raises(LookupError, match="no person 11"):
                await demo_service.get(11)
            assert isinstance(notify.errors[11], LookupError)

    run(body())


def test_example_consumer_runs_the_four_modes(example_provider: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "consumer.py"), example_provider],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert "onthrow: LookupError: no person 11" in done.stdout
    assert "all four modes behaved" in done.stdout


# --- the sync Client ------------------------------------------------------------------------


def test_sync_hooks_ran_before_the_call_returns(client: backchannel.Client) -> None:
    rec = Recorder()
    echo = client.reference(Echo, methods=[all_hooks(rec, "add")])
    assert echo.add(40, 2) == 42
    assert rec.kinds() == ["oninvoke", "onreturn"]
    assert rec.of("oninvoke") == [(40, 2)]
    assert rec.of("onreturn") == [(42, 40, 2)]
    assert rec.threads() == {threading.current_thread().name}  # the caller's own thread


def test_keyword_arguments_reach_the_hooks_as_positions(client: backchannel.Client) -> None:
    rec = Recorder()
    echo = client.reference(Echo, methods=[all_hooks(rec, "greet")])
    assert echo.greet(greeting="Hi", name="grpc") == "Hi, grpc!"
    assert rec.of("oninvoke") == [("grpc", "Hi")]
    assert echo.greet("Dubbo") == "Hello, Dubbo!"
    assert rec.of("onreturn")[-1] == ("Hello, Dubbo!", "Dubbo")  # as the caller passed them


def test_provider_exception_goes_to_onthrow_and_the_caller_still_raises(
    client: backchannel.Client,
) -> None:
    rec = Recorder()
    echo = client.reference(Echo, methods=[all_hooks(rec, "fail")])
    with pytest.raises(ValueError, match="bad") as raised:
        echo.fail("ValueError", "bad")
    assert rec.of("onreturn") == []
    assert rec.of("onthrow") == [(raised.value, "ValueError", "bad")]


def test_oninvoke_raising_goes_to_onthrow_and_the_call_proceeds(
    client: backchannel.Client, echo_impl: EchoImpl
) -> None:
    rec = Recorder()
    oops = RuntimeError("oninvoke broke")
    method = Method(
        "echo",
        oninvoke=rec.hook("oninvoke", raises=oops),
        onreturn=rec.hook("onreturn"),
        onthrow=rec.hook("onthrow"),
    )
    echo = client.reference(Echo, methods=[method])
    assert echo.echo("still sent") == "still sent"
    assert echo_impl.calls == 1
    assert rec.kinds() == ["oninvoke", "onthrow", "onreturn"]
    assert rec.of("onthrow") == [(oops, "still sent")]


def test_onreturn_raising_goes_to_onthrow_and_the_caller_gets_its_result(
    client: backchannel.Client,
) -> None:
    rec = Recorder()
    oops = RuntimeError("onreturn broke")
    method = Method("add", onreturn=rec.hook("onreturn", raises=oops), onthrow=rec.hook("onthrow"))
    echo = client.reference(Echo, methods=[method])
    assert echo.add(1, 2) == 3
    assert rec.of("onthrow") == [(oops, 1, 2)]


def test_onthrow_raising_is_logged_and_nothing_else_breaks(
    client: backchannel.Client, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    method = Method("fail", onthrow=rec.hook("onthrow", raises=RuntimeError("onthrow broke")))
    echo = client.reference(Echo, methods=[method])
    with caplog.at_level(logging.ERROR, logger="backchannel"):
        with pytest.raises(KeyError):
            echo.fail("KeyError", "k")
    assert len(rec.of("onthrow")) == 1
    logged = [r for r in caplog.records if "onthrow hook of test.Echo.fail()" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert logged[0].getMessage() == "the onthrow hook of test.Echo.fail() raised; ignored"
    assert "onthrow broke" in str(logged[0].exc_info[1])
    assert echo.add(2, 3) == 5  # the stream and the reference still work
    with pytest.raises(KeyError):
        echo.fail("KeyError", "again")  # and the next failure goes the same way


def test_a_hook_raising_without_onthrow_is_logged(
    client: backchannel.Client, caplog: pytest.LogCaptureFixture
) -> None:
    def onreturn(result: int) -> None:
        raise RuntimeError("nobody hears this")

    echo = client.reference(Echo, methods=[Method("add", onreturn=onreturn)])
    with caplog.at_level(logging.ERROR, logger="backchannel"):
        assert echo.add(1, 1) == 2
    assert any("onreturn hook of test.Echo.add()" in r.getMessage() for r in caplog.records)


def test_async_future_resolves_with_the_result_after_the_hooks(
    client: backchannel.Client,
) -> None:
    rec = Recorder()
    echo = client.reference(Echo, methods=[all_hooks(rec, "add", async_=True)])
    future = echo.add(20, 22)
    assert isinstance(future, concurrent.futures.Future)
    assert rec.of("oninvoke") == [(20, 22)]  # on the caller, before the call is sent
    assert future.result(WAIT) == 42
    assert rec.of("onreturn") == [(42, 20, 22)]  # the future resolves after the hooks
    onreturn_thread = next(thread for kind, _, thread in rec.calls if kind == "onreturn")
    assert onreturn_thread.startswith("backchannel-notify")  # not the loop, not the reader


class SettleWatch:
    """onreturn/onthrow hooks that note whether the call's future was already settled when
    they ran: each waits (bounded) until the test hands it the future the call returned,
    so the answer does not depend on which thread wins."""

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[Any] | None = None
        self.handed = threading.Event()
        self.settled_when: dict[str, bool] = {}

    def hook(self, kind: str) -> Callable[..., None]:
        def watch(*_args: Any) -> None:
            assert self.handed.wait(WAIT)
            assert self.future is not None
            self.settled_when[kind] = self.future.done()

        return watch

    def hand(self, future: concurrent.futures.Future[Any]) -> None:
        self.future = future
        self.handed.set()


@pytest.mark.parametrize(
    ("name", "args", "kind"),
    [
        ("add", (20, 22), "onreturn"),  # the provider's result
        ("fail", ("ZeroDivisionError", "nope"), "onthrow"),  # the provider's exception
        ("add", (1, 2, 3), "onthrow"),  # bad arguments: a failed future, never sent
    ],
)
def test_async_future_is_settled_only_after_its_onreturn_or_onthrow_ran(
    client: backchannel.Client, name: str, args: tuple[Any, ...], kind: str
) -> None:
    watch = SettleWatch()
    hooks = {"onreturn": watch.hook("onreturn"), "onthrow": watch.hook("onthrow")}
    echo = client.reference(Echo, methods=[Method(name, async_=True, **hooks)])
    future = getattr(echo, name)(*args)
    watch.hand(future)
    concurrent.futures.wait([future], WAIT)
    assert future.done()
    assert watch.settled_when == {kind: False}  # the hook ran, and before the future settled


def test_async_failure_resolves_the_future_with_the_exception(client: backchannel.Client) -> None:
    rec = Recorder()
    echo = client.reference(Echo, methods=[all_hooks(rec, "fail", async_=True)])
    future = echo.fail("ZeroDivisionError", "nope")
    error = future.exception(WAIT)
    assert isinstance(error, ZeroDivisionError)
    assert rec.of("onthrow") == [(error, "ZeroDivisionError", "nope")]
    assert rec.of("onreturn") == []


def test_async_without_hooks_returns_a_future(client: backchannel.Client) -> None:
    echo = client.reference(Echo, methods=[Method("echo", async_=True)])
    future = echo.echo("plain")
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(WAIT) == "plain"
    assert echo.add(1, 2) == 3  # the other methods still block


def test_a_hundred_async_calls_in_flight_each_onreturn_gets_its_own_args(
    client: backchannel.Client,
) -> None:
    rec = Recorder()
    method = Method("add", async_=True, onreturn=rec.hook("onreturn"))
    echo = client.reference(Echo, methods=[method])
    futures = [echo.add(i, 1000 * i) for i in range(100)]
    assert [f.result(WAIT) for f in futures] == [1001 * i for i in range(100)]
    seen = rec.of("onreturn")
    assert len(seen) == 100
    assert all(result == a + b and b == 1000 * a for result, a, b in seen)
    assert sorted(a for _, a, _ in seen) == list(range(100))


def test_a_slow_hook_delays_only_its_own_future(client: backchannel.Client) -> None:
    gate = threading.Event()

    def onreturn(result: Any, value: Any) -> None:
        if value == "slow":
            gate.wait(WAIT)

    echo = client.reference(Echo, methods=[Method("echo", async_=True, onreturn=onreturn)])
    slow = echo.echo("slow")
    fast = [echo.echo(i) for i in range(5)]
    try:
        assert [f.result(WAIT) for f in fast] == list(range(5))
        assert echo.add(1, 1) == 2  # the stream is not held up either
        assert not slow.done()
    finally:
        gate.set()
    assert slow.result(WAIT) == "slow"


def test_a_full_hook_pool_is_logged_once_with_what_to_change(
    server: backchannel.Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Hooks queue once every hook thread is taken: said once, naming the keyword."""
    gate = threading.Event()
    started = threading.Semaphore(0)

    def onreturn(result: Any, value: Any) -> None:
        started.release()
        gate.wait(WAIT)

    with (
        caplog.at_level(logging.WARNING, "backchannel"),
        LogSeen("hook pool is exhausted") as exhausted,
        backchannel.Client(server.address, max_workers=2) as client,
    ):
        echo = client.reference(Echo, methods=[Method("echo", async_=True, onreturn=onreturn)])
        futures = [echo.echo(i) for i in range(6)]  # 2 hooks run, 4 queue
        try:
            assert started.acquire(timeout=WAIT) and started.acquire(timeout=WAIT)
            # the hooks stay blocked until a later result had to queue (on a slow
            # machine the other results may arrive after the first two hooks began)
            assert exhausted.seen.wait(WAIT)
        finally:
            gate.set()
        assert [future.result(WAIT) for future in futures] == list(range(6))
    warnings = [
        r.getMessage() for r in caplog.records if "hook pool is exhausted" in r.getMessage()
    ]
    assert warnings == [
        "the event-notify hook pool is exhausted: all 2 threads (max_workers=2) run hooks "
        "and more hooks now queue, so they run late; make oninvoke/onreturn/onthrow quick, "
        "or raise max_workers= on the Client or AsyncClient (logged once)"
    ]


def test_timeout_goes_to_onthrow(client: backchannel.Client) -> None:
    rec = Recorder()
    echo = client.reference(Echo, methods=[all_hooks(rec, "wait", timeout=0.2)])
    with pytest.raises(backchannel.DeadlineExceeded):
        echo.wait(10)
    [(error, seconds)] = rec.of("onthrow")
    assert isinstance(error, backchannel.DeadlineExceeded) and seconds == 10

    later = client.reference(Echo, methods=[all_hooks(rec, "wait", timeout=0.2, async_=True)])
    assert isinstance(later.wait(10).exception(WAIT), backchannel.DeadlineExceeded)
    assert isinstance(rec.of("onthrow")[1][0], backchannel.DeadlineExceeded)


def test_cancelled_async_call_goes_to_onthrow(
    client: backchannel.Client, echo_impl: EchoImpl
) -> None:
    rec = Recorder()
    echo = client.reference(Echo, methods=[all_hooks(rec, "wait", async_=True)])
    future = echo.wait(30)
    assert echo_impl.started.wait(WAIT)
    assert future.cancel()
    assert rec.wait("onthrow")
    [(error, seconds)] = rec.of("onthrow")
    assert isinstance(error, backchannel.CallCancelled) and seconds == 30
    assert str(error) == "test.Echo.wait() was cancelled"
    assert rec.of("onreturn") == []


def test_provider_killed_mid_call_goes_to_onthrow_without_hanging() -> None:
    script = Path(__file__).with_name("provider_process.py")
    process = subprocess.Popen(
        [sys.executable, "-u", str(script)], stdout=subprocess.PIPE, text=True, cwd=script.parent
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        with backchannel.Client(address, timeout=30) as client:
            rec = Recorder()
            echo = client.reference(Echo, methods=[all_hooks(rec, "wait", async_=True)])
            assert echo.echo("the stream is open") == "the stream is open"
            future = echo.wait(30)
            process.send_signal(signal.SIGKILL)
            error = future.exception(WAIT)  # bounded: no hang
            assert isinstance(error, backchannel.TransportError), repr(error)
            [(seen, seconds)] = rec.of("onthrow")
            assert seen is error and seconds == 30
    finally:
        process.kill()
        process.wait(WAIT)


def test_hook_shapes_one_parameter_and_many(client: backchannel.Client) -> None:
    got: dict[str, tuple[Any, ...]] = {}

    def result_only(result: int) -> None:
        got["result_only"] = (result,)

    def result_and_args(result: int, a: int, b: int) -> None:
        got["result_and_args"] = (result, a, b)

    def result_and_rest(result: int, *args: int) -> None:
        got["result_and_rest"] = (result, *args)

    def exc_only(exc: BaseException) -> None:
        got["exc_only"] = (exc,)

    def exc_and_args(exc: BaseException, kind: str, message: str) -> None:
        got["exc_and_args"] = (exc, kind, message)

    for onreturn in (result_only, result_and_args, result_and_rest):
        assert client.reference(Echo, methods=[Method("add", onreturn=onreturn)]).add(3, 4) == 7
    assert got["result_only"] == (7,)
    assert got["result_and_args"] == (7, 3, 4)
    assert got["result_and_rest"] == (7, 3, 4)

    class Listener:
        def onthrow(self, exc: BaseException) -> None:  # a bound method: self is not counted
            got["bound"] = (exc,)

    for onthrow in (exc_only, exc_and_args, Listener().onthrow):
        echo = client.reference(Echo, methods=[Method("fail", onthrow=onthrow)])
        with pytest.raises(ValueError):
            echo.fail("ValueError", "v")
    assert isinstance(got["exc_only"][0], ValueError)
    assert got["exc_and_args"][1:] == ("ValueError", "v")
    assert isinstance(got["bound"][0], ValueError)


def test_two_references_with_different_hooks_fire_only_their_own(
    client: backchannel.Client,
) -> None:
    first, second = Recorder(), Recorder()
    one = client.reference(Echo, methods=[all_hooks(first, "echo")])
    two = client.reference(Echo, methods=[all_hooks(second, "echo", async_=True)])
    plain = client.reference(Echo)
    assert one.echo(1) == 1
    assert two.echo(2).result(WAIT) == 2
    assert plain.echo(3) == 3
    assert first.of("onreturn") == [(1, 1)]
    assert second.of("onreturn") == [(2, 2)]
    grouped = client.reference(
        Echo, group="cn", version="1.0.0", methods=[all_hooks(second, "echo")]
    )
    assert grouped.echo(4) == 4
    assert first.of("onreturn") == [(1, 1)]
    assert second.of("onreturn") == [(2, 2), (4, 4)]


def test_method_notify_takes_the_hooks_of_an_object(client: backchannel.Client) -> None:
    class NotifyImpl:
        def __init__(self) -> None:
            self.ret: dict[int, int] = {}

        def onreturn(self, result: int, a: int, b: int) -> None:
            self.ret[a] = result

    notify = NotifyImpl()
    echo = client.reference(Echo, methods=[Method.notify("add", notify)])
    assert echo.add(5, 6) == 11 and notify.ret == {5: 11}
    with pytest.raises(TypeError, match="none of the hooks"):
        Method.notify("add", object())


# --- bad hooks are errors when the reference is made ----------------------------------------


def _two_positional(a: Any, b: Any) -> None: ...
def _one_positional(a: Any) -> None: ...
def _none() -> None: ...
def _keyword_only(result: Any, *, required: Any) -> None: ...
async def _coroutine(result: Any) -> None: ...


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Method("add", onreturn="notify.onreturn"), r"onreturn must be a callable"),  # type: ignore[arg-type]
        (Method("add", oninvoke=_one_positional), r"oninvoke hook .* cannot take the call's"),
        (Method("echo", oninvoke=_none), r"oninvoke hook .* cannot take the call's"),
        (Method("add", onreturn=_none), r"onreturn hook .* cannot take the result"),
        (Method("add", onthrow=_two_positional), r"onthrow hook .* the exception and the call's"),
        (Method("add", onreturn=_keyword_only), r"onreturn hook .* cannot take"),
        (Method("add", onreturn=_coroutine), r"sync Client cannot await .* onreturn"),
    ],
    ids=[
        "not-callable",
        "oninvoke-short",
        "oninvoke-none",
        "onreturn-none",
        "onthrow-short",
        "keyword-only",
        "async-def-on-sync-client",
    ],
)
def test_bad_hook_is_a_clear_error_at_reference_time(
    client: backchannel.Client, settings: Method, message: str
) -> None:
    with pytest.raises(TypeError, match=message) as raised:
        client.reference(Echo, methods=[settings])
    assert f"test.Echo.{settings.name}" in str(raised.value)


def test_async_def_hooks_are_fine_on_the_async_client(server: backchannel.Server) -> None:
    async def body() -> None:
        async with backchannel.AsyncClient(server.address) as client:
            client.reference(Echo, methods=[Method("add", onreturn=_coroutine)])
            with pytest.raises(TypeError, match="cannot take the result"):
                client.reference(Echo, methods=[Method("add", onreturn=_none)])

    run(body())


# --- the AsyncClient ------------------------------------------------------------------------


class AsyncRecorder:
    """``async def`` hooks that record on the loop; waits are bounded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.changed = asyncio.Event()

    def hook(self, kind: str, raises: BaseException | None = None) -> Callable[..., Any]:
        async def record(*args: Any) -> None:
            self.calls.append((kind, args))
            self.changed.set()
            if raises is not None:
                raise raises

        return record

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [args for k, args in self.calls if k == kind]

    async def wait(self, kind: str) -> None:
        async def seen() -> None:
            while not self.of(kind):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(seen(), WAIT)

    def all(self, name: str, **settings: Any) -> Method:
        return Method(
            name,
            oninvoke=self.hook("oninvoke"),
            onreturn=self.hook("onreturn"),
            onthrow=self.hook("onthrow"),
            **settings,
        )


def test_asyncio_async_def_hooks_around_awaited_calls(server: backchannel.Server) -> None:
    async def body() -> None:
        rec = AsyncRecorder()
        async with backchannel.AsyncClient(server.address) as client:
            echo = client.reference(Echo, methods=[rec.all("add"), rec.all("fail")])
            assert await echo.add(2, 3) == 5
            assert rec.calls == [("oninvoke", (2, 3)), ("onreturn", (5, 2, 3))]
            with pytest.raises(ValueError, match="v"):
                await echo.fail("ValueError", "v")
            [(error, kind, message)] = rec.of("onthrow")
            assert isinstance(error, ValueError) and (kind, message) == ("ValueError", "v")
            assert len(rec.of("onreturn")) == 1

    run(body())


def test_asyncio_plain_hooks_run_off_the_loop(server: backchannel.Server) -> None:
    async def body() -> None:
        rec = Recorder()
        async with backchannel.AsyncClient(server.address) as client:
            echo = client.reference(Echo, methods=[all_hooks(rec, "add")])
            assert await echo.add(2, 3) == 5
            assert rec.of("oninvoke") == [(2, 3)] and rec.of("onreturn") == [(5, 2, 3)]
            assert all(t.startswith("backchannel-notify") for t in rec.threads())

    run(body())


def test_asyncio_async_returns_a_future_at_once(server: backchannel.Server) -> None:
    async def body() -> None:
        rec = AsyncRecorder()
        async with backchannel.AsyncClient(server.address) as client:
            echo = client.reference(Echo, methods=[rec.all("add", async_=True)])
            future = echo.add(20, 22)
            assert isinstance(future, asyncio.Task)
            assert future.get_name() == "backchannel test.Echo.add()"  # in task dumps
            assert await future == 42
            assert rec.of("onreturn") == [(42, 20, 22)]
            futures = [echo.add(i, 1000 * i) for i in range(100)]
            assert await asyncio.gather(*futures) == [1001 * i for i in range(100)]
            seen = rec.of("onreturn")[1:]
            assert len(seen) == 100 and all(r == a + b and b == 1000 * a for r, a, b in seen)

    run(body())


def test_asyncio_async_needs_a_running_loop(server: backchannel.Server) -> None:
    async def make() -> Any:
        client = backchannel.AsyncClient(server.address)
        return client, client.reference(Echo, methods=[Method("add", async_=True)])

    client, echo = run(make())
    with pytest.raises(RuntimeError) as raised:
        echo.add(1, 2)
    assert str(raised.value) == (
        "test.Echo.add() has async_=True on an AsyncClient: call it from a running event "
        "loop (it returns a Task)"
    )
    run(client.close())


def test_asyncio_hook_errors_go_where_they_should(
    server: backchannel.Server, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        rec = AsyncRecorder()
        oops = RuntimeError("oninvoke broke")
        async with backchannel.AsyncClient(server.address) as client:
            echo = client.reference(
                Echo,
                methods=[
                    Method(
                        "add",
                        oninvoke=rec.hook("oninvoke", raises=oops),
                        onreturn=rec.hook("onreturn", raises=RuntimeError("onreturn broke")),
                        onthrow=rec.hook("onthrow", raises=RuntimeError("onthrow broke")),
                    )
                ],
            )
            assert await echo.add(1, 2) == 3  # proceeds; the caller gets its result
            assert [kind for kind, _ in rec.calls] == [
                "oninvoke",
                "onthrow",
                "onreturn",
                "onthrow",
            ]
            assert rec.of("onthrow")[0] == (oops, 1, 2)
            assert str(rec.of("onthrow")[1][0]) == "onreturn broke"

    with caplog.at_level(logging.ERROR, logger="backchannel"):
        run(body())
    assert sum("onthrow hook of test.Echo.add()" in r.getMessage() for r in caplog.records) == 2


def test_asyncio_timeout_and_cancellation_go_to_onthrow(
    server: backchannel.Server, echo_impl: EchoImpl
) -> None:
    async def body() -> None:
        rec = AsyncRecorder()
        async with backchannel.AsyncClient(server.address) as client:
            timed = client.reference(Echo, methods=[rec.all("wait", timeout=0.2)])
            with pytest.raises(backchannel.DeadlineExceeded):
                await timed.wait(10)
            assert isinstance(rec.of("onthrow")[0][0], backchannel.DeadlineExceeded)

            echo = client.reference(Echo, methods=[rec.all("wait", async_=True)])
            task = echo.wait(30)
            assert await asyncio.to_thread(echo_impl.started.wait, WAIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            [_, (error, seconds)] = rec.of("onthrow")
            assert isinstance(error, asyncio.CancelledError) and seconds == 30
            assert rec.of("onreturn") == []

    run(body())


def test_asyncio_two_references_fire_only_their_own(server: backchannel.Server) -> None:
    async def body() -> None:
        first, second = AsyncRecorder(), AsyncRecorder()
        async with backchannel.AsyncClient(server.address) as client:
            one = client.reference(Echo, methods=[first.all("echo")])
            two = client.reference(Echo, methods=[second.all("echo", async_=True)])
            assert await one.echo("a") == "a"
            assert await two.echo("b") == "b"
            assert first.of("onreturn") == [("a", "a")]
            assert second.of("onreturn") == [("b", "b")]

    run(body())


def test_asyncio_provider_killed_mid_call_goes_to_onthrow() -> None:
    script = Path(__file__).with_name("provider_process.py")
    process = subprocess.Popen(
        [sys.executable, "-u", str(script)], stdout=subprocess.PIPE, text=True, cwd=script.parent
    )

    async def body(address: str) -> None:
        rec = AsyncRecorder()
        async with backchannel.AsyncClient(address, timeout=30) as client:
            echo = client.reference(Echo, methods=[rec.all("wait", async_=True)])
            assert await client.reference(Echo).echo("open") == "open"
            task = echo.wait(30)
            process.send_signal(signal.SIGKILL)
            with pytest.raises(backchannel.TransportError):
                await asyncio.wait_for(task, WAIT)
            [(error, seconds)] = rec.of("onthrow")
            assert isinstance(error, backchannel.TransportError) and seconds == 30

    try:
        assert process.stdout is not None
        run(body(process.stdout.readline().strip()), timeout=20)
    finally:
        process.kill()
        process.wait(WAIT)


def test_asyncio_hook_shapes_one_parameter_and_many(server: backchannel.Server) -> None:
    got: dict[str, tuple[Any, ...]] = {}

    def result_only(result: int) -> None:
        got["result_only"] = (result,)

    async def async_result_only(result: int) -> None:
        got["async_result_only"] = (result,)

    def result_and_args(result: int, a: int, b: int) -> None:
        got["result_and_args"] = (result, a, b)

    async def async_result_and_rest(result: int, *args: int) -> None:
        got["async_result_and_rest"] = (result, *args)

    def exc_only(exc: BaseException) -> None:
        got["exc_only"] = (exc,)

    async def async_exc_only(exc: BaseException) -> None:
        got["async_exc_only"] = (exc,)

    def exc_and_args(exc: BaseException, kind: str, message: str) -> None:
        got["exc_and_args"] = (exc, kind, message)

    async def async_exc_and_args(exc: BaseException, kind: str, message: str) -> None:
        got["async_exc_and_args"] = (exc, kind, message)

    class Listener:
        async def onthrow(self, exc: BaseException) -> None:  # bound: self is not counted
            got["bound"] = (exc,)

    async def body() -> None:
        async with backchannel.AsyncClient(server.address) as client:
            for onreturn in (result_only, async_result_only, result_and_args):
                echo = client.reference(Echo, methods=[Method("add", onreturn=onreturn)])
                assert await echo.add(3, 4) == 7
            # async_=True: the hooks have run when the task resolves
            hooked = Method("add", async_=True, onreturn=async_result_and_rest)
            assert await client.reference(Echo, methods=[hooked]).add(3, 4) == 7

            onthrows = (exc_only, async_exc_only, exc_and_args, async_exc_and_args)
            for onthrow in (*onthrows, Listener().onthrow):
                echo = client.reference(Echo, methods=[Method("fail", onthrow=onthrow)])
                with pytest.raises(ValueError, match="v"):
                    await echo.fail("ValueError", "v")

    run(body())
    assert got["result_only"] == (7,)
    assert got["async_result_only"] == (7,)
    assert got["result_and_args"] == (7, 3, 4)
    assert got["async_result_and_rest"] == (7, 3, 4)
    for one in ("exc_only", "async_exc_only", "bound"):
        assert len(got[one]) == 1 and isinstance(got[one][0], ValueError), one
    for many in ("exc_and_args", "async_exc_and_args"):
        assert isinstance(got[many][0], ValueError) and got[many][1:] == ("ValueError", "v")


@pytest.mark.parametrize("flavour", ["async def", "plain"])
def test_asyncio_onthrow_raising_is_logged_and_nothing_else_breaks(
    server: backchannel.Server, caplog: pytest.LogCaptureFixture, flavour: str
) -> None:
    seen: list[BaseException] = []

    def plain_onthrow(exc: BaseException) -> None:
        seen.append(exc)
        raise RuntimeError("onthrow broke")

    async def async_onthrow(exc: BaseException) -> None:
        plain_onthrow(exc)

    onthrow = async_onthrow if flavour == "async def" else plain_onthrow

    async def body() -> None:
        async with backchannel.AsyncClient(server.address) as client:
            echo = client.reference(Echo, methods=[Method("fail", onthrow=onthrow)])
            with pytest.raises(KeyError) as raised:
                await echo.fail("KeyError", "k")  # the provider's exception, not onthrow's
            assert seen == [raised.value]
            assert await echo.add(2, 3) == 5  # the stream and the reference still work
            with pytest.raises(KeyError):
                await echo.fail("KeyError", "again")  # and the next failure goes the same way
            assert len(seen) == 2
            tasked = client.reference(Echo, methods=[Method("fail", onthrow=onthrow, async_=True)])
            with pytest.raises(KeyError):
                await tasked.fail("KeyError", "as a task")
            assert len(seen) == 3

    with caplog.at_level(logging.ERROR, logger="backchannel"):
        run(body())
    logged = [r for r in caplog.records if "onthrow hook of test.Echo.fail()" in r.getMessage()]
    assert len(logged) == 3
    assert all(r.exc_info is not None and "onthrow broke" in str(r.exc_info[1]) for r in logged)
    assert {r.getMessage() for r in logged} == {
        "the onthrow hook of test.Echo.fail() raised; ignored"
    }


def test_asyncio_a_slow_async_def_hook_delays_only_its_own_task(
    server: backchannel.Server,
) -> None:
    async def body() -> None:
        gate = asyncio.Event()  # made on the test's loop: the hook awaits it there
        entered = asyncio.Event()

        async def onreturn(result: Any, value: Any) -> None:
            if value == "slow":
                entered.set()
                await asyncio.wait_for(gate.wait(), WAIT)

        async with backchannel.AsyncClient(server.address) as client:
            methods = [Method("echo", async_=True, onreturn=onreturn)]
            echo = client.reference(Echo, methods=methods)
            slow = echo.echo("slow")
            await asyncio.wait_for(entered.wait(), WAIT)  # the slow hook is running
            fast = [echo.echo(i) for i in range(5)]
            try:
                assert await asyncio.wait_for(asyncio.gather(*fast), WAIT) == list(range(5))
                assert await client.reference(Echo).add(1, 1) == 2  # nor is the stream held
                assert not slow.done()
            finally:
                gate.set()
            assert await asyncio.wait_for(slow, WAIT) == "slow"

    run(body())


def test_asyncio_a_slow_plain_hook_delays_only_its_own_task(server: backchannel.Server) -> None:
    gate = threading.Event()
    entered = threading.Event()

    def onreturn(result: Any, value: Any) -> None:  # runs in the notify pool, may block
        if value == "slow":
            entered.set()
            gate.wait(WAIT)

    async def body() -> None:
        async with backchannel.AsyncClient(server.address) as client:
            methods = [Method("echo", async_=True, onreturn=onreturn)]
            echo = client.reference(Echo, methods=methods)
            slow = echo.echo("slow")
            assert await asyncio.to_thread(entered.wait, WAIT)  # the slow hook is running
            fast = [echo.echo(i) for i in range(5)]
            try:
                assert await asyncio.wait_for(asyncio.gather(*fast), WAIT) == list(range(5))
                assert await client.reference(Echo).add(1, 1) == 2
                assert not slow.done()
            finally:
                gate.set()
            assert await asyncio.wait_for(slow, WAIT) == "slow"

    run(body())


# --- bad arguments, and what is done before an async_=True proxy returns -------------------


def test_sync_bad_arguments_reach_onthrow_in_the_hooks_shape(client: backchannel.Client) -> None:
    rec = Recorder()
    echo = client.reference(Echo, methods=[all_hooks(rec, "add")])
    with pytest.raises(backchannel.InvalidArguments) as raised:
        echo.add(1)  # type: ignore[call-arg]
    # onthrow(exc, a, b) hears it: the missing argument is None, not a TypeError of its own
    assert rec.of("onthrow") == [(raised.value, 1, None)]
    assert rec.of("oninvoke") == []

    tasked = client.reference(Echo, methods=[all_hooks(rec, "greet", async_=True)])
    future = tasked.greet(name="x", bogus=1)  # type: ignore[call-arg]
    assert isinstance(future, concurrent.futures.Future)  # not raised: a failed future
    error = future.exception(WAIT)
    assert isinstance(error, backchannel.InvalidArguments)
    assert rec.of("onthrow")[1] == (error, "x", None)


def test_sync_async_unsendable_argument_is_a_failed_future_after_oninvoke(
    client: backchannel.Client, echo_impl: EchoImpl
) -> None:
    rec = Recorder()
    echo = client.reference(Echo, methods=[all_hooks(rec, "echo", async_=True)])
    unsendable = object()
    future = echo.echo(unsendable)
    assert rec.of("oninvoke") == [(unsendable,)]  # ran in this thread, before the return
    error = future.exception(WAIT)
    assert isinstance(error, TypeError) and "argument 0 'value'" in str(error)
    assert rec.of("onthrow") == [(error, unsendable)]
    assert echo_impl.calls == 0


def test_asyncio_async_runs_oninvoke_and_binding_inside_the_task(
    server: backchannel.Server,
) -> None:
    async def body() -> None:
        rec = AsyncRecorder()
        async with backchannel.AsyncClient(server.address) as client:
            echo = client.reference(Echo, methods=[rec.all("add", async_=True)])
            task = echo.add(1, 2)
            assert rec.calls == []  # the proxy returned before oninvoke ran
            assert await task == 3
            assert rec.of("oninvoke") == [(1, 2)]

            bad = echo.add(1)  # not raised here: the Task binds the arguments
            assert isinstance(bad, asyncio.Task)
            with pytest.raises(backchannel.InvalidArguments) as raised:
                await bad
            assert rec.of("onthrow") == [(raised.value, 1, None)]
            assert rec.of("oninvoke") == [(1, 2)]  # no oninvoke for a call that never bound

            plain = client.reference(Echo, methods=[rec.all("add")])
            with pytest.raises(backchannel.InvalidArguments):
                await plain.add(b=2, c=3)
            assert rec.of("onthrow")[1][1:] == (None, 2)

    run(body())


# --- exact messages, hook kinds and where hooks run (the survivors of `make mutate`) ----------


_partial_none = functools.partial(_none)  # a partial has no __qualname__: named by its repr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            Method("add", oninvoke="notify.oninvoke"),  # type: ignore[arg-type]
            "test.Echo.add: oninvoke must be a callable (a function or a bound method), "
            "got 'notify.oninvoke'",
        ),
        (
            Method("add", oninvoke=_one_positional),
            "test.Echo.add: oninvoke hook _one_positional(a: 'Any') -> 'None' cannot take "
            "the call's arguments (2 positional arguments): too many positional arguments",
        ),
        (
            Method("add", onreturn=_keyword_only),
            "test.Echo.add: onreturn hook _keyword_only(result: 'Any', *, required: 'Any') "
            "-> 'None' cannot take the result (1 positional argument): "
            "missing a required argument: 'required'",
        ),
        (
            Method("add", onthrow=_two_positional),
            "test.Echo.add: onthrow hook _two_positional(a: 'Any', b: 'Any') -> 'None' cannot "
            "take the exception and the call's arguments (3 positional arguments): "
            "too many positional arguments",
        ),
        (
            Method("add", onreturn=_partial_none),
            f"test.Echo.add: onreturn hook {_partial_none!r}() -> 'None' cannot take the "
            "result and the call's arguments (3 positional arguments): "
            "too many positional arguments",
        ),
    ],
    ids=["not-callable", "oninvoke-short", "onreturn-keyword-only", "onthrow-short", "partial"],
)
def test_a_bad_hooks_message_names_method_kind_hook_signature_and_argument_count(
    client: backchannel.Client, settings: Method, message: str
) -> None:
    with pytest.raises(TypeError) as raised:
        client.reference(Echo, methods=[settings])
    assert str(raised.value) == message


@backchannel.interface("test.Tags")
class Tags:
    def tag(self, name: str, *rest: str) -> str: ...


def test_a_variadic_methods_hooks_are_checked_with_one_argument_more(
    client: backchannel.Client,
) -> None:
    """tag(name, *rest): a hook must take 1 and 2 arguments (the ends of the range, and
    one past the named parameters)."""

    def name_only(name: str) -> None: ...
    def name_and_one(name: str, extra: str = "") -> None: ...

    with pytest.raises(TypeError) as raised:
        client.reference(Tags, methods=[Method("tag", oninvoke=name_only)])
    assert str(raised.value) == (
        f"test.Tags.tag: oninvoke hook {name_only.__qualname__}(name: 'str') -> 'None' "
        "cannot take the call's arguments (2 positional arguments): "
        "too many positional arguments"
    )
    client.reference(Tags, methods=[Method("tag", oninvoke=name_and_one)])  # fits both


class AwaitableHooks:
    """Plain functions that return a coroutine: the reference-time check cannot see them."""

    def __init__(self) -> None:
        self.made: list[Any] = []

    def hook(self, *_args: Any) -> Any:
        coroutine = asyncio.sleep(0)
        self.made.append(coroutine)
        return coroutine

    def all_closed(self) -> bool:
        return all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in self.made)


def _awaitable_error(kind: str, method: str) -> str:
    return (
        f"test.Echo.{method}: {kind} returned an awaitable; the sync Client cannot await "
        "hooks: use a plain function, or AsyncClient"
    )


def test_sync_client_a_hook_returning_an_awaitable_is_a_hook_failure_that_onthrow_hears(
    client: backchannel.Client,
) -> None:
    awaitables, rec = AwaitableHooks(), Recorder()
    method = Method(
        "add", oninvoke=awaitables.hook, onreturn=awaitables.hook, onthrow=rec.hook("onthrow")
    )
    echo = client.reference(Echo, methods=[method])
    assert echo.add(1, 2) == 3  # the call goes on, its result unaffected
    heard = rec.of("onthrow")
    assert [(str(exc), *args) for exc, *args in heard] == [
        (_awaitable_error("oninvoke", "add"), 1, 2),
        (_awaitable_error("onreturn", "add"), 1, 2),
    ]
    assert all(isinstance(exc, TypeError) for exc, *_ in heard)
    assert len(awaitables.made) == 2 and awaitables.all_closed()  # no "never awaited"


def test_sync_client_an_onthrow_returning_an_awaitable_is_logged(
    client: backchannel.Client, caplog: pytest.LogCaptureFixture
) -> None:
    awaitables = AwaitableHooks()
    echo = client.reference(Echo, methods=[Method("fail", onthrow=awaitables.hook)])
    with caplog.at_level(logging.ERROR, logger="backchannel"):
        with pytest.raises(KeyError):
            echo.fail("KeyError", "k")
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "the onthrow hook of test.Echo.fail() raised; ignored"
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == _awaitable_error("onthrow", "fail")
    assert len(awaitables.made) == 1 and awaitables.all_closed()


@pytest.mark.parametrize("kind", ["oninvoke", "onreturn"])
@pytest.mark.parametrize("flavour", ["Client", "AsyncClient"])
def test_a_hook_raising_without_onthrow_is_logged_with_kind_method_and_traceback(
    server: backchannel.Server, caplog: pytest.LogCaptureFixture, kind: str, flavour: str
) -> None:
    oops = RuntimeError(f"{kind} broke")

    def hook(*_args: Any) -> None:
        raise oops

    method = Method("add", **{kind: hook})

    async def asyncio_body() -> None:
        async with backchannel.AsyncClient(server.address) as client:
            assert await client.reference(Echo, methods=[method]).add(1, 2) == 3

    with caplog.at_level(logging.ERROR, logger="backchannel"):
        if flavour == "Client":
            with backchannel.Client(server.address) as client:
                assert client.reference(Echo, methods=[method]).add(1, 2) == 3
        else:
            run(asyncio_body())
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == f"the {kind} hook of test.Echo.add() raised"
    assert record.exc_info is not None and record.exc_info[1] is oops


def test_asyncio_plain_onthrow_hears_raising_hooks_and_bad_arguments(
    server: backchannel.Server,
) -> None:
    """Plain hooks on the AsyncClient run in the notify pool: onthrow too, whatever failed."""
    rec = Recorder()
    invoke_broke, return_broke = RuntimeError("oninvoke broke"), RuntimeError("onreturn broke")
    method = Method(
        "add",
        oninvoke=rec.hook("oninvoke", raises=invoke_broke),
        onreturn=rec.hook("onreturn", raises=return_broke),
        onthrow=rec.hook("onthrow"),
    )

    async def body() -> None:
        async with backchannel.AsyncClient(server.address) as client:
            echo = client.reference(Echo, methods=[method, all_hooks(rec, "greet")])
            assert await echo.add(1, 2) == 3
            assert rec.of("onthrow") == [(invoke_broke, 1, 2), (return_broke, 1, 2)]
            with pytest.raises(backchannel.InvalidArguments) as raised:
                await echo.add(1, 2, 3)
            assert rec.of("onthrow")[2] == (raised.value, 1, 2)  # the extra one dropped
            assert await echo.greet(greeting="Hi", name="grpc") == "Hi, grpc!"
            assert rec.of("oninvoke")[-1] == ("grpc", "Hi")

    run(body())
    assert all(t.startswith("backchannel-notify") for t in rec.threads())


def test_asyncio_async_def_hooks_take_no_notify_thread(server: backchannel.Server) -> None:
    """With the only notify thread held by a slow plain hook, a call whose hooks are all
    async def still runs them (oninvoke, onreturn, onthrow) at once."""
    gate = threading.Event()
    entered = threading.Event()

    def slow(result: Any, value: Any) -> None:
        entered.set()
        gate.wait(3 * WAIT)  # longer than the test waits: a hook queued behind it fails it

    async def body() -> None:
        rec = AsyncRecorder()
        async with backchannel.AsyncClient(server.address, max_workers=1) as client:
            held = client.reference(Echo, methods=[Method("echo", async_=True, onreturn=slow)])
            echo = client.reference(Echo, methods=[rec.all("add"), rec.all("fail")])
            blocker = held.echo("hold the thread")
            try:
                assert await asyncio.to_thread(entered.wait, WAIT)
                assert await asyncio.wait_for(echo.add(1, 2), WAIT) == 3
                with pytest.raises(ValueError):
                    await asyncio.wait_for(echo.fail("ValueError", "v"), WAIT)
                assert [kind for kind, _ in rec.calls] == [
                    "oninvoke",
                    "onreturn",
                    "oninvoke",
                    "onthrow",
                ]
                assert not blocker.done()
            finally:
                gate.set()
            assert await asyncio.wait_for(blocker, WAIT) == "hold the thread"

    run(body())


def test_sync_async_call_on_a_closed_client_is_a_failed_future_after_onthrow_inline(
    server: backchannel.Server,
) -> None:
    rec = Recorder()
    with backchannel.Client(server.address) as client:
        echo = client.reference(Echo, methods=[all_hooks(rec, "add", async_=True)])
        assert echo.add(1, 2).result(WAIT) == 3
    future = echo.add(3, 4)  # closed: the call cannot start
    error = future.exception(WAIT)
    assert isinstance(error, backchannel.ChannelClosed)
    assert rec.of("onthrow") == [(error, 3, 4)]
    # the hook pool is shut down: the hook ran in the caller's thread, before the return
    [thread] = [thread for kind, _, thread in rec.calls if kind == "onthrow"]
    assert thread == threading.current_thread().name


def test_asyncio_call_on_a_closed_client_goes_to_a_plain_onthrow_run_inline(
    server: backchannel.Server,
) -> None:
    rec = Recorder()

    async def body() -> None:
        client = backchannel.AsyncClient(server.address)
        echo = client.reference(Echo, methods=[Method("add", onthrow=rec.hook("onthrow"))])
        assert await echo.add(1, 2) == 3
        await client.close()
        with pytest.raises(backchannel.ChannelClosed) as raised:
            await echo.add(3, 4)
        assert rec.of("onthrow") == [(raised.value, 3, 4)]

    run(body())
    # the hook pool is shut down: the hook ran inline, on the loop's thread (this one)
    assert rec.threads() == {threading.current_thread().name}


def _async_hook(*_args: Any) -> Any:
    async def hook(*_args: Any) -> None: ...

    return hook


async def _async_three(result: Any, a: Any, b: Any) -> None: ...


class _AsyncCall:
    """An object with an async ``__call__``."""

    async def __call__(self, *args: Any) -> None: ...


class _InheritsAsyncCall(_AsyncCall):
    pass


class _AsyncDecorator:
    """A class-based decorator of an ``async def``: a descriptor with an async __call__."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        return functools.partial(self, instance)

    async def __call__(self, *args: Any) -> Any:
        return await self.function(*args)


@_AsyncDecorator
async def _decorated(*args: Any) -> None: ...


class _Unreadable:
    """A callable whose signature inspect cannot read (as some C-implemented ones)."""

    __signature__ = "unreadable"

    def __init__(self) -> None:
        self.got: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> None:
        self.got.append(args)


class _UnreadableAsync:
    __signature__ = "unreadable"

    async def __call__(self, *args: Any) -> None: ...


@pytest.mark.parametrize(
    ("settings", "kinds"),
    [
        (Method("add", oninvoke=_async_hook(), onthrow=_async_hook()), "oninvoke, onthrow"),
        (Method("add", onreturn=_async_three), "onreturn"),  # the (result, *args) shape
        (Method("add", onthrow=_AsyncCall()), "onthrow"),
        (Method("add", onthrow=_InheritsAsyncCall()), "onthrow"),
        (Method("add", onreturn=_decorated), "onreturn"),
        (Method("add", onreturn=_UnreadableAsync()), "onreturn"),
    ],
    ids=["two", "onreturn-with-args", "async-call", "inherited", "decorator", "unreadable"],
)
def test_sync_client_refuses_every_kind_of_async_hook_naming_them(
    client: backchannel.Client, settings: Method, kinds: str
) -> None:
    with pytest.raises(TypeError) as raised:
        client.reference(Echo, methods=[settings])
    assert str(raised.value) == (
        f"test.Echo.add: the sync Client cannot await the async def hook(s) {kinds}; "
        "use plain functions, or AsyncClient"
    )


def test_sync_client_takes_plain_callable_objects_and_trusts_unreadable_signatures(
    client: backchannel.Client,
) -> None:
    class Calls:
        def __init__(self) -> None:
            self.got: list[tuple[Any, ...]] = []

        def __call__(self, *args: Any) -> None:
            self.got.append(args)

    plain, unreadable, partial_got = Calls(), _Unreadable(), Calls()
    methods = [
        Method("add", oninvoke=plain, onreturn=unreadable),
        Method("echo", onreturn=functools.partial(partial_got, "partial")),
    ]
    echo = client.reference(Echo, methods=methods)
    assert echo.add(3, 4) == 7
    assert plain.got == [(3, 4)]
    assert unreadable.got == [(7, 3, 4)]  # no signature to go by: (result, *args)
    assert echo.echo("x") == "x"
    assert partial_got.got == [("partial", "x", "x")]


def test_hooks_run_inside_the_calls_span_named_service_slash_method(
    server: backchannel.Server,
) -> None:
    """With a tracer provider, every hook sees the call's client span as current, also
    onthrow of an async_=True call whose arguments did not fit (it runs in the pool)."""
    spans: dict[str, tuple[str | None, SpanKind | None]] = {}

    def current() -> tuple[str | None, SpanKind | None]:
        span = trace.get_current_span()
        return getattr(span, "name", None), getattr(span, "kind", None)

    def plain(kind: str) -> Callable[..., None]:
        def record(*_args: Any) -> None:
            spans[kind] = current()

        return record

    async def async_oninvoke(*_args: Any) -> None:
        spans["async oninvoke"] = current()

    async def asyncio_body() -> None:
        async with backchannel.AsyncClient(server.address) as client:
            echo = client.reference(Echo, methods=[Method("add", oninvoke=async_oninvoke)])
            assert await echo.add(1, 2) == 3

    telemetry.configure(tracer_provider=TracerProvider())
    try:
        with backchannel.Client(server.address) as client:
            methods = [
                Method("add", async_=True, onthrow=plain("onthrow")),
                Method("echo", oninvoke=plain("oninvoke")),
            ]
            echo = client.reference(Echo, methods=methods)
            assert isinstance(echo.add(1, 2, 3).exception(WAIT), backchannel.InvalidArguments)
            assert echo.echo(1) == 1
        run(asyncio_body())
    finally:
        telemetry.configure()
    client_span = SpanKind.CLIENT
    assert spans == {
        "onthrow": ("test.Echo/add", client_span),
        "oninvoke": ("test.Echo/echo", client_span),
        "async oninvoke": ("test.Echo/add", client_span),
    }


def test_closing_a_client_leaves_running_hooks_to_finish_in_the_background(
    server: backchannel.Server,
) -> None:
    gate, entered = threading.Event(), threading.Event()

    def onreturn(result: Any, value: Any) -> None:
        entered.set()
        gate.wait(2 * WAIT)

    client = backchannel.Client(server.address)
    echo = client.reference(Echo, methods=[Method("echo", async_=True, onreturn=onreturn)])
    future = echo.echo("late")
    try:
        assert entered.wait(WAIT)
        client.close()  # returns while the hook still runs
        assert not future.done()
    finally:
        gate.set()
    assert future.result(WAIT) == "late"  # the hook finished, then settled the future
