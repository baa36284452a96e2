"""The router's small HTTP/1.1 server and upstream pool, over real loopback sockets."""
from __future__ import annotations

import asyncio
import json
from typing import Awaitable, Callable

import pytest

from tests.polling import until
from tests.wire import Wire
from tsfleet.router.wire.http1 import Listener, Request, Response, Http1ServerConnection
from tsfleet.router.wire.upstream import UpstreamError, RestUpstreamPool


async def echo(request: Request) -> Response:
    doc = {"method": request.method, "target": request.target, "body": request.body.decode(),
           "forward": [line.decode() for line in request.forward]}
    return Response(200, json.dumps(doc).encode(), [b"Content-Type: application/json"])


def run(test: Callable[[int], Awaitable[None]], handler=echo, idle_timeout: float = 75.0, fast=None) -> None:
    async def main() -> None:
        listener = Listener(handler, max_body=1000, idle_timeout=idle_timeout, fast=fast)
        port = await listener.start("127.0.0.1", 0)
        try:
            await asyncio.wait_for(test(port), 10)
        finally:
            listener.close()

    asyncio.run(main())


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(lines[0].split()[1]), headers, body


def test_a_body_in_pieces_and_pipelined_requests_are_answered_in_order() -> None:
    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /predictions/m?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-User-Id: u1\r\n\r\nhe")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"llo" + b"GET /ping HTTP/1.1\r\nHost: a\r\n\r\n")
        first = await read_answer(reader)
        second = await read_answer(reader)
        doc = json.loads(first[2])
        assert first[0] == 200 and doc["body"] == "hello" and doc["target"] == "/predictions/m?x=1"
        assert doc["forward"] == ["X-User-Id: u1"]  # Host and Content-Length are per hop
        assert json.loads(second[2])["target"] == "/ping"
        writer.close()

    run(test)


def test_chunked_body_and_expect_100_continue() -> None:
    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        status, _, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["body"] == "abcde"
        writer.close()

    run(test)


def test_a_chunked_body_with_small_trailers_and_upper_case_sizes_is_read() -> None:
    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\nX-T: y\r\n\r\n")
        status, _, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["body"] == "0123456789"
        writer.close()

    run(test)


