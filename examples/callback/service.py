"""The seed's CallbackService and CallbackListener interfaces, shared by both sides."""

from __future__ import annotations

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
