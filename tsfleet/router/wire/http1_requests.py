"""The requests of the router's REST side, read with no I/O: bytes in (``RequestReader.feed``),
whole requests out (its ``requests`` deque), or an HttpError saying why one is refused.

llhttp parses (httptools: uvicorn's parser, its lenient flags all off). It costs the router
less CPU per request than its own parser did (benchmarks/http1_parsers.py: ~5 us against ~8),
and it is a parser the ecosystem keeps. On top of it the router holds its limits (limits.py)
and its own rules; tests/unit/test_http1_oracle.py lists every way the two verdicts differ:
a head's bytes, header lines and trailers are capped (431); a body over the limit is 413
(its Content-Length at once, a chunked one as its bytes come); ``chunked`` is the only
transfer coding (501); a tab in Transfer-Encoding is 400; HTTP/1.0 and 1.1 only (llhttp takes
a version-less HTTP/0.9 line); methods of letters only; Upgrade is not done (the bytes after
the request are read on as HTTP/1.1), and an Upgrade or CONNECT with a body is 501; ``close``
in Connection wins over ``keep-alive``. A refusal names the problem: llhttp's reason, where
it found it (a control byte by the header it is in, never quoting a value: it may be the
Authorization). One leniency is llhttp's and stays: an RTSP/1.0 or ICE/1.0 request line (its
other protocols) is read as HTTP/1.0, whose framing it has; httptools does not say which it read.
"""
from __future__ import annotations

import re
from collections import deque
from typing import Callable

import httptools

from tsfleet.router.wire.http1_messages import HOP_BY_HOP, MAX_HEAD, MAX_HEADERS, MAX_TRAILERS, HttpError, Request

