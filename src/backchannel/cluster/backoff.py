"""How long a link waits before its next connection attempt."""

from __future__ import annotations

import random
import time


class Backoff:
    """Exponential backoff with jitter between connection attempts."""

    def __init__(self, first: float = 0.05, most: float = 2.0, factor: float = 2.0) -> None:
        self._first, self._most, self._factor = first, most, factor
        self._delay = 0.0
        self._not_before = 0.0

    def wait(self) -> float:
        """Seconds to wait before the next attempt (0 after a success)."""
        return max(0.0, self._not_before - time.monotonic())

    def failed(self) -> None:
        """An attempt failed: the next one waits longer, with jitter (a half to all of it)."""
        self._delay = min(self._most, self._delay * self._factor if self._delay else self._first)
        self._not_before = time.monotonic() + self._delay * random.uniform(0.5, 1.0)

    def succeeded(self) -> None:
        """Connected: the next failure starts from the first delay again."""
        self._delay = 0.0
        self._not_before = 0.0