@pytest.mark.parametrize("raw, status, words", [
    (b"POST /p HTTP/1.1\r\nbad header line\r\n\r\n", 400, "malformed header"),
    (b"POST /p HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", 400,
     "Transfer-Encoding can't be present with Content-Length"),
    (b"POST /p HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413, "limit"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "gzip"),
    (b"POST /p HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "chunk size"),
    (b"NOT A REQUEST\r\n\r\n", 400, "malformed request line b'NOT ': Invalid method encountered"),
    # Smuggling: a byte a downstream parser (Netty) reads as a line end or terminator is never
    # forwarded; nor a header name outside RFC 9110's token characters, nor an obs-fold.
    (b"POST /p HTTP/1.1\r\nX-A: b\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", 400,
     "control character b'\\n' at byte 24 of the head, in header 'X-A'"),
    (b"POST /p HTTP/1.1\r\nX-A: b\rTransfer-Encoding: chunked\r\n\r\n", 400, "control character b'\\r'"),
    (b"POST /p HTTP/1.1\r\nX-A: b\x00c\r\n\r\n", 400, "control character b'\\x00'"),
    (b"POST /p HTTP/1.1\r\nX-A: b\x0bc\r\n\r\n", 400, "control character b'\\x0b'"),
    (b"POST /p HTTP/1.1\r\nX-A: b\x7f\r\n\r\n", 400, "control character b'\\x7f'"),
    (b"POST /p\nX HTTP/1.1\r\n\r\n", 400, "control character b'\\n' at byte 7 of the head, in the request line"),
    (b"POST /p HTTP/1.1\r\nAuthorization: Bearer s3cret\x00\r\n\r\n", 400, "in header 'Authorization'"),
    (b"POST /p HTTP/1.1\r\nX-A\n: b\r\n\r\n", 400, "control character"),
    # llhttp's reason, and the line quoted up to the byte it refused (a name: values are
    # refused for control bytes only, which are named, not quoted).
    (b"POST /p HTTP/1.1\r\nX A: b\r\n\r\n", 400, "malformed header line b'X ': Invalid header token"),
    (b"POST /p HTTP/1.1\r\nX-A : b\r\n\r\n", 400, "malformed header line"),
    (b"POST /p HTTP/1.1\r\nX(A): b\r\n\r\n", 400, "malformed header line"),
    (b"POST /p HTTP/1.1\r\nX-\xc3\xa9: b\r\n\r\n", 400, "malformed header line"),
    (b"POST /p HTTP/1.1\r\nX-A: b\r\n folded\r\n\r\n", 400,
     "malformed header line b' ': Unexpected whitespace after header value"),
    (b"POST /p HTTP/1.1\r\nAuthorization Bearer s3cret\r\n\r\n", 400, "malformed header line b'Authorization '"),
    (b"POST /p HTTP/1.1 junk\r\n\r\n", 400, "request line"),
    (b"POST /p HTTP/2.0\r\n\r\n", 400, "malformed request line: HTTP version 2.0"),
    # llhttp reads a line with no version as HTTP/0.9; the router serves 1.0 and 1.1 only.
    (b"GET /p\r\n\r\n", 400, "malformed request line: HTTP version 0.9 or none"),
    (b"M-SEARCH * HTTP/1.1\r\n\r\n", 400, "method 'M-SEARCH' (letters only)"),
    # Chunk sizes are hex digits only: a negative one would lower the count behind the 413.
    # Nor white space after them (llhttp, rightly: RFC 9112 7.1 allows it only before a ";").
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nabcde\r\n0\r\n\r\n", 400,
     "malformed chunked body: Invalid character in chunk size (at b'x')"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nabcde\r\n0\r\n\r\n", 400, "chunk size (at b'+')"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nab\r\n0\r\n\r\n", 400, "chunk size (at b'-')"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5_0\r\n", 400, "chunk size (at b'_')"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nA \r\n0123456789\r\n0\r\n\r\n", 400,
     "Invalid character in chunk size (at b' ')"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X-T: y\r\n" * 1200 + b"\r\n", 431, "trailers"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X-T: y\r\n" * 1200, 431, "trailers"),
    (b"POST /p HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "more than 100 header lines"),
    # Found by the differential test against llhttp (test_http1_oracle.py). Repeated
    # Transfer-Encoding lines are one list, not the last line; a tab hides "chunked" (TE.TE).
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501,
     "Transfer-Encoding 'x, chunked' is not supported"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
     "Invalid `Transfer-Encoding` header value"),  # llhttp: nothing may follow "chunked"
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n", 400, "a tab in Transfer-Encoding"),
    # Netty splits a request line on a tab: its target would not be the one routed here.
    (b"GET /predictions/m\tHTTP/1.1 HTTP/1.1\r\n\r\n", 400,
     "malformed request line b'GET /predictions/m\\t': Invalid characters in url"),
    # A bare LF in a chunk extension or a trailer ends the line early for a lenient parser in
    # front: the bytes after it were read as the chunk's data, or as trailers hiding a request.
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nXXXXX\r\nabcde\r\n0\r\n\r\n", 400,
     "malformed chunked body: Missing expected CR after chunk extension name (at b'\\n')"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;a\x00\r\nabcde\r\n0\r\n\r\n", 400,
     "(at b'\\x00')"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\n\nGET /s HTTP/1.1\r\n\r\n", 400,
     "malformed chunked body: Missing expected CR after header value (at b'\\n')"),
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T : y\r\n\r\n", 400,
     "malformed chunked body: Invalid header token"),
    # A chunked body over the limit is refused as its bytes come, not once it is all read.
    (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFF\r\n" + b"a" * 1001, 413,
     "body over the 1000-byte limit"),
    (b"POST /p HTTP/1.1\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n", 431, "head too large"),
])
def test_unreadable_requests_get_a_4xx_naming_the_problem_and_the_connection_closes(raw: bytes, status: int,
                                                                                    words: str) -> None:
    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        got, headers, body = await read_answer(reader)
        doc = json.loads(body)
        assert got == status == doc["code"] and words in doc["message"]
        assert "s3cret" not in doc["message"]  # a credential is never quoted back
        assert doc["type"] in ("BadRequest", "RequestEntityTooLarge", "NotImplemented", "RequestHeaderFieldsTooLarge")
        assert headers["connection"] == "close" and await reader.read() == b""

    run(test)


def test_a_close_in_any_connection_line_closes_and_the_request_behind_is_not_read() -> None:
    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\nConnection: close\r\nConnection: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
        status, headers, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["target"] == "/a" and headers["connection"] == "close"
        assert await reader.read() == b""

    run(test)


