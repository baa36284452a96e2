"""Waiting on another process in tests: poll with a deadline, never a fixed sleep."""
from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float = 60, interval: float = 0.05) -> T:
    """``check()``'s first truthy value; fails the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(interval)
    return value


async def until(what: str, check: Callable[[], T], timeout: float = 10, interval: float = 0.01) -> T:
    """As ``wait_for``, inside an event loop: the loop goes on running while it waits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := check()):
        assert loop.time() < deadline, f"{what}: not within {timeout:.0f} s"
        await asyncio.sleep(interval)
    return value
