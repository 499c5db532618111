"""A per-client sliding-window rate limit, so one user cannot monopolise the GPU.

Shared by the front ends: Discord counts questions per user, the API per token or address.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable


class RateLimiter:
    """At most ``per_window`` requests per key in any ``window_s`` seconds; 0 means no limit."""

    def __init__(
        self,
        per_window: int,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self.clock = clock
        self._hits: dict[Hashable, deque[float]] = {}
        self._last_sweep = clock()

    def acquire(self, key: Hashable) -> float | None:
        """Count a request for ``key``: None if allowed, else the seconds until it would be."""
        if self.per_window <= 0:
            return None
        now = self.clock()
        if now - self._last_sweep >= self.window_s:
            self._forget_idle(now)
        hits = self._hits.setdefault(key, deque())
        while hits and now - hits[0] >= self.window_s:
            hits.popleft()
        if len(hits) >= self.per_window:
            return self.window_s - (now - hits[0])
        hits.append(now)
        return None

    def _forget_idle(self, now: float) -> None:
        """Drop users with no request in the window, so a busy server's memory stays flat."""
        self._hits = {k: h for k, h in self._hits.items() if h and now - h[-1] < self.window_s}
        self._last_sweep = now