@pytest.mark.parametrize("raw, closes", [
    (b"GET /a HTTP/1.1\r\nConnection: xclose\r\n\r\n", False),  # tokens, not substrings
    (b"GET /a HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n", True),
    (b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),
    (b"GET /a HTTP/1.0\r\nConnection: keep-alive-x\r\n\r\n", True),
    (b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", True),  # close wins
])
def test_keep_alive_follows_the_connection_tokens(raw: bytes, closes: bool) -> None:
    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw + b"GET /b HTTP/1.1\r\n\r\n")
        status, headers, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["target"] == "/a"
        assert (headers.get("connection") == "close") is closes
        if closes:
            assert await reader.read() == b""
        else:
            assert json.loads((await read_answer(reader))[2])["target"] == "/b"
        writer.close()

    run(test)


def test_a_refused_request_behind_one_being_answered_is_answered_after_it() -> None:
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        await release.wait()
        return await echo(request)

    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /first HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\nX-A: b\x00\r\n\r\n")
        await asyncio.sleep(0.05)
        release.set()
        first = await read_answer(reader)
        assert first[0] == 200 and json.loads(first[2])["target"] == "/first"
        status, headers, body = await read_answer(reader)
        assert status == 400 and "in header 'X-A'" in json.loads(body)["message"]
        assert headers["connection"] == "close" and await reader.read() == b""

    run(test, slow)


def test_an_upgrade_is_not_done_and_one_with_a_body_is_refused() -> None:
    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
        assert json.loads((await read_answer(reader))[2])["target"] == "/a"
        assert json.loads((await read_answer(reader))[2])["target"] == "/b"  # read on as HTTP/1.1
        writer.write(b"POST /c HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\nContent-Length: 3\r\n\r\nabc")
        status, _, body = await read_answer(reader)
        assert status == 501 and "Upgrade or CONNECT request with a body" in json.loads(body)["message"]

    run(test)


def test_100_continue_waits_for_the_answers_before_it() -> None:
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        if request.target == "/first":
            await release.wait()
        return await echo(request)

    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /first HTTP/1.1\r\n\r\nPOST /p HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        await asyncio.sleep(0.05)
        release.set()
        assert (await read_answer(reader))[0] == 200  # the first answer, not a 100 in front of it
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        status, _, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["body"] == "ok"
        writer.close()

    run(test, slow)


def test_thousands_of_pipelined_requests_answered_at_once_are_answered_in_order() -> None:
    """A fast hook that replies from inside the call goes on in a loop, not a deeper call each."""
    answered: list[str] = []

    def fast(request: Request, reply: Callable[[Request, Response], None]) -> bool:
        answered.append(request.target)
        reply(request, Response(200, b"", []))
        return True

    async def main() -> Wire:
        conn = Http1ServerConnection(echo, 1000, set(), fast=fast)
        wire = Wire()
        conn.connection_made(wire)  # type: ignore[arg-type]
        conn.data_received(b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % i for i in range(5000)))
        return wire

    wire = asyncio.run(main())
    assert answered == ["/%d" % i for i in range(5000)]
    assert wire.written.count(b"HTTP/1.1 200 OK") == 5000 and not wire.closed


def test_header_values_keep_their_tabs_and_non_ascii_bytes() -> None:
    async def lines(request: Request) -> Response:
        return Response(200, b"\n".join(request.forward), [])

    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /p HTTP/1.1\r\nX-A: a\tb \xe9\r\nX-B: !#$%&'*+-.^_`|~\r\nContent-Length: 0\r\n\r\n")
        status, _, body = await read_answer(reader)
        assert status == 200 and body == b"X-A: a\tb \xe9\nX-B: !#$%&'*+-.^_`|~"
        writer.close()

    run(test, handler=lines)


def test_a_handler_error_is_a_500_and_the_connection_keeps_serving() -> None:
    calls = []

    async def flaky(request: Request) -> Response:
        calls.append(request.target)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return await echo(request)

    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(b"GET /x HTTP/1.1\r\n\r\n")
        assert (await read_answer(reader))[0] == 500
        assert (await read_answer(reader))[0] == 200
        writer.close()

    run(test, flaky)


def test_a_fast_hook_answers_later_and_once_and_a_failing_one_is_a_500() -> None:
    def fast(request: Request, reply: Callable[[Request, Response], None]) -> bool:
        if request.target == "/boom":
            raise RuntimeError("boom")
        if request.target != "/fast":
            return False  # left to the async handler
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, reply, request, Response(200, b"fast", []))
        loop.call_later(0.1, reply, request, Response(200, b"again", []))  # must not reach the client
        return True

    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /fast HTTP/1.1\r\n\r\nGET /boom HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
        assert (await read_answer(reader))[::2] == (200, b"fast")
        assert (await read_answer(reader))[0] == 500
        assert json.loads((await read_answer(reader))[2])["target"] == "/x"
        writer.write(b"GET /fast HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\n\r\n")
        assert (await read_answer(reader))[::2] == (200, b"fast")
        assert json.loads((await read_answer(reader))[2])["target"] == "/y"  # not the second reply
        writer.close()

    run(test, fast=fast)


