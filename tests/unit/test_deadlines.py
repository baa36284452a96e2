"""The shared deadline sweep of the router's upstream pools (tsfleet/router/wire/deadlines.py)."""
from __future__ import annotations

import asyncio

from tests.polling import until
from tsfleet.router.wire.deadlines import Deadlines


def test_each_key_expires_once_after_its_time_and_a_discarded_one_never() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        expired: list[str] = []

        def expire(key: str) -> None:
            expired.append(key)
            if key == "a":  # an expiry that starts another watch (a retry) re-arms the sweep
                deadlines.add("retry", loop.time() + 0.1)

        deadlines: Deadlines[str] = Deadlines(expire)
        now = loop.time()
        deadlines.add("a", now + 0.1)
        deadlines.add("b", now + 0.1)
        deadlines.add("later", now + 60)
        deadlines.discard("b")
        await until("the retry's deadline", lambda: "retry" in expired)
        assert expired == ["a", "retry"]  # b was discarded; later is not due
        deadlines.close()

    asyncio.run(main())


def test_a_watch_for_some_seconds_from_now_expires_after_them_and_not_before() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        expired: dict[str, float] = {}
        deadlines: Deadlines[str] = Deadlines(lambda key: expired.setdefault(key, loop.time()))
        start = loop.time()
        deadlines.add_in("soon", 0.1)
        deadlines.add_in("later", 60)
        await until("the watch's deadline", lambda: "soon" in expired)
        assert expired["soon"] - start >= 0.1
        assert "later" not in expired
        deadlines.close()

    asyncio.run(main())
