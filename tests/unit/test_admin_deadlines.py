"""The router's admin API served as `tsfleet route` serves it (admin_site.DeadlineSite): its
deadlines, its connection cap, and bodies read once, within their deadline, by its middleware."""
from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any, Awaitable, Callable

from tsfleet.router.fronts.admin import AdminApi
from tsfleet.router.fronts.admin_site import DeadlineSite
from tsfleet.router.policy.routing import Route, RoutingTable
from tsfleet.router.wire.limits import DEFAULT_LIMITS

LIMITS = replace(DEFAULT_LIMITS, head_timeout_s=0.5, body_timeout_s=0.5, connections=3)
AUTH = b"Authorization: Bearer k\r\n"


def serve(test: Callable[[int, AdminApi], Awaitable[None]]) -> None:
    async def main() -> None:
        api = AdminApi(RoutingTable({"m": Route("m", "1.0", {"1.0": 100.0})}), "k", LIMITS)
        runner = api.connections.runner(api.app)
        await runner.setup()
        site = DeadlineSite(runner, "127.0.0.1", 0, api.connections)
        await site.start()
        try:
            await asyncio.wait_for(test(site.port, api), 20)
        finally:
            await runner.cleanup()

    asyncio.run(main())


async def exchange(port: int, data: bytes, then: bytes = b"", pause: float = 0) -> tuple[bytes, float]:
    """Send ``data`` (then ``then`` after ``pause`` s); what came back until closed, and when."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if then:
        await asyncio.sleep(pause)
        writer.write(then)
    answer = await reader.read()  # to EOF: the server closed
    writer.close()
    return answer, loop.time() - began


def body_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def test_a_body_is_read_once_and_reaches_its_handler() -> None:
    async def test(port: int, api: AdminApi) -> None:
        got: list[float] = []

        async def rotate(grace: float) -> dict[str, Any]:
            got.append(grace)
            return {"inference": "new"}

        api.rotate = rotate
        body = b'{"grace_s": 5}'
        answer, _ = await exchange(port, b"POST /keys/inference HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + AUTH
                                   + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert got == [5.0]  # the grace sent, not the default: the body was there for the handler
        body = b'{"weights": {"1.0": 100}}'
        answer, _ = await exchange(port, b"PUT /routes/m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + AUTH
                                   + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert answer.startswith(b"HTTP/1.1 200 "), answer

    serve(test)


def test_a_slow_head_and_a_slow_body_are_408_and_closed() -> None:
    async def test(port: int, api: AdminApi) -> None:
        (head, head_s), (body, body_s) = await asyncio.gather(
            exchange(port, b"GET /rou", b"t", 0.3),
            exchange(port, b"PUT /routes/m HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 50\r\n\r\n{", b"x", 0.3))
        assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), head
        assert body_of(head)["message"] == "no whole request head within 0.5 s"
        assert 0.45 < head_s < 2
        assert body.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), body
        assert body_of(body)["message"] == "the request body was not received whole within 0.5 s"
        assert 0.45 < body_s < 2.5
        assert not api.connections.live

    serve(test)


def test_connections_past_the_cap_are_503_and_a_compressed_body_is_415() -> None:
    async def test(port: int, api: AdminApi) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        answer, _ = await exchange(port, b"GET /routes HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0)  # let the closes be seen
        while len(api.connections.live) > 0:
            await asyncio.sleep(0.01)
        answer, _ = await exchange(port, b"PUT /routes/m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + AUTH
                                   + b"Content-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc")
        assert answer.startswith(b"HTTP/1.1 415 "), answer
        assert body_of(answer)["message"].startswith("the admin API takes no Content-Encoding (got 'gzip')")

    serve(test)