def test_a_connection_idle_past_the_timeout_is_closed_but_a_busy_one_is_not() -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(1.0)
        return await echo(request)

    async def test(port: int) -> None:
        idle_reader, _ = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
        assert (await read_answer(reader))[0] == 200  # a request longer than the idle timeout
        assert await asyncio.wait_for(idle_reader.read(), 3) == b""  # closed by the server

    run(test, slow, idle_timeout=0.4)


class Upstream:
    """A raw-socket server that answers each request with the next scripted bytes."""

    def __init__(self, answers: list[bytes], close_after: bool = False):
        self.answers, self.close_after, self.connections = answers, close_after, 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while self.answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), 0)
            await reader.readexactly(length)
            answer = self.answers.pop(0)
            if answer:
                writer.write(answer)
                await writer.drain()
            if self.close_after or not answer:
                break
        writer.close()


def pool_test(upstream: Upstream, test: Callable[[RestUpstreamPool], Awaitable[None]]) -> None:
    async def main() -> None:
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
        pool = RestUpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            await asyncio.wait_for(test(pool), 10)
        finally:
            pool.close()
            server.close()

    asyncio.run(main())


def test_pool_reads_length_chunked_and_until_close_answers_and_reuses_connections() -> None:
    upstream = Upstream([
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nrest of it",
    ])

    async def test(pool: RestUpstreamPool) -> None:
        first = await pool.request("POST", "/a", [], b"xyz")
        assert (first.status, first.body, first.headers) == (200, b"ok", [b"X-A: 1"])
        assert [conn.message for conn in pool._idle] == [b""]  # a kept connection holds no old request
        assert (await pool.request("GET", "/b", [], b"")).body == b"{}abc"
        last = await pool.request("GET", "/c", [], b"")
        assert (last.status, last.body, last.keep_alive) == (404, b"rest of it", False)

    pool_test(upstream, test)
    assert upstream.connections == 1


