"""Request bytes for the HTTP/1.1 parser's differential test (test_http1_oracle.py): every
hostile case of test_http1.py and test_router_hostile_peers.py, the classic smuggling set,
and the valid requests the router serves. Names say what each case is; none says its verdict
(the oracle, httptools, does)."""
from __future__ import annotations

KEY = "k" * 40  # a Bearer key of the length the router issues
DOC = b'{"text": "cancel my plan"}'
TE = b"Transfer-Encoding: chunked\r\n"


def post(headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1", target: bytes = b"/p") -> bytes:
    """A POST with ``headers`` (each line ending in CRLF) and ``body`` as sent."""
    return b"POST " + target + b" " + version + b"\r\nHost: a\r\n" + headers + b"\r\n" + body


def chunked(body: bytes, extra: bytes = b"") -> bytes:
    """A chunked POST whose body (chunk lines and data) is sent as given."""
    return post(TE + extra, body)


def smuggling(separator: bytes) -> bytes:
    """test_router_hostile_peers.smuggling: an X-A value hiding a Transfer-Encoding header,
    whose body, read as chunked, ends at once and leaves a second request behind."""
    hidden = (b"POST /predictions/intent-classifier HTTP/1.1\r\nHost: ts\r\nAuthorization: Bearer " + KEY.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(DOC) + DOC)
    body = b"0\r\n\r\n" + hidden
    return (b"POST /predictions/text-embedder HTTP/1.1\r\nHost: router\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nX-A: b" + separator + b"Transfer-Encoding: chunked\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


# test_http1.py's unreadable requests, in its order.
TEST_HTTP1_REFUSED = {
    "bad header line": b"POST /p HTTP/1.1\r\nbad header line\r\n\r\n",
    "CL then TE": b"POST /p HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    "CL over the body limit": b"POST /p HTTP/1.1\r\nContent-Length: 5000\r\n\r\n",
    "TE gzip": b"POST /p HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    "CL -1": b"POST /p HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    "chunk size zz": b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "not a request": b"NOT A REQUEST\r\n\r\n",
    "LF hides TE": b"POST /p HTTP/1.1\r\nX-A: b\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
    "CR hides TE": b"POST /p HTTP/1.1\r\nX-A: b\rTransfer-Encoding: chunked\r\n\r\n",
    "NUL in value": b"POST /p HTTP/1.1\r\nX-A: b\x00c\r\n\r\n",
    "VT in value": b"POST /p HTTP/1.1\r\nX-A: b\x0bc\r\n\r\n",
    "DEL in value": b"POST /p HTTP/1.1\r\nX-A: b\x7f\r\n\r\n",
    "LF in target": b"POST /p\nX HTTP/1.1\r\n\r\n",
    "NUL in Authorization": b"POST /p HTTP/1.1\r\nAuthorization: Bearer s3cret\x00\r\n\r\n",
    "LF in name": b"POST /p HTTP/1.1\r\nX-A\n: b\r\n\r\n",
    "space in name": b"POST /p HTTP/1.1\r\nX A: b\r\n\r\n",
    "space before colon": b"POST /p HTTP/1.1\r\nX-A : b\r\n\r\n",
    "parens in name": b"POST /p HTTP/1.1\r\nX(A): b\r\n\r\n",
    "UTF-8 in name": b"POST /p HTTP/1.1\r\nX-\xc3\xa9: b\r\n\r\n",
    "obs-fold": b"POST /p HTTP/1.1\r\nX-A: b\r\n folded\r\n\r\n",
    "Authorization without a colon": b"POST /p HTTP/1.1\r\nAuthorization Bearer s3cret\r\n\r\n",
    "junk after version": b"POST /p HTTP/1.1 junk\r\n\r\n",
    "HTTP/2.0": b"POST /p HTTP/2.0\r\n\r\n",
    "no version, GET /p": b"GET /p\r\n\r\n",
    "chunk size 0x5": chunked(b"0x5\r\nabcde\r\n0\r\n\r\n"),
    "chunk size +5": chunked(b"+5\r\nabcde\r\n0\r\n\r\n"),
    "chunk size -2": chunked(b"-2\r\nab\r\n0\r\n\r\n"),
    "chunk size 5_0": chunked(b"5_0\r\n"),
    "chunk size with a space after": chunked(b"A \r\n0123456789\r\n0\r\n\r\n"),
    "trailers over the cap": chunked(b"0\r\n" + b"X-T: y\r\n" * 1200 + b"\r\n"),
    "trailers over the cap, unended": chunked(b"0\r\n" + b"X-T: y\r\n" * 1200),
    "101 header lines": b"POST /p HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
    "head over 64 KiB": b"POST /p HTTP/1.1\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n",
}

# test_http1.py's requests that are served, and test_router_hostile_peers.py's smuggling.
TEST_HTTP1_SERVED = {
    "body in pieces, pipelined GET": b"POST /predictions/m?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                                     b"X-User-Id: u1\r\n\r\nhello" b"GET /ping HTTP/1.1\r\nHost: a\r\n\r\n",
    "chunked, 100-continue, extension": b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue"
                                        b"\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    "chunked, trailer, upper-case size": chunked(b"A\r\n0123456789\r\n0\r\nX-T: y\r\n\r\n"),
    "tabs and obs-text in values": b"POST /p HTTP/1.1\r\nX-A: a\tb \xe9\r\nX-B: !#$%&'*+-.^_`|~\r\n"
                                   b"Content-Length: 0\r\n\r\n",
    "two GETs": b"GET /x HTTP/1.1\r\n\r\n" * 2,
    "three GETs": b"GET /fast HTTP/1.1\r\n\r\nGET /boom HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
    "large body, request behind": b"POST /predictions/m HTTP/1.1\r\nHost: a\r\nContent-Length: 301200\r\n\r\n"
                                  + bytes(range(251)) * 1200 + b"POST /predictions/m HTTP/1.1\r\nHost: a\r\n"
                                  b"Content-Length: 2\r\n\r\nok",
    "head trickling in": b"POST /p HTTP/1.1\r\nX-Slow: " + b"a" * 100,
    "pipelined behind a slow answer": b"GET /first HTTP/1.1\r\n\r\n" + b"".join(
        b"POST /p%d HTTP/1.1\r\nContent-Length: 70000\r\n\r\n" % i + b"x" * 70_000 for i in range(2)),
    "hostile peers: LF hides TE": smuggling(b"\n"),
    "hostile peers: CR hides TE": smuggling(b"\r"),
    "hostile peers: NUL hides TE": smuggling(b"\x00"),
}

# The classic smuggling set, and the framing corners around it.
CLASSIC = {
    "TE then CL": post(TE + b"Content-Length: 3\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    "two equal CLs": post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"),
    "two equal CLs, names' case differs": post(b"Content-Length: 3\r\ncontent-length: 3\r\n", b"abc"),
    "two different CLs": post(b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abcd"),
    "CLs 3 and 03": post(b"Content-Length: 3\r\nContent-Length: 03\r\n", b"abc"),
    "CL 3, 3": post(b"Content-Length: 3, 3\r\n", b"abc"),
    "CL +3": post(b"Content-Length: +3\r\n", b"abc"),
    "CL 0x3": post(b"Content-Length: 0x3\r\n", b"abc"),
    "CL empty": post(b"Content-Length: \r\n", b"abc"),
    "CL 3 3": post(b"Content-Length: 3 3\r\n", b"abc"),
    "CL Arabic-Indic digit": post(b"Content-Length: \xd9\xa3\r\n", b"abc"),
    "CL with tabs around": post(b"Content-Length:\t3\t\r\n", b"abc"),
    "CL with leading zeros": post(b"Content-Length: 00003\r\n", b"abc"),
    "CL overflowing 64 bits": post(b"Content-Length: 99999999999999999999999\r\n", b"abc"),
    "CL over 16 MiB": post(b"Content-Length: %d\r\n" % (16 * 2**20 + 1), b"abc"),
    "TE chunked, identity": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b"chunked, identity"),
    "TE identity, chunked": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b"identity, chunked"),
    "TE gzip, chunked": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b"gzip, chunked"),
    "TE xchunked": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b"xchunked"),
    "TE Chunked": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b"Chunked"),
    "TE chunked,": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b"chunked,"),
    "TE ,chunked": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b",chunked"),
    "TE with a tab before": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b": chunked", b":\tchunked"),
    "TE with a tab after": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b"chunked\t"),
    "TE gzip, a tab, chunked": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b"gzip\t, chunked"),
    "TE with spaces around": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b"   chunked   "),
    "TE with VT after": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"chunked", b"chunked\x0b"),
    "TE name, space before colon": chunked(b"3\r\nabc\r\n0\r\n\r\n").replace(b"g: chunked", b"g : chunked"),
    "TE name after a space": post(b" " + TE, b"3\r\nabc\r\n0\r\n\r\n"),
    "TE name with an underscore": post(b"Transfer_Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    "TE name, LF before colon": post(b"Transfer-Encoding\n: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    "TE folded onto the next line": post(b"Transfer-Encoding:\r\n chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    "TE chunked, then TE x": post(TE + b"Transfer-Encoding: x\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    "TE x, then TE chunked": post(b"Transfer-Encoding: x\r\n" + TE, b"3\r\nabc\r\n0\r\n\r\n"),
    "TE chunked twice": post(TE + TE, b"3\r\nabc\r\n0\r\n\r\n"),
    "TE empty, then TE chunked": post(b"Transfer-Encoding: \r\n" + TE, b"3\r\nabc\r\n0\r\n\r\n"),
    "TE in HTTP/1.0": post(TE, b"3\r\nabc\r\n0\r\n\r\n", b"HTTP/1.0"),
    "TE in HTTP/1.0, keep-alive, GET behind": post(b"Connection: keep-alive\r\n" + TE, b"3\r\nabc\r\n0\r\n\r\n",
                                                   b"HTTP/1.0") + b"GET /2 HTTP/1.1\r\n\r\n",
    "TE and CL in HTTP/1.0": post(TE + b"Content-Length: 3\r\n", b"3\r\nabc\r\n0\r\n\r\n", b"HTTP/1.0"),
    "obs-fold with a tab": b"GET / HTTP/1.1\r\nX-A: b\r\n\tc\r\n\r\n",
    "space before the first header": b"GET / HTTP/1.1\r\n X-A: b\r\n\r\n",
    "bare CR ends the request line": b"GET / HTTP/1.1\rX-A: b\r\n\r\n",
    "bare LF ends the request line": b"GET / HTTP/1.1\nX-A: b\r\n\r\n",
    "bare LF ends a header line": b"GET / HTTP/1.1\r\nX-A: b\nX-B: c\r\n\r\n",
    "bare LF ends the head": b"GET / HTTP/1.1\r\nX-A: b\r\n\nGET /2 HTTP/1.1\r\n\r\n",
    "LF LF ends the head": b"GET / HTTP/1.1\nX-A: b\n\n",
    "NUL in a name": b"GET / HTTP/1.1\r\nX-\x00A: b\r\n\r\n",
    "NUL in the target": b"GET /\x00 HTTP/1.1\r\n\r\n",
    "CR in the target": b"GET /a\rb HTTP/1.1\r\n\r\n",
    "SOH in a value": b"GET / HTTP/1.1\r\nX-A: b\x01\r\n\r\n",
    "empty name": b"GET / HTTP/1.1\r\n: b\r\n\r\n",
    "name without colon": b"GET / HTTP/1.1\r\nX-A\r\n\r\n",
    "empty value": b"GET / HTTP/1.1\r\nX-A:\r\n\r\n",
    "no space after colon": b"GET / HTTP/1.1\r\nX-A:b\r\n\r\n",
    "spaces around a value": b"GET / HTTP/1.1\r\nX-A:   b  \r\n\r\n",
    "chunk size 5;ext": chunked(b"5;ext\r\nabcde\r\n0\r\n\r\n"),
    "chunk size 5;a=\"x y\"": chunked(b"5;a=\"x y\"\r\nabcde\r\n0\r\n\r\n"),
    "chunk size 5 ;a=b": chunked(b"5 ;a=b\r\nabcde\r\n0\r\n\r\n"),
    "chunk size 5; a=b": chunked(b"5; a=b\r\nabcde\r\n0\r\n\r\n"),
    "chunk extension with a space": chunked(b"5;a b\r\nabcde\r\n0\r\n\r\n"),
    "chunk extension with a bare LF": chunked(b"5;a\nXXXXX\r\nabcde\r\n0\r\n\r\n"),
    "chunk extension with a bare CR": chunked(b"5;a\rb\r\nabcde\r\n0\r\n\r\n"),
    "chunk extension with a NUL": chunked(b"5;a\x00\r\nabcde\r\n0\r\n\r\n"),
    "chunk size then a tab": chunked(b"5\t\r\nabcde\r\n0\r\n\r\n"),
    "chunk size after a space": chunked(b" 5\r\nabcde\r\n0\r\n\r\n"),
    "chunk size in capitals": chunked(b"A\r\n0123456789\r\n0\r\n\r\n"),
    "chunk size 15 hex digits": chunked(b"00000000000000A\r\n0123456789\r\n0\r\n\r\n"),
    "chunk size 18 hex digits": chunked(b"00000000000000000A\r\n0123456789\r\n0\r\n\r\n"),
    "chunk size 16 Fs": chunked(b"FFFFFFFFFFFFFFFF\r\nabc"),
    "HTTP/0.9 line, bare LF, CRLF": b"GET /+\n\r\n",
    "Connection: close, then an empty one": b"GET / HTTP/1.1\r\nConnection: close\r\nConnection:\r\n\r\n"
                                            b"GET /2 HTTP/1.1\r\n\r\n",
    "chunk size 17 Fs": chunked(b"FFFFFFFFFFFFFFFFF\r\nabc"),
    "chunk size over the body limit": chunked(b"FFFFFFFFFFFFFFF\r\nabc"),
    "chunk size empty": chunked(b"\r\nabc\r\n0\r\n\r\n"),
    "chunk size line ends in a bare LF": chunked(b"3\nabc\r\n0\r\n\r\n"),
    "chunk data then X": chunked(b"3\r\nabcX\r\n0\r\n\r\n"),
    "chunk data then a bare LF": chunked(b"3\r\nabc\n0\r\n\r\n"),
    "chunk data longer than its size": chunked(b"3\r\nabcdef\r\n0\r\n\r\n"),
    "chunk data unended": chunked(b"3\r\nab"),
    "last chunk 00": chunked(b"3\r\nabc\r\n00\r\n\r\n"),
    "last chunk with an extension": chunked(b"3\r\nabc\r\n0;x\r\n\r\n"),
    "last chunk, no empty line yet": chunked(b"3\r\nabc\r\n0\r\n"),
    "last chunk, half an empty line": chunked(b"3\r\nabc\r\n0\r\n\r"),
    "last chunk, LF LF": chunked(b"3\r\nabc\r\n0\n\n"),
    "last chunk, CRLF LF": chunked(b"3\r\nabc\r\n0\r\n\n"),
    "trailer with a bare LF hides a request": chunked(b"3\r\nabc\r\n0\r\nX: y\n\nGET /s HTTP/1.1\r\n\r\n"),
    "trailer with a bare LF": chunked(b"3\r\nabc\r\n0\r\nX: a\nb\r\n\r\n"),
    "trailer with a NUL line": chunked(b"3\r\nabc\r\n0\r\n\x00\r\n\r\n"),
    "trailer, space before colon": chunked(b"3\r\nabc\r\n0\r\nX-T : y\r\n\r\n"),
    "trailer folded": chunked(b"3\r\nabc\r\n0\r\nX-T: y\r\n z\r\n\r\n"),
    "trailer Content-Length": chunked(b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n"),
    "trailer Connection: close, GET behind": chunked(b"3\r\nabc\r\n0\r\nConnection: close\r\n\r\n"
                                                     b"GET /2 HTTP/1.1\r\n\r\n"),
    "trailer Transfer-Encoding": chunked(b"3\r\nabc\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"),
    "trailer, GET behind": chunked(b"3\r\nabc\r\n0\r\nX-T: y\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"),
    "chunked, GET behind": chunked(b"3\r\nabc\r\n0\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"),
    "CL, GET behind, CRLF between": post(b"Content-Length: 3\r\n", b"abc\r\nGET /2 HTTP/1.1\r\n\r\n"),
    "GET with a body, GET behind": b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /2 HTTP/1.1\r\n\r\n",
    "HEAD with a body, GET behind": b"HEAD / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /2 HTTP/1.1\r\n\r\n",
    "Connection: close, GET behind": b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    "Connection: Close, GET behind": b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    "Connection: xclose, GET behind": b"GET / HTTP/1.1\r\nConnection: xclose\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    "Connection: keep-alive, close": b"GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    "Connection: close, then Connection: x": b"GET / HTTP/1.1\r\nConnection: close\r\nConnection: x\r\n\r\n"
                                             b"GET /2 HTTP/1.1\r\n\r\n",
    "HTTP/1.0 keep-alive and close": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
                                     b"GET /2 HTTP/1.1\r\n\r\n",
    "HTTP/1.0, GET behind": b"GET / HTTP/1.0\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    "HTTP/1.0 keep-alive, GET behind": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    "HTTP/1.0 keep-alive-x, GET behind": b"GET / HTTP/1.0\r\nConnection: keep-alive-x\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    "Upgrade websocket, GET behind": b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
                                     b"GET /2 HTTP/1.1\r\n\r\n",
    "Upgrade with a body": b"POST / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 3\r\n"
                           b"\r\nabcGET /2 HTTP/1.1\r\n\r\n",
    "Upgrade without Connection": b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    "CONNECT, GET behind": b"CONNECT a:443 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    "one leading CRLF": b"\r\nGET / HTTP/1.1\r\n\r\n",
    "two leading CRLFs": b"\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    "leading LFs": b"\n\nGET / HTTP/1.1\r\n\r\n",
    "lower-case method": b"get / HTTP/1.1\r\n\r\n",
    "unknown method": b"FOO / HTTP/1.1\r\n\r\n",
    "PROPFIND": b"PROPFIND / HTTP/1.1\r\n\r\n",
    "M-SEARCH": b"M-SEARCH * HTTP/1.1\r\n\r\n",
    "PRI": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "two spaces after the method": b"GET  / HTTP/1.1\r\n\r\n",
    "tab after the method": b"GET\t/ HTTP/1.1\r\n\r\n",
    "tab in the target": b"GET /a\tb HTTP/1.1\r\n\r\n",
    "tab ends the target": b"GET /predictions/m\tHTTP/1.1 HTTP/1.1\r\n\r\n",
    "space after the version": b"GET / HTTP/1.1 \r\n\r\n",
    "no version": b"GET /\r\n\r\n",
    "no version, bare LF": b"GET /\nHost: a\r\n\r\n",
    "HTTP/0.9": b"GET / HTTP/0.9\r\n\r\n",
    "HTTP/1.2": b"GET / HTTP/1.2\r\n\r\n",
    "HTTP/1.01": b"GET / HTTP/1.01\r\n\r\n",
    "RTSP/1.0": b"OPTIONS * RTSP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    "lower-case http": b"GET / http/1.1\r\n\r\n",
    "target ?": b"GET ? HTTP/1.1\r\n\r\n",
    "target with 0xff": b"GET /\xff HTTP/1.1\r\n\r\n",
    "target with quotes and braces": b"GET /a\"{b}\\ HTTP/1.1\r\n\r\n",
    "absolute target": b"GET http://x/y HTTP/1.1\r\n\r\n",
    "asterisk target": b"OPTIONS * HTTP/1.1\r\n\r\n",
    "100 header lines": b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n",
    "NUL starts the next request": b"GET / HTTP/1.1\r\nHost: a\r\n\r\nG\x00T / HTTP/1.1\r\n\r\n",
    "GET, then half a request": b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\n\r\nGE",
    "CL body unended": post(b"Content-Length: 5\r\n", b"ab"),
}

# The router's everyday requests: the hypothesis test mutates these.
VALID = [
    b"POST /predictions/text-embedder HTTP/1.1\r\nHost: router:8080\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer " + KEY.encode() + b"\r\nX-User-Id: u-42\r\nContent-Length: %d\r\n\r\n" % len(DOC) + DOC,
    chunked(b"5;x=1\r\nhello\r\n0\r\nX-T: y\r\n\r\n"),
    b"GET /ping HTTP/1.1\r\nHost: a\r\n\r\nGET /models HTTP/1.1\r\nConnection: close\r\n\r\n",
    post(b"Content-Length: 3\r\n", b"abc", b"HTTP/1.0") + b"GET /x HTTP/1.1\r\n\r\n",
    post(b"Connection: keep-alive\r\nContent-Length: 2\r\n", b"hi", b"HTTP/1.0", b"/predictions/m/2.0?x=1"),
    chunked(b"2\r\nhe\r\n3;a=\"b\"\r\nllo\r\n0\r\n\r\n", b"Expect: 100-continue\r\n") + b"GET /x HTTP/1.1\r\n\r\n",
]

CORPUS: dict[str, bytes] = {**TEST_HTTP1_REFUSED, **TEST_HTTP1_SERVED, **CLASSIC,
                            **{f"valid {i}": raw for i, raw in enumerate(VALID)}}