_LISTS = frozenset({b"transfer-encoding", b"connection"})  # repeated lines are one list (RFC 9110 5.3)
# Method names as llhttp gives them, decoded once; one that is not letters only is refused.
_METHODS = {m: m.decode() for m in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH")}
# A control byte but HTAB, or a CR or LF out of a CRLF pair: what hides a second request
# from a proxy in front of a parser that splits on it (Netty, TorchServe's, reads "\n" as a line end).
_BAD_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
_EXPLAINED = 128 * 1024  # bytes a refusal's whereabouts are looked for in (a few llhttp runs over them)


class _Stop(Exception):
    """Raised in a callback to stop llhttp: a request that closes the connection is whole."""


class RequestReader:
    """One connection's requests: ``feed`` it bytes as they come; each whole request is
    appended to ``requests``. HttpError for a request refused (its ``limit``: the router limit
    it is over, if that is why); after it, or after a request that closes the connection,
    nothing more is read. llhttp consumes every byte fed: the caller holds back what it feeds
    while the requests read pile up (http1.Http1ServerConnection pauses the transport)."""

    __slots__ = ("parser", "requests", "max_body", "max_head", "max_headers", "max_trailers", "open", "head_done",
                 "expect", "stopped", "method", "url", "headers", "forward", "parts", "size", "hops",
                 "feeds", "piece", "began", "head_raw", "in_chunk", "trailers", "trailer_raw", "kept", "kept_size",
                 "done", "base")

    def __init__(self, max_body: int, max_head: int = MAX_HEAD, max_headers: int = MAX_HEADERS,
                 max_trailers: int = MAX_TRAILERS):
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.requests: deque[Request] = deque()
        self.max_body, self.max_head, self.max_headers, self.max_trailers = max_body, max_head, max_headers, max_trailers
        self.open = False  # a request begun (its first byte read), not yet whole
        self.head_done = False  # its head is whole
        self.expect = False  # it asks for a 100 Continue and none of its body came yet
        self.stopped = False  # nothing more is read: a request refused, or one that closes is whole
        self.method, self.url, self.parts = "", b"", []
        self.headers: dict[bytes, bytes] = {}
        self.forward: list[bytes] = []
        self.size = self.hops = self.head_raw = self.trailers = self.trailer_raw = 0
        self.in_chunk = False
        self.feeds = self.piece = self.began = 0  # reads fed; the last one's length; the read a request began in
        # The reads since one that ended between requests (None past _EXPLAINED bytes), and
        # how many requests were whole then (``base``) and are now (``done``): where a refused
        # request begins is found in them, and a head's size while it comes.
        self.kept: list[bytes] | None = []
        self.kept_size = self.done = self.base = 0

    def feed(self, data: bytes) -> None:
        """Read ``data``: whole requests are appended to ``requests``. HttpError for a refused one."""
        if self.stopped:
            return
        self.feeds += 1
        self.piece = len(data)
        size = self.size
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data, exc.args[0])
        except httptools.HttpParserError as exc:
            self._refused(exc, data)
        if self.open:
            self._partial(data, size)
        else:
            if self.kept is None or self.kept:
                self.kept, self.kept_size = [], 0
            self.base = self.done

    def _upgraded(self, data: bytes, at: int) -> None:
        # llhttp stops after a request asking for another protocol (Upgrade, CONNECT): the
        # router speaks none, and reads on as HTTP/1.1 (RFC 9110 7.8).
        while True:
            try:
                self.parser.feed_data(memoryview(data)[at:])  # type: ignore[union-attr]
                return
            except httptools.HttpParserUpgrade as exc:
                at += exc.args[0]
            except httptools.HttpParserError as exc:
                self._refused(exc, data)
                return

    def _refused(self, exc: httptools.HttpParserError, data: bytes) -> None:
        """llhttp stopped: at a request that closes (returns), or refusing one (HttpError)."""
        cause = exc.__context__
        if isinstance(cause, _Stop):
            return
        self.stopped = True
        if isinstance(cause, HttpError):
            raise cause from None
        if isinstance(exc, httptools.HttpParserCallbackError) and cause is not None:
            raise cause  # a fault in the callbacks below: not the client's
        region = None if self.kept is None else b"".join([*self.kept, data])
        raise HttpError(400, explain(region, self.done - self.base, str(exc), self.open and self.head_done)) from None

    def _partial(self, data: bytes, size: int) -> None:
        """A request is still coming after ``data``: the limits on what it holds so far."""
        if self.kept is not None:
            self.kept.append(data)
            self.kept_size += len(data)
            if self.kept_size > _EXPLAINED:
                self.kept = None
        if not self.head_done:
            if self.began != self.feeds:
                self.head_raw += len(data)  # a read all of head
            # Exact where the request is the first since a read that ended between two (a
            # head trickled in, or a single one too large); else the reads all of head.
            held = self.kept_size if self.kept is not None and self.done == self.base else self.head_raw
            if held > self.max_head:
                self._over(431, "request head too large", "head_bytes")
            if len(self.forward) + self.hops > self.max_headers:
                self._over(431, f"more than {self.max_headers} header lines", "header_lines")
        elif self.in_chunk and self.size == size:
            # A read with no chunk data in it after a chunk's size line: the trailers (httptools
            # holds a field not yet whole, whatever its length: what this caps).
            self.trailer_raw += len(data)
            if self.trailer_raw > self.max_trailers:
                self._over(431, f"chunked trailers over {self.max_trailers} bytes", "trailer_bytes")

    def _over(self, status: int, message: str, limit: str) -> None:
        self.stopped = True
        raise HttpError(status, message, limit)

    def close(self) -> None:
        """Let go of llhttp (it holds this reader's callbacks: a cycle)."""
        self.parser, self.stopped = None, True

    # llhttp's callbacks, in the order it calls them. One on_header per header line is
    # inherent; each does what it must and no more: this runs for every proxied request.
    def on_message_begin(self) -> None:
        self.open, self.head_done = True, False
        self.url, self.headers, self.forward, self.parts = b"", {}, [], []
        self.size = self.hops = self.head_raw = 0
        self.began = self.feeds

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            self._trailer(name, value)
            return
        key = name.lower()
        if key in _LISTS:
            self._list(key, value)
            return
        value = value.rstrip(b" \t")  # llhttp strips the white space before a value, not after
        self.headers[key] = value
        if key in HOP_BY_HOP:
            self.hops += 1
        else:
            self.forward.append(name + b": " + value)

    def _list(self, key: bytes, value: bytes) -> None:
        # A tab is how "chunked" is hidden from one parser of two (TE.TE); llhttp skips one
        # before the value and takes one after a coding ("gzip\t, chunked").
        if key == b"transfer-encoding" and 9 in value:
            raise HttpError(400, "a tab in Transfer-Encoding")
        value = value.rstrip(b" \t")
        self.hops += 1
        headers = self.headers
        if key in headers:
            # Repeated lines are one list (RFC 9110 5.3): "x" then "chunked" is a chunked body
            # only to a parser that reads the last line, and "Connection: close" then
            # "Connection: x" closes all the same.
            value = headers[key] + b", " + value
        headers[key] = value

    def _trailer(self, name: bytes, value: bytes) -> None:
        # Trailer fields are never forwarded nor used (RFC 9110 6.5): only their size counts.
        self.trailers += len(name) + len(value) + 4
        if self.trailers > self.max_trailers:
            raise HttpError(431, f"chunked trailers over {self.max_trailers} bytes", "trailer_bytes")

    def on_headers_complete(self) -> None:
        self.head_done = True
        parser, headers = self.parser, self.headers
        raw = parser.get_method()  # type: ignore[union-attr]
        method = _METHODS.get(raw) or _method(raw)
        # llhttp reads HTTP/0.9 (a line with no version), 1.0, 1.1 and 2.0, and keeps only 1.1
        # alive by default: then the version (300 ns a call, a string formatted) is not asked.
        if b"connection" in headers or not parser.should_keep_alive():  # type: ignore[union-attr]
            _version(parser.get_http_version())  # type: ignore[union-attr]
        if len(self.forward) + self.hops > self.max_headers:
            raise HttpError(431, f"more than {self.max_headers} header lines", "header_lines")
        if self.began != self.feeds or self.piece > self.max_head:  # else it came in one read no larger
            self._head_size()
        self.method, self.expect = method, False
        te = headers.get(b"transfer-encoding")
        if te is not None:
            if te.lower() != b"chunked":
                raise HttpError(501, f"Transfer-Encoding {te.decode('latin-1')!r} is not supported")
            self.in_chunk, self.trailers, self.trailer_raw = False, 0, 0
        else:
            cl = headers.get(b"content-length")  # digits only, one of it: llhttp checked
            if cl is None or cl == b"0":
                return
            length = int(cl)
            if length > self.max_body:
                raise HttpError(413, f"body of {length} bytes is over the {self.max_body}-byte limit", "body_bytes")
        # A body comes. llhttp would hand it to the protocol asked for: the router does not switch.
        if (b"upgrade" in headers or method == "CONNECT") and parser.should_upgrade():  # type: ignore[union-attr]
            raise HttpError(501, "an Upgrade or CONNECT request with a body is not supported")
        expect = headers.get(b"expect")
        self.expect = expect is not None and expect.lower() == b"100-continue"

    def _head_size(self) -> None:
        held = len(self.url) + sum(map(len, self.forward)) + 2 * len(self.forward) + \
            sum(len(k) + len(v) + 4 for k, v in self.headers.items() if k in HOP_BY_HOP)
        if held > self.max_head:
            raise HttpError(431, "request head too large", "head_bytes")

    def on_chunk_header(self) -> None:
        self.in_chunk = True

    def on_chunk_complete(self) -> None:
        self.in_chunk, self.trailer_raw = False, 0

    def on_body(self, body: bytes) -> None:
        # Kept as pieces and joined once: an image read by read is not copied again each time.
        self.parts.append(body)
        self.size += len(body)
        self.expect = False
        if self.size > self.max_body:  # a chunked body only: a Content-Length was checked before
            raise HttpError(413, f"body over the {self.max_body}-byte limit", "body_bytes")

    def on_message_complete(self) -> None:
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        keep = self.parser.should_keep_alive()  # type: ignore[union-attr]
        if keep and b"connection" in self.headers:
            # llhttp keeps HTTP/1.0 alive on "keep-alive" beside "close": close wins.
            keep = b"close" not in {token.strip().lower() for token in self.headers[b"connection"].split(b",")}
        self.requests.append(Request(self.method, self.url.decode("latin-1"), self.headers, self.forward, body, keep))
        self.open = self.expect = False
        self.done += 1
        if not keep:
            self.stopped = True
            raise _Stop  # the connection closes after its answer: what follows is never read


