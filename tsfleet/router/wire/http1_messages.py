"""HTTP/1.1 messages for the router, with no I/O: the request and answer it passes on, an
answer encoded for a client (http1.py), and TorchServe's answers read (upstream.py: a head
split and checked, a body, length or chunked, read out of a growing buffer). Clients'
requests are read by http1_requests.py (llhttp, and the limits a client can hit).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

from tsfleet.router.wire.limits import DEFAULT_LIMITS

# The defaults of fleet.yaml's router.limits (limits.py), which a Listener's connections take.
MAX_HEAD = DEFAULT_LIMITS.head_bytes
MAX_HEADERS = DEFAULT_LIMITS.header_lines  # header lines in one request head (Netty, behind, allows any number)
MAX_TRAILERS = DEFAULT_LIMITS.trailer_bytes  # bytes of a chunked body's trailer section (read, never forwarded)
# A chunk size is hex digits and nothing else: int(x, 16) would also take "0x5", "+5", "-2".
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
# A request body this large (an image) is written apart from its head (upstream.py), not
# copied into one bytes with it.
LARGE_BODY = 64 * 1024
# Headers that describe one hop, not the message: never forwarded in either direction.
HOP_BY_HOP = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                        b"expect", b"te", b"trailer", b"upgrade", b"proxy-connection", b"proxy-authorization"})
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class HttpError(Exception):
    """A request the server cannot read; answered with ``status`` and the connection closed.
    ``limit``: the router limit (limits.py) it is over, if that is why, for its counter."""

    def __init__(self, status: int, message: str, limit: str | None = None):
        super().__init__(message)
        self.status, self.limit = status, limit


@dataclass(slots=True)
class Request:
    method: str
    target: str  # path and query, as sent
    headers: dict[bytes, bytes]  # lower-case name -> value (the last one)
    forward: list[bytes]  # the header lines worth forwarding ("Name: value")
    body: bytes
    keep_alive: bool
    auth: bytes | None = None  # the Authorization sent upstream in place of the router's own key

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: list[bytes]  # "Name: value" lines, hop-by-hop ones left out
    keep_alive: bool = True


# A header line that is not "name: value" with a name of RFC 9110 token characters (no white
# space, no colon, no obs-fold). One search over the whole head instead of checks per line:
# this runs twice per proxied request.
_BAD_LINE = re.compile(rb"\r\n(?![!#$%&'*+\-.^_`|~0-9A-Za-z]+:)")
# A control byte anywhere in the head but HTAB and the CRLF ending each line: a bare LF or CR
# (or a NUL) inside a value or the target is how a request is smuggled past a proxy to a
# parser that splits on it (Netty, TorchServe's frontend, reads "\n" as a line end: one
# client's second request, and its answer handed to the next client on a pooled connection).
_BAD_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
# The same test, fast (this runs twice per proxied call; the search above costs ~10 us a head,
# this ~1.6 us): no control byte but CR, LF and HTAB, and every CR and LF in a CRLF pair.
_CONTROL = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_LINE_CONTROL = _CONTROL + b"\r\n"  # within one line (a chunk's), any CR or LF is a bare one
_LISTS = frozenset({b"transfer-encoding", b"connection"})  # hop-by-hop lists that decide framing


def parse_head(head: bytes) -> tuple[list[bytes], dict[bytes, bytes], list[bytes]]:
    """(first line's parts, headers by lower-case name, forwardable header lines); HttpError
    400 for a head with a byte or a line that is not HTTP/1.1's. Nothing unchecked is forwarded."""
    pairs = head.count(b"\r\n")
    bad = None
    if len(head.translate(None, _CONTROL)) != len(head) or head.count(b"\r") != pairs or head.count(b"\n") != pairs:
        bad = _BAD_BYTE.search(head)  # where, for the message
    if bad is not None:
        start = head.rfind(b"\r\n", 0, bad.start())
        # Named, not quoted: the line may be the client's Authorization.
        where = "the request line" if start < 0 else \
            f"header {head[start + 2:bad.start()].partition(b':')[0][:40].decode('latin-1')!r}"
        raise HttpError(400, f"control character {bad.group()!r} at byte {bad.start()} of the head, in {where}")
    bad = _BAD_LINE.search(head)
    if bad is not None:
        line = head[bad.end():].split(b"\r\n", 1)[0]
        raise HttpError(400, f"malformed header line {line[:60]!r}")
    lines = head.split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    forward: list[bytes] = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key, value = name.lower(), value.strip()
        if key in HOP_BY_HOP:
            if key == b"content-length" and headers.get(key, value) != value:
                raise HttpError(400, "conflicting Content-Length headers")
            elif key in _LISTS:
                # A tab is how "chunked" is hidden from one parser of two (TE.TE).
                if 9 in line and key == b"transfer-encoding":
                    raise HttpError(400, "a tab in Transfer-Encoding")
                # Repeated lines are one list (RFC 9110 5.3), not the last line alone: "x" then
                # "chunked" is a chunked body only to a parser that reads the last, and
                # "Connection: close" then "Connection: x" closes all the same.
                if key in headers:
                    value = headers[key] + b", " + value
        else:
            forward.append(line)
        headers[key] = value
    first = lines[0].split(b" ", 2)
    # Netty splits a request line on tabs as on spaces: "GET /a\tb HTTP/1.1" has another target
    # there. (A status line's third part, its reason phrase, may hold tabs.) 9 is HTAB: an int
    # is looked for with memchr, ten times faster here than b"\t".
    if 9 in head and (9 in first[0] or len(first) > 1 and 9 in first[1]):
        raise HttpError(400, "a tab in the request line")
    return first, headers, forward


def _check_trailers(section: bytes) -> None:
    """A chunked body's trailer lines (``section``: each begins with its CRLF) are held to the
    head's rules, though never forwarded: a bare LF in one would end the message early for a
    parser that splits on it, and what follows would be its next request, unanswered here."""
    bad = _BAD_BYTE.search(section)
    if bad is not None:
        raise HttpError(400, f"control character {bad.group()!r} in the chunked trailers")
    bad = _BAD_LINE.search(section)
    if bad is not None:
        line = section[bad.end():].split(b"\r\n", 1)[0]
        raise HttpError(400, f"malformed trailer line {line[:60]!r}")


def body_mode(headers: dict[bytes, bytes]) -> int | None:
    """Bytes of body to read, or None for a chunked body."""
    te = headers.get(b"transfer-encoding")
    if te is not None:
        if b"content-length" in headers:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if te.lower() != b"chunked":
            raise HttpError(501, f"Transfer-Encoding {te.decode('latin-1')!r} is not supported")
        return None
    cl = headers.get(b"content-length", b"0")
    if not cl.isdigit():
        raise HttpError(400, f"bad Content-Length {cl.decode('latin-1')!r}")
    return int(cl)


class Body:
    """Reads one message body (length or chunked) out of a growing buffer."""

    __slots__ = ("length", "parts", "size", "limit", "trailers")

    def __init__(self, length: int | None, limit: int, trailers: int = MAX_TRAILERS):
        self.length, self.parts, self.size, self.limit, self.trailers = length, [], 0, limit, trailers
        if length is not None and length > limit:
            raise HttpError(413, f"body of {length} bytes is over the {limit}-byte limit", "body_bytes")

    def take(self, buf: bytearray) -> bytes | None:
        """The whole body once it is in ``buf`` (consumed from it) or collected, else None."""
        if self.length is not None:
            if len(buf) < self.length:
                return None
            if self.length < 4096:
                body = bytes(buf[:self.length])
            else:
                with memoryview(buf) as view:  # an image's bytes copied once, not sliced and then copied
                    body = bytes(view[:self.length])
            del buf[:self.length]
            return body
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                del buf[:pos]
                if len(buf) > 4096:
                    raise HttpError(400, "chunk size line too long")
                return None
            line = bytes(buf[pos:eol])
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise HttpError(400, f"bad chunk size {size_text[:20]!r}")
            if 59 in line and len(line.translate(None, _LINE_CONTROL)) != len(line):
                # A bare LF or CR in an extension (after ";", 59) ends the line early for a
                # lenient parser in front: its chunk data would start at another byte than ours.
                bad = next(byte for byte in line if byte in _LINE_CONTROL)
                raise HttpError(400, f"control character {bytes([bad])!r} in a chunk line")
            size = int(size_text, 16)
            if self.size + size > self.limit:  # before its bytes are buffered, not after
                raise HttpError(413, f"body over the {self.limit}-byte limit", "body_bytes")
            if size == 0:
                end = buf.find(b"\r\n\r\n", eol)  # trailers, if any, end with an empty line
                if (end if end >= 0 else len(buf)) - eol > self.trailers:
                    raise HttpError(431, f"chunked trailers over {self.trailers} bytes", "trailer_bytes")
                if end < 0:
                    del buf[:pos]
                    return None
                if end > eol:
                    _check_trailers(bytes(buf[eol:end]))
                del buf[:end + 4]
                return b"".join(self.parts)
            start, stop = eol + 2, eol + 2 + size
            if len(buf) < stop + 2:
                del buf[:pos]
                return None
            if buf[stop:stop + 2] != b"\r\n":
                raise HttpError(400, "chunk not followed by CRLF")
            self.size += size
            self.parts.append(bytes(buf[start:stop]))
            pos = stop + 2


def encode_response(resp: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    reason = REASONS.get(resp.status, b"Unknown")
    lines = [b"HTTP/1.1 %d %s" % (resp.status, reason), *resp.headers,
             b"Content-Length: %d" % len(resp.body)]
    if not keep_alive:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else resp.body)
