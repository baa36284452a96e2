"""Deadlines for many upstream exchanges at once, REST and gRPC alike.

Arming and cancelling a uvloop timer per request cost the router ~6 us of CPU. One timer
instead looks for the exchanges past their deadline every SWEEP_S while any is pending: the
shortest attempt deadline is seconds long, so 50 ms is fine-grained enough.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Generic, Hashable, TypeVar

SWEEP_S = 0.05
K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """``expire(key)`` is called once ``key``'s loop time has passed, unless it was discarded
    first. Bound to the event loop it is first used in."""

    def __init__(self, expire: Callable[[K], None]):
        self._expire = expire
        self._due: dict[K, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        # asyncio.get_running_loop() makes a getpid() system call each time (its fork check):
        # once per request that was a twentieth of the gRPC router's CPU, so the loop is kept.
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, key: K, at: float) -> None:
        """Watch ``key`` until loop time ``at``."""
        self._due[key] = at
        if self._timer is None:
            self._arm()

    def add_in(self, key: K, seconds: float) -> None:
        """Watch ``key`` for ``seconds`` from now."""
        loop = self._loop or self._bind()
        self._due[key] = loop.time() + seconds
        if self._timer is None:
            self._arm()

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _arm(self) -> None:
        self._timer = (self._loop or self._bind()).call_later(SWEEP_S, self._sweep)

    def discard(self, key: K) -> None:
        self._due.pop(key, None)

    def _sweep(self) -> None:
        self._timer = None
        now = (self._loop or self._bind()).time()
        for key in [k for k, at in self._due.items() if at <= now]:
            if self._due.pop(key, None) is not None:  # not discarded by an earlier expire
                self._expire(key)  # which may add keys, and so arm the timer itself
        if self._due and self._timer is None:
            self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