def _version(version: str) -> None:
    if version != "1.1" and version != "1.0":
        said = "0.9 or none" if version == "0.9" else version  # llhttp reads a line with none as 0.9
        raise HttpError(400, f"malformed request line: HTTP version {said} (1.1 and 1.0 are served)")


def _method(raw: bytes) -> str:
    if not raw.isalpha():  # llhttp's M-SEARCH
        raise HttpError(400, f"malformed request line: method {raw.decode('latin-1')!r} (letters only)")
    _METHODS[raw] = method = raw.decode()
    return method


# ---------------------------------------------------------------- a refusal, in words
class _Begun:
    """llhttp with one callback: the requests it began."""

    __slots__ = ("begun",)

    def __init__(self) -> None:
        self.begun = 0

    def on_message_begin(self) -> None:
        self.begun += 1


def _run(data: memoryview) -> tuple[int, bool]:
    """(requests begun, refused) of llhttp fed ``data`` from a request's start."""
    seen = _Begun()
    parser = httptools.HttpRequestParser(seen)
    at = 0
    while True:
        try:
            parser.feed_data(data[at:])
            return seen.begun, False
        except httptools.HttpParserUpgrade as exc:
            at += exc.args[0]
        except httptools.HttpParserError:
            return seen.begun, True


def _first(n: int, test: Callable[[int], bool]) -> int | None:
    """The least m in 1..n with test(m) (test holds from there on), or None if test(n) fails."""
    if not test(n):
        return None
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if test(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def explain(region: bytes | None, skip: int, reason: str, in_body: bool = False) -> str:
    """A 400's message for a request llhttp refused for ``reason`` (``in_body``: after its head);
    ``region``: the bytes read since a read that ended between requests (None: not kept),
    holding ``skip`` whole requests and then the refused one. llhttp says what is wrong, not
    where: llhttp is run again over prefixes of ``region`` to find the request's first byte
    and the byte it refused, so the message is the same however the bytes were cut into reads."""
    if region is None or len(region) > _EXPLAINED:
        return f"malformed request: {reason}"
    view = memoryview(region)
    if skip:
        begun = _first(len(region), lambda m: _run(view[:m])[0] > skip)
        if begun is None:
            return f"malformed request: {reason}"
        start = begun - 1
    else:
        start = len(region) - len(region.lstrip(b"\r\n"))  # llhttp skips empty lines before a request
    refused = _first(len(region) - start, lambda m: _run(view[start:start + m])[1])
    if refused is None:
        return f"malformed request: {reason}"
    head = region[start:start + refused]  # the request up to the byte refused, that one included
    if b"\r\n\r\n" in head:  # past the head: a chunked body's framing, or llhttp's PRI (HTTP/2's preface)
        return f"malformed chunked body: {reason} (at {head[-1:]!r})" if in_body else f"malformed request: {reason}"
    # A bare CR is told by the byte after it; one refused itself is refused where it stands.
    bad = _BAD_BYTE.search(head, 0, len(head) - 1 if head.endswith(b"\r") else len(head))
    if bad is not None:
        line = head.rfind(b"\r\n", 0, bad.start())
        # Named, never quoted: the line may be the client's Authorization.
        name = head[line + 2:bad.start()].partition(b":")[0][:40].decode("latin-1")
        where = "the request line" if line < 0 else f"header {name!r}" if name else "a header line with no name"
        return f"control character {bad.group()!r} at byte {bad.start()} of the head, in {where}"
    # Up to the byte refused: llhttp takes any value byte but a control one (above), so what
    # is quoted is a name, the request line or a framing header's value, never a credential.
    line = head.rfind(b"\r\n")
    text = head if line < 0 else head[line + 2:]
    if text == b"\r":  # refused at the head's end, where llhttp checks what it has read
        return f"malformed request head: {reason}"
    shown = text if len(text) <= 60 else text[:40] + b"..." + text[-12:]
    return f"malformed {'request' if line < 0 else 'header'} line {shown!r}: {reason}"
