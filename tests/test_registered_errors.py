"""Registered exceptions with an ``__init__`` of their own arrive as themselves, over 127.0.0.1.

A registered type is rebuilt without its ``__init__``: its args and its public
attributes that are Values cross; one that cannot be rebuilt arrives as RemoteError,
with a warning naming it (never silently).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

import backchannel
from backchannel import Argument, Method
from backchannel.errors import RemoteError
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


class Rich(Exception):
    """Its args (one message) are not what its __init__ takes (sku, qty)."""

    def __init__(self, sku: str, qty: int) -> None:
        super().__init__(f"only {qty} of {sku} left")
        self.sku = sku
        self.qty = qty


class Odd(Exception):
    """One attribute is no Value, one is private."""

    def __init__(self, sku: str) -> None:
        super().__init__(f"odd {sku}")
        self.sku = sku
        self.handle = object()
        self._secret = "stays home"


class Picky(Exception):
    """Its __new__ wants what its __init__ wants: it cannot be rebuilt from its args."""

    def __new__(cls, sku: str, qty: int) -> Picky:
        return super().__new__(cls, sku, qty)

    def __init__(self, sku: str, qty: int) -> None:
        super().__init__(f"picky about {sku}")


@backchannel.interface("test.Alert")
class Alert:
    def alert(self, sku: str) -> None: ...


@backchannel.interface("test.Shop")
class Shop:
    def buy(self, kind: str) -> None: ...
    def watch(self, listener: Alert) -> dict[str, Any]: ...


class ShopImpl:
    def buy(self, kind: str) -> None:
        if kind == "rich":
            raise Rich("sku-1", 3)
        if kind == "odd":
            raise Odd("sku-2")
        raise Picky("sku-3", 1)

    def watch(self, listener: Alert) -> dict[str, Any]:
        """Calls the listener and says what arrived when it raised."""
        try:
            listener.alert("sku-4")
        except Exception as exc:
            public = {k: v for k, v in vars(exc).items() if not k.startswith("_")}
            return {"type": type(exc).__qualname__, "str": str(exc), "attributes": public}
        return {}


class RaisingAlert(Alert):
    def alert(self, sku: str) -> None:
        raise Rich(sku, 0)


WATCH = [Method("watch", arguments=[Argument(index=0, callback=True)])]


def serve(errors: list[type[BaseException]]) -> backchannel.Server:
    server = backchannel.Server("127.0.0.1:0", errors=errors)
    server.export(Shop, ShopImpl(), methods=WATCH)
    return server


@pytest.fixture
def shop_server() -> Iterator[backchannel.Server]:
    with serve([Rich]) as server:
        yield server


def test_registered_on_both_sides_arrives_as_itself_with_its_attributes(
    shop_server: backchannel.Server,
) -> None:
    with backchannel.Client(shop_server.address, errors=[Rich]) as client:
        with pytest.raises(Rich) as info:
            client.reference(Shop).buy("rich")
    assert type(info.value) is Rich
    assert (info.value.sku, info.value.qty) == ("sku-1", 3)
    assert str(info.value) == "only 3 of sku-1 left"
    assert info.value.args == ("only 3 of sku-1 left",)


def test_registered_on_the_provider_only_arrives_as_remote_error(
    shop_server: backchannel.Server,
) -> None:
    with backchannel.Client(shop_server.address) as client:
        with pytest.raises(RemoteError) as info:
            client.reference(Shop).buy("rich")
    assert info.value.type_name == f"{__name__}.Rich"
    assert info.value.remote_message == "only 3 of sku-1 left"


def test_an_attribute_that_is_no_value_is_dropped_and_private_ones_stay_home(
    shop_server: backchannel.Server,
) -> None:
    with backchannel.Client(shop_server.address, errors=[Odd]) as client:
        with pytest.raises(Odd) as info:
            client.reference(Shop).buy("odd")
    assert (info.value.sku, str(info.value)) == ("sku-2", "odd sku-2")
    assert not hasattr(info.value, "handle") and not hasattr(info.value, "_secret")


def test_a_type_that_cannot_be_rebuilt_arrives_as_remote_error_with_a_warning(
    shop_server: backchannel.Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backchannel")
    with backchannel.Client(shop_server.address, errors=[Picky]) as client:
        with pytest.raises(RemoteError) as info:
            client.reference(Shop).buy("picky")
    assert info.value.type_name == f"{__name__}.Picky"
    assert str(info.value).endswith("picky about sku-3")
    warned = [r.getMessage() for r in caplog.records if "cannot be rebuilt" in r.getMessage()]
    assert len(warned) == 1, caplog.records
    assert f"{__name__}.Picky" in warned[0] and "Picky.__new__(cls, *args)" in warned[0]


def test_a_listener_raising_a_type_the_provider_registered_arrives_there_as_itself(
    shop_server: backchannel.Server,
) -> None:
    with backchannel.Client(shop_server.address) as client:
        seen = client.reference(Shop, methods=WATCH).watch(RaisingAlert())
    assert seen == {
        "type": "Rich",
        "str": "only 0 of sku-4 left",
        "attributes": {"sku": "sku-4", "qty": 0},
    }


def test_a_listener_raising_a_type_the_provider_did_not_register_is_remote_error() -> None:
    with serve([]) as server, backchannel.Client(server.address) as client:
        seen = client.reference(Shop, methods=WATCH).watch(RaisingAlert())
    assert seen["type"] == "RemoteError"
    assert seen["attributes"]["type_name"] == f"{__name__}.Rich"


def test_attributes_from_the_wire_never_set_a_private_name_or_shadow_a_method() -> None:
    types = codec.ErrorTypes([Rich])
    error = pb.Error(type=f"{__name__}.Rich", message="m", args=[pb.Value(string_value="m")])
    for name in ("sku", "_secret", "__class__", "with_traceback", "add_note", "args"):
        error.attributes[name].CopyFrom(pb.Value(int_value=1))
    exc = codec.decode_error(error, types)
    assert type(exc) is Rich
    assert vars(exc) == {"sku": 1}
    assert exc.args == ("m",) and callable(exc.with_traceback)