def test_pool_reconnects_when_an_idle_connection_was_closed_but_fails_a_refused_one() -> None:
    upstream = Upstream([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
                         b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"], close_after=True)

    async def test(pool: RestUpstreamPool) -> None:
        assert (await pool.request("GET", "/", [], b"")).body == b"a"
        await until("the upstream closing the kept connection", lambda: pool._idle and pool._idle[0].closed)
        assert (await pool.request("GET", "/", [], b"")).body == b"b"
        pool.port = 1
        with pytest.raises(UpstreamError, match="cannot connect"):
            await pool.request("GET", "/", [], b"")

    pool_test(upstream, test)
    assert upstream.connections == 2


def test_pool_gives_up_after_the_timeout_and_a_dropped_request_is_an_error() -> None:
    async def test(pool: RestUpstreamPool) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await pool.request("GET", "/slow", [], b"", timeout=0.2)
        with pytest.raises(UpstreamError, match="closed"):
            await pool.request("GET", "/dropped", [], b"")

    async def slow_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/slow" in head:
            await asyncio.sleep(1)
        writer.close()

    upstream = Upstream([])
    upstream.handle = slow_then_drop  # type: ignore[method-assign]
    pool_test(upstream, test)


def test_pool_answers_only_from_the_loop_and_keeps_a_connection_whose_waiter_gave_up() -> None:
    release = asyncio.Event()
    connections = []

    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        for n, body in enumerate((b"a", b"b", b"c")):
            await reader.readuntil(b"\r\n\r\n")
            if n == 2:
                await release.wait()  # the third answer comes only after its waiter gave up
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + body)
        await reader.read()

    async def test(pool: RestUpstreamPool) -> None:
        assert (await pool.request("GET", "/", [], b"")).body == b"a"  # one kept connection now
        got: list[bytes] = []
        done = asyncio.Event()

        def on_done(resp: Response | None, exc: BaseException | None) -> None:
            got.append(resp.body if resp else repr(exc).encode())
            done.set()

        pool.start("GET", "/", [], b"", 5, on_done)
        assert got == []  # never from inside start(), even on a kept connection
        await done.wait()
        assert got == [b"b"]
        waiter = asyncio.ensure_future(pool.request("GET", "/", [], b""))
        await until("the call under way on the kept connection", lambda: not pool._idle)
        waiter.cancel()
        release.set()
        await until("the connection answered and free again", lambda: pool._idle)

    upstream = Upstream([])
    upstream.handle = answers  # type: ignore[method-assign]
    pool_test(upstream, test)
    assert len(connections) == 1



@pytest.mark.parametrize("cuts", [(100, 70_000, 200_000), (5, 64 * 1024 + 60, 307_300), (307_300, 1), (1,)])
def test_a_large_body_read_in_any_pieces_arrives_whole_with_the_request_behind_it(cuts: tuple[int, ...]) -> None:
    """A large body still coming is kept as read and joined once (not appended to the buffer
    read by read); the bytes after it, in the same read, are the next request's."""
    body = bytes(range(251)) * 1200  # 301,200 bytes, no two neighbouring pieces alike
    data = (b"POST /predictions/m HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            + b"POST /predictions/m HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok")
    seen: list[bytes] = []

    async def main() -> None:
        def fast(request: Request, reply: Callable[[Request, Response], None]) -> bool:
            seen.append(request.body)
            reply(request, Response(200, b"", []))
            return True

        conn = Http1ServerConnection(echo, 1 << 20, set(), fast=fast)
        conn.connection_made(Wire())  # type: ignore[arg-type]
        pos = 0
        for cut in cuts:
            conn.data_received(data[pos:pos + cut])
            pos += cut
        while pos < len(data):  # the rest in 50,000-byte reads
            conn.data_received(data[pos:pos + 50_000])
            pos += 50_000

    asyncio.run(main())
    assert seen == [body, b"ok"]


def listener_test(test: Callable[[Listener, int], Awaitable[None]], handler=echo, **limits) -> None:
    async def main() -> None:
        listener = Listener(handler, **{"max_body": 1 << 20, **limits})
        port = await listener.start("127.0.0.1", 0)
        try:
            await asyncio.wait_for(test(listener, port), 20)
        finally:
            listener.close()

    asyncio.run(main())


def test_a_request_trickled_in_is_answered_408_at_its_deadline() -> None:
    async def test(listener: Listener, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = asyncio.get_running_loop().time()
        head = b"POST /p HTTP/1.1\r\nX-Slow: " + b"a" * 100

        async def trickle() -> None:  # a byte every 20 ms: never idle, never whole
            for i in range(len(head)):
                writer.write(head[i:i + 1])
                await asyncio.sleep(0.02)

        sending = asyncio.get_running_loop().create_task(trickle())
        status, headers, body = await read_answer(reader)
        assert status == 408 and "within 0.5 s" in json.loads(body)["message"]
        assert headers["connection"] == "close"
        assert asyncio.get_running_loop().time() - started < 1.5  # not the idle timer's 75 s
        sending.cancel()

    listener_test(test, read_timeout=0.5)


def test_requests_pipelined_behind_a_slow_answer_wait_in_the_kernel_not_the_router() -> None:
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        if request.target == "/first":
            await release.wait()
        return Response(200, request.target.encode(), [])

    async def test(listener: Listener, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"x" * (512 * 1024)
        behind = [b"POST /p%d HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (i, len(body)) + body for i in range(8)]
        writer.write(b"GET /first HTTP/1.1\r\n\r\n" + b"".join(behind))  # 4 MiB behind a request not yet answered
        await until("reading paused", lambda: any(c.paused for c in listener.connections))
        conn = next(iter(listener.connections))
        assert conn.backlog() < 1 << 20, conn.backlog()  # what llhttp has read of them, held here
        release.set()
        answers = [await read_answer(reader) for _ in range(9)]
        assert [a[2] for a in answers] == [b"/first"] + [b"/p%d" % i for i in range(8)]
        writer.close()

    listener_test(test, handler=slow)


def test_connections_past_the_cap_are_answered_503_and_the_others_served() -> None:
    async def test(listener: Listener, port: int) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await until("both connections registered", lambda: len(listener.connections) == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, headers, body = await read_answer(reader)
        assert status == 503 and "too many connections" in json.loads(body)["message"]
        assert await reader.read() == b""
        r, w = held[0]
        w.write(b"GET /still HTTP/1.1\r\n\r\n")
        assert (await read_answer(r))[0] == 200
        for _, w in held:
            w.close()

    listener_test(test, max_connections=2)
