"""The seed's CallbackService and CallbackListener interfaces, and CallbackServiceImpl.

Pushes a change notification to every listener every ``interval`` seconds (5, as in the
seed) from a background thread, and drops listeners whose consumer is gone.
"""

from __future__ import annotations

import threading
import time

import backchannel


@backchannel.interface("com.callback.CallbackListener")
class CallbackListener:
    """What the consumer implements and the provider calls back."""

    def changed(self, msg: str) -> None:
        """A change notification."""
        raise NotImplementedError


@backchannel.interface("com.callback.CallbackService")
class CallbackService:
    """What the provider implements."""

    def addListener(self, key: str, listener: CallbackListener) -> None:
        """Register ``listener`` for changes of ``key``; it is notified at once."""
        raise NotImplementedError

    def removeListener(self, key: str, listener: CallbackListener) -> None:
        """Stop notifying ``listener`` (Dubbo's callback="false" argument)."""
        raise NotImplementedError


class CallbackServiceImpl:
    """Keeps listeners by key and notifies them from a daemon thread."""

    def __init__(self, interval: float = 5.0) -> None:
        self.listeners: dict[str, CallbackListener] = {}
        self._interval = interval
        threading.Thread(target=self._push_forever, daemon=True).start()

    def _push_forever(self) -> None:
        while True:
            for key, listener in list(self.listeners.items()):
                try:
                    listener.changed(self.get_changed(key))
                except Exception:  # the consumer is gone (CallbackGone) or failed
                    self.listeners.pop(key, None)
            time.sleep(self._interval)  # timed trigger change notification, as in the seed

    def addListener(self, key: str, listener: CallbackListener) -> None:
        self.listeners[key] = listener
        listener.changed(self.get_changed(key))  # send change notification

    def removeListener(self, key: str, listener: CallbackListener) -> None:
        if self.listeners.get(key) is listener:
            del self.listeners[key]

    def get_changed(self, key: str) -> str:
        return "Changed: " + time.strftime("%Y-%m-%d %H:%M:%S")
