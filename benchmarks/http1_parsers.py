#!/usr/bin/env python3
"""CPU per request of reading a proxied REST request, bytes to a Request: the router's own
HTTP/1.1 parser as it was (http1_messages.py driven as http1.py drove it until requests moved
onto llhttp), the router's reader now (http1_requests.RequestReader: httptools, i.e. llhttp,
uvicorn's parser, plus the router's limits and rules), and bare httptools for reference.

    .venv/bin/python -m benchmarks.http1_parsers [--loops 5000] [--repeats 15]

Prints a table of median microseconds per request. The question it answered (the hardening
issue's item 2): would parsing on httptools cost more than 10% of the router's CPU per
proxied REST call (docs/router.md: 0.04-0.07 ms), i.e. more than about 4-7 us over the own parser?
It cost less; "router now" is what the router pays. Rows of one run only are comparable:
this shared box's speed swings from hour to hour.
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from typing import Callable

import httptools

from tsfleet.router.wire.http1_messages import HOP_BY_HOP, MAX_HEAD, MAX_HEADERS, MAX_TRAILERS, Body, HttpError, \
    Request, body_mode, parse_head
from tsfleet.router.wire.http1_requests import RequestReader

BODY = (b'{"text": "The quick brown fox jumps over the lazy dog while the router forwards '
        b'this request.", "top_k": 5}')
ONE = (b"POST /predictions/text-embedder HTTP/1.1\r\nHost: router.internal:8080\r\n"
       b"Content-Type: application/json\r\nAuthorization: Bearer " + b"k" * 40 + b"\r\n"
       b"X-User-Id: user-0042\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
CASES = {"one request": (ONE, 1), "pipelined pair": (ONE + ONE, 2)}


class OwnParser:
    """The router's path from bytes read to a Request before llhttp: Http1ServerConnection._parse
    of http1.py at 6ca2a88, line for line, less its I/O (a small body is read out of the buffer)."""

    def __init__(self, max_body: int = 16 * 2**20) -> None:
        self.buf, self.pending, self.max_body = bytearray(), None, max_body
        self.max_head, self.max_headers, self.max_trailers = MAX_HEAD, MAX_HEADERS, MAX_TRAILERS

    def parse(self) -> Request | None:
        buf = self.buf
        if self.pending is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_head:
                    raise HttpError(431, "request head too large", "head_bytes")
                return None
            if end > self.max_head:
                raise HttpError(431, "request head too large", "head_bytes")
            head = bytes(buf[:end])
            del buf[:end + 4]
            if head.count(b"\r\n") > self.max_headers:
                raise HttpError(431, f"more than {self.max_headers} header lines", "header_lines")
            first, headers, forward = parse_head(head.lstrip(b"\r\n"))
            if len(first) != 3 or first[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not first[0].isalpha():
                raise HttpError(400, f"malformed request line {head[:60]!r}")
            connection = headers.get(b"connection", b"").lower()
            keep = b"close" not in connection if first[2] == b"HTTP/1.1" else b"keep-alive" in connection
            body = Body(body_mode(headers), self.max_body, self.max_trailers)
            self.pending = (first[0], first[1].decode("latin-1"), headers, forward, keep, body)
        method, target, headers, forward, keep, reader = self.pending
        data = reader.take(buf)
        if data is None:
            return None
        self.pending = None
        return Request(method.decode("latin-1"), target, headers, forward, data, keep)


def own_parser() -> Callable[[bytes], int]:
    state = OwnParser()

    def parse(data: bytes) -> int:
        state.buf += data
        n = 0
        while state.parse() is not None:
            n += 1
        return n

    return parse


def router_reader() -> Callable[[bytes], int]:
    """The router's path now (Http1ServerConnection.data_received: RequestReader.feed, no I/O)."""
    reader = RequestReader(16 * 2**20)
    requests = reader.requests

    def parse(data: bytes) -> int:
        reader.feed(data)
        n = len(requests)
        requests.clear()  # as the connection takes them, one by one
        return n

    return parse


