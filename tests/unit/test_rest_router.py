"""The REST router's retries over real loopback sockets, against a scripted upstream: a job
TorchServe silently lost (never answered) and a request a dying worker dropped are each
retried once, and the client sees only the answer; a stopping router answers what is under
way. TorchServe itself is in tests/integration/test_router_rest.py."""
from __future__ import annotations

import asyncio
import hashlib
import random
import time

from tests.polling import until
from tsfleet.router.fronts.rest import RestRouter
from tsfleet.router.policy.routing import Route, RoutingTable

DIED = b'{"code": 500, "type": "InternalServerError", "message": "Worker died."}'


class Upstream:
    """Answers each request with its path, unless told to lose or fail the next one."""

    def __init__(self) -> None:
        self.plan: list[str] = []  # "lose", "die" or "slow", for the next requests in turn
        self.paths: list[str] = []
        self.digests: list[str] = []  # of each request body, as it arrived

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), 0)
            self.digests.append(hashlib.sha256(await reader.readexactly(length)).hexdigest())
            path = head.split(b" ")[1].decode()
            self.paths.append(path)
            action = self.plan.pop(0) if self.plan else "answer"
            if action == "lose":
                continue  # as TorchServe with a job its dead worker held: no answer, ever
            if action == "slow":
                await asyncio.sleep(1.0)
            status, body = (b"500 Internal Server Error", DIED) if action == "die" else (b"200 OK", path.encode())
            writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
        writer.close()


async def _post(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST %s HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}" % path.encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    writer.close()
    return int(head[0].split()[1]), headers, body


def run(test) -> None:
    async def main() -> None:
        upstream = Upstream()
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
        table = RoutingTable({"m": Route("m", "1.0", {"1.0": 90.0, "1.1": 10.0})})
        router = RestRouter(table, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", min_attempt_s=0.3)
        port = await router.start("127.0.0.1", 0)
        try:
            await asyncio.wait_for(test(router, port, upstream, table), 20)
        finally:
            await router.stop()
            server.close()

    asyncio.run(main())


def test_a_lost_job_is_retried_after_many_times_the_arm_s_p99() -> None:
    async def test(router: RestRouter, port: int, upstream: Upstream, table: RoutingTable) -> None:
        for _ in range(30):  # enough answers for a p99 (of about a millisecond)
            assert (await _post(port, "/predictions/m/1.0"))[0] == 200
        # The window's figures are a quarter second old at most.
        await until("the attempt timeout down to its floor", lambda: router.policy.attempt_timeout(router.policy.begin("m", "1.0", None)) <= 0.3)
        upstream.plan = ["lose"]
        started = time.monotonic()
        status, headers, body = await _post(port, "/predictions/m/1.0")
        waited = time.monotonic() - started
        assert (status, body, headers["x-model-version"]) == (200, b"/predictions/m/1.0", "1.0")
        assert 0.3 <= waited < 5  # given up on at its deadline, then answered by the retry
        assert table.stats[("m", "1.0")].retries == 1
        assert upstream.paths[-2:] == ["/predictions/m/1.0"] * 2

    run(test)


def test_a_dropped_request_on_the_candidate_is_retried_on_the_baseline() -> None:
    async def test(router: RestRouter, port: int, upstream: Upstream, table: RoutingTable) -> None:
        table.set_weights("m", {"1.0": 50, "1.1": 50})  # round robin starts on the candidate (ties: 1.1)
        upstream.plan = ["die"]
        status, headers, body = await _post(port, "/predictions/m")
        assert (status, body, headers["x-model-version"]) == (200, b"/predictions/m/1.0", "1.0")
        assert upstream.paths == ["/predictions/m/1.1", "/predictions/m/1.0"]
        assert (table.stats[("m", "1.1")].errors, table.stats[("m", "1.0")].retries) == (1, 1)
        following = [await _post(port, "/predictions/m") for _ in range(2)]  # and the split goes on
        assert {(status, headers["x-model-version"]) for status, headers, _ in following} == {(200, "1.0"), (200, "1.1")}

    run(test)


def test_an_image_sized_body_and_the_request_behind_it_arrive_whole() -> None:
    async def test(router: RestRouter, port: int, upstream: Upstream, table: RoutingTable) -> None:
        big = random.Random(7).randbytes(3 * 2**20 + 5)  # copied and written in pieces, not as one message
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /predictions/m/1.0 HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n%s"
                     b"POST /predictions/m/1.1 HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}" % (len(big), big))
        answers = []
        for _ in range(2):
            head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
            length = next(int(line.split(":")[1]) for line in head if line.lower().startswith("content-length"))
            answers.append((head[0].split()[1], await reader.readexactly(length)))
        writer.close()
        assert answers == [("200", b"/predictions/m/1.0"), ("200", b"/predictions/m/1.1")]
        assert upstream.digests == [hashlib.sha256(big).hexdigest(), hashlib.sha256(b"{}").hexdigest()]

    run(test)


def test_a_stopping_router_answers_the_requests_under_way_and_takes_no_more() -> None:
    async def test(router: RestRouter, port: int, upstream: Upstream, table: RoutingTable) -> None:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)  # a keep-alive client
        idle_writer.write(b"POST /predictions/m/1.0 HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}")
        await idle_reader.readuntil(b"/predictions/m/1.0")  # answered; the connection stays open
        upstream.plan = ["slow"]
        under_way = asyncio.create_task(_post(port, "/predictions/m/1.0"))
        await until("the slow request to reach the upstream", lambda: len(upstream.paths) == 2)
        stopping = asyncio.create_task(router.stop(grace_s=5))
        assert await asyncio.wait_for(idle_reader.read(), 1) == b""  # closed at once: nothing under way
        await until("the router to stop listening", lambda: not router.listener.server.is_serving())
        try:
            await asyncio.open_connection("127.0.0.1", port)
            raise AssertionError("a stopping router took a new connection")
        except ConnectionRefusedError:
            pass
        status, headers, body = await under_way
        assert (status, body, headers["connection"]) == (200, b"/predictions/m/1.0", "close")
        await asyncio.wait_for(stopping, 5)
        idle_writer.close()

    run(test)
