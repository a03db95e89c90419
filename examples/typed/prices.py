"""The typed example's interfaces: a price feed and the listener it calls back.

Declared as ``typing.Protocol`` classes (their ``...`` bodies are declarations to type
checkers), typed for both APIs by the stub beside this file, ``prices.pyi``, which
``backchannel stubs examples/typed/prices.py`` writes (docs/typing.md).
"""

from __future__ import annotations

from typing import Protocol

import backchannel


@backchannel.interface("demo.typed.PriceListener")
class PriceListener(Protocol):
    """What a consumer implements and the feed calls back: ``def`` or ``async def``."""

    def price(self, symbol: str, value: float) -> None: ...


@backchannel.interface("demo.typed.PriceFeed")
class PriceFeed(Protocol):
    """What the provider implements."""

    @backchannel.method(arguments=[backchannel.Argument(index=1)])
    def subscribe(self, symbol: str, listener: PriceListener) -> int: ...

    def publish(self, symbol: str, value: float) -> int: ...

    def symbols(self) -> list[str]: ...