class Minimal:
    """What the router needs of a request, collected from llhttp's callbacks."""

    __slots__ = ("parser", "method", "url", "headers", "body", "done")

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.headers, self.body, self.done = b"", [], b"", 0

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done += 1


class RouterShaped(Minimal):
    """As Minimal, plus what http1.py hands on today: headers by lower-case name, the
    forwardable lines as "Name: value", keep-alive, a header-count cap and a Request."""

    __slots__ = ("dict", "forward", "request")

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body, self.dict, self.forward = b"", [], b"", {}, []

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key not in HOP_BY_HOP:
            self.forward.append(name + b": " + value)
        self.dict[key] = value.rstrip(b" \t")  # llhttp keeps trailing white space
        if len(self.dict) > 100:
            raise HttpError(431, "more than 100 header lines")

    def on_message_complete(self) -> None:
        self.done += 1
        self.request = Request(self.parser.get_method().decode("latin-1"), self.url.decode("latin-1"), self.dict,
                               self.forward, self.body, self.parser.should_keep_alive())


def httptools_parser(kind: type[Minimal]) -> Callable[[bytes], int]:
    state = kind()

    def parse(data: bytes) -> int:
        before = state.done
        state.parser.feed_data(data)
        return state.done - before

    return parse


PARSERS: dict[str, Callable[[], Callable[[bytes], int]]] = {
    "own (http1_messages)": own_parser,
    "router now (http1_requests)": router_reader,
    "httptools, minimal callbacks": lambda: httptools_parser(Minimal),
    "httptools, router-shaped Request": lambda: httptools_parser(RouterShaped),
}


def per_request_us(make: Callable[[], Callable[[bytes], int]], data: bytes, requests: int, loops: int,
                   repeats: int) -> list[float]:
    """Microseconds per request, one figure per repeat (the garbage collector off, as timeit)."""
    parse = make()
    assert parse(data) == requests  # the same framing before timing it
    out = []
    for _ in range(repeats):
        gc.disable()
        start = time.perf_counter_ns()
        for _ in range(loops):
            parse(data)
        elapsed = time.perf_counter_ns() - start
        gc.enable()
        out.append(elapsed / loops / requests / 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loops", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    print(f"python {platform.python_version()}, httptools {httptools.__version__}, {platform.machine()}, "
          f"{args.loops} loops x {args.repeats} repeats, median us per request (min-max of repeats)")
    print(f"request: {len(ONE)} bytes ({len(BODY)}-byte JSON body, 5 headers)\n")
    print(f"| {'parser':34} | " + " | ".join(f"{case:>22}" for case in CASES) + " |")
    print(f"|{'-' * 36}|" + "|".join("-" * 24 for _ in CASES) + "|")
    medians: dict[str, list[float]] = {}
    # Repeats interleaved across parsers and cases, so a slow spell of the box hits all alike.
    results: dict[str, dict[str, list[float]]] = {name: {case: [] for case in CASES} for name in PARSERS}
    for _ in range(args.repeats):
        for case, (data, n) in CASES.items():
            for name, make in PARSERS.items():
                results[name][case] += per_request_us(make, data, n, args.loops, 1)
    for name, by_case in results.items():
        medians[name] = [statistics.median(v) for v in by_case.values()]
        cells = [f"{statistics.median(v):6.2f} ({min(v):.2f}-{max(v):.2f})" for v in by_case.values()]
        print(f"| {name:34} | " + " | ".join(f"{c:>22}" for c in cells) + " |")
    own = medians["own (http1_messages)"]
    print()
    for name in list(PARSERS)[1:]:
        extra = ", ".join(f"{m - o:+.2f} us ({case})" for m, o, case in zip(medians[name], own, CASES))
        print(f"{name} vs own: {extra}")
    print("10% of the router's CPU per proxied REST call (docs/router.md: 40-70 us) is 4-7 us.")


if __name__ == "__main__":
    main()
