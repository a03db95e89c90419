"""The seed's IDemoService, NormalDemoService, Notify and NotifyImpl (event notify).

``Person`` is a protobuf message generated from ``protos/demo/person.proto`` into
``generated/`` (``make gen``); importing this module puts that folder on ``sys.path``,
so the example runs from any working directory.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Protocol

GENERATED = str(Path(__file__).resolve().parent / "generated")
if GENERATED not in sys.path:
    sys.path.insert(0, GENERATED)

from demo.person_pb2 import Person  # noqa: E402

import backchannel  # noqa: E402

#: ids NormalDemoService knows; get() of any other raises LookupError on the provider
KNOWN_IDS = range(1, 11)


@backchannel.interface("com.alibaba.dubbo.callback.implicit.IDemoService")
class IDemoService:
    """What the provider implements: ``public Person get(int id)``."""

    def get(self, id: int) -> Person:
        """The person with ``id``; LookupError when there is none."""
        raise NotImplementedError


class NormalDemoService:
    """The provider's implementation, as the seed's (which knows everybody)."""

    def get(self, id: int) -> Person:
        """``new Person(id, "charles`son", 4)``, for the ids 1 to 10."""
        if id not in KNOWN_IDS:
            raise LookupError(f"no person {id}")
        return Person(id=id, name="charles`son", age=4)


class Notify(Protocol):
    """The consumer's callback interface: what the hooks of ``get`` look like."""

    def onreturn(self, msg: Person, id: int) -> None:
        """``get(id)`` returned ``msg``."""

    def onthrow(self, ex: BaseException, id: int) -> None:
        """``get(id)`` failed with ``ex``."""


class NotifyImpl:
    """Keeps what the hooks were told, by request id, as the seed's ``NotifyImpl``."""

    def __init__(self) -> None:
        self.ret: dict[int, Person] = {}
        self.errors: dict[int, BaseException] = {}
        self._changed = threading.Condition()

    def onreturn(self, msg: Person, id: int) -> None:
        """Record the result of ``get(id)``."""
        print(f"onreturn: {msg.id} {msg.name} {msg.age}", flush=True)
        with self._changed:
            self.ret[id] = msg
            self._changed.notify_all()

    def onthrow(self, ex: BaseException, id: int) -> None:
        """Record the failure of ``get(id)``."""
        print(f"onthrow: {type(ex).__name__}: {ex}", flush=True)
        with self._changed:
            self.errors[id] = ex
            self._changed.notify_all()

    def wait_for(self, table: dict[int, object], id: int, timeout: float) -> bool:
        """Wait until ``table`` (``self.ret`` or ``self.errors``) holds ``id``."""
        with self._changed:
            return self._changed.wait_for(lambda: id in table, timeout)


#: the seed's <bean id="demoCallback" class="NofifyImpl"/>, for examples/notify/config.toml
demo_callback = NotifyImpl()
