"""The router's HTTP/1.1 request reading against an oracle: raw httptools (llhttp, uvicorn's
parser, its lenient flags off) gets the same bytes, in the same reads, and must reach the same
verdict: the same requests (method, target, headers, body, keep-alive), each ending where the
other's does, then the same end (rejected, waiting for more, done). The router parses with
llhttp too (http1_requests.py), so what this checks is what the router adds on top of it: its
limits and rules. Where the verdicts differ it is one of ALLOWED, each with its reason; any
other difference fails, above all one of framing (a body's length, where the next request
begins), which is how requests are smuggled.

The router is driven as production drives it: a Http1ServerConnection (http1.py) fed reads through
data_received, each request answered at once by a fast hook."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.http1_corpus import CORPUS, VALID
from tests.wire import Wire
from tsfleet.router.wire.http1 import Reply, Request, Response, Http1ServerConnection
from tsfleet.router.wire.http1_messages import HOP_BY_HOP

MAX_BODY = 16 * 2**20  # the REST front's default (fronts/rest.py)

# Each way the verdicts may differ, and why that is no smuggling: the router refuses what
# llhttp takes (it frames no such request at all), or it reads on where llhttp would hand the
# connection to another protocol, framing what follows as llhttp frames any request.
ALLOWED = {
    # The router refuses; llhttp takes.
    "router-caps": "431: head over 64 KiB, over 100 header lines or trailers over 8 KiB; llhttp has no caps",
    "body-limit": "413: a body over the router's 16 MiB; llhttp reads any length",
    "transfer-codings": "501: only a lone 'chunked' is served; llhttp takes any list ending in chunked",
    "transfer-encoding-tabs": "400: a tab in Transfer-Encoding (TE.TE obfuscation); llhttp takes one after a "
                              "coding ('gzip\\t, chunked') and skips one before the value",
    "request-line": "400: HTTP/1.0 or 1.1 only, a letters-only method; llhttp takes HTTP/2.0 and a version-less "
                    "HTTP/0.9 line (even one ended by a bare LF), and M-SEARCH",
    "upgrade-with-body": "501: an Upgrade or CONNECT with a body; llhttp ends the request at its head and hands "
                         "the body to the other protocol, which the router would read as HTTP/1.1",
    "close-wins": "'close' beside 'keep-alive' in an HTTP/1.0 Connection closes (RFC 9112 9.3); llhttp keeps "
                  "the connection: the router answers, closes, and frames nothing more",
    # The router reads on; llhttp stops.
    "upgrade-ignored": "Upgrade/CONNECT are not done: the router reads on as HTTP/1.1 (RFC 9110 7.8)",
}


@dataclass(frozen=True)
class Msg:
    method: str
    target: str
    forward: tuple[tuple[bytes, bytes], ...]  # (lower-case name, value) of end-to-end headers, in order
    hop: tuple[tuple[bytes, bytes], ...]  # hop-by-hop headers by name (TE and Connection lines joined)
    body: bytes
    keep_alive: bool


@dataclass(frozen=True)
class Verdict:
    msgs: tuple[Msg, ...]
    end: str  # "done", "partial", "closed" (after a request that ends the connection), "rejected", "upgrade"
    why: str = ""  # the router's status and message, or llhttp's error class and reason


def _fields(pairs: list[tuple[bytes, bytes]]) -> tuple[tuple, tuple]:
    """(forward, hop) of raw (name, value) pairs; values without the OWS around them."""
    forward, hop = [], {}
    for name, value in pairs:
        key, value = name.lower(), value.strip(b" \t")
        if key not in HOP_BY_HOP:
            forward.append((key, value))
        elif key in (b"transfer-encoding", b"connection") and key in hop:  # lists, as the router reads them
            hop[key] += b", " + value
        else:
            hop[key] = value
    return tuple(forward), tuple(sorted((k, v.strip(b" \t")) for k, v in hop.items()))


class _Probe(Http1ServerConnection):
    """A Http1ServerConnection that also keeps its refusal (status, message)."""

    failure: tuple[int, str] | None = None

    def _fail(self, status: int, message: str) -> None:
        self.failure = (status, message)
        super()._fail(status, message)


def own(data: bytes, cuts: tuple[int, ...] = ()) -> Verdict:
    """The router's verdict on ``data`` arriving in reads cut at ``cuts``."""
    got: list[Request] = []

    def fast(request: Request, reply: Reply) -> bool:
        got.append(request)
        reply(request, Response(200, b"", []))
        return True

    async def feed() -> _Probe:
        conn = _Probe(None, MAX_BODY, set(), fast=fast)  # type: ignore[arg-type]
        wire = Wire()
        conn.connection_made(wire)  # type: ignore[arg-type]
        for piece in _pieces(data, cuts):
            if wire.closed:  # refused, or a request that closes: nothing more is read
                break
            conn.data_received(piece)
        return conn

    conn = asyncio.run(feed())
    msgs = []
    for r in got:
        forward, hop = _fields([(n, v) for n, _, v in (line.partition(b":") for line in r.forward)]
                               + [(k, v) for k, v in r.headers.items() if k in HOP_BY_HOP])
        msgs.append(Msg(r.method, r.target, forward, hop, r.body, r.keep_alive))
    if conn.failure is not None:
        return Verdict(tuple(msgs), "rejected", "%d %s" % conn.failure)
    if msgs and not msgs[-1].keep_alive:
        return Verdict(tuple(msgs), "closed")
    return Verdict(tuple(msgs), "partial" if conn.reader.open else "done")


class _Collect:
    """httptools callbacks: each whole request as a Msg."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.msgs: list[Msg] = []
        self.open = False  # a request begun, not yet whole
        self.closed = False  # a request that ends the connection is whole

    def on_message_begin(self) -> None:
        self.open, self.head, self.url, self.pairs, self.body = True, True, b"", [], b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head:  # not a trailer: the router never forwards them
            self.pairs.append((name, value))

    def on_headers_complete(self) -> None:
        self.head = False

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.closed:
            return
        keep = self.parser.should_keep_alive()
        forward, hop = _fields(self.pairs)
        method = self.parser.get_method().decode("latin-1")
        self.msgs.append(Msg(method, self.url.decode("latin-1"), forward, hop, self.body, keep))
        self.open, self.closed = False, not keep


def ref(data: bytes, cuts: tuple[int, ...] = ()) -> Verdict:
    """llhttp's verdict on the same reads."""
    c = _Collect()
    for piece in _pieces(data, cuts):
        try:
            c.parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            return Verdict(tuple(c.msgs), "upgrade")
        except httptools.HttpParserError as exc:
            if c.closed:  # "Data after Connection: close": the server has closed by then
                break
            return Verdict(tuple(c.msgs), "rejected", f"{type(exc).__name__}: {exc}")
        if c.closed:
            break
    return Verdict(tuple(c.msgs), "closed" if c.closed else "partial" if c.open else "done")


def _pieces(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _router_refuses(why: str) -> str | None:
    """The ALLOWED rule for the router refusing what llhttp takes (or still reads)."""
    status, message = why.split(" ", 1)
    if status == "431":
        return "router-caps"
    if status == "413":
        return "body-limit"
    if status == "501":
        return "upgrade-with-body" if "Upgrade or CONNECT" in message else "transfer-codings"
    if message == "a tab in Transfer-Encoding":
        return "transfer-encoding-tabs"
    if message.startswith("malformed request line: "):  # the router's checks; llhttp's quote the line
        return "request-line"
    return None


def explain(data: bytes, mine: Verdict, theirs: Verdict) -> str | None:
    """None where the verdicts agree; else the ALLOWED rule that covers the difference.
    AssertionError for any other difference."""
    if mine == theirs or (mine.end == theirs.end == "rejected" and mine.msgs == theirs.msgs):
        return None
    shown = f"\nbytes: {data[:300]!r}\nrouter:    {mine}\nhttptools: {theirs}"
    if theirs.end == "upgrade" and mine.end != "rejected" and mine.msgs[:len(theirs.msgs)] == theirs.msgs:
        return "upgrade-ignored"  # the same requests up to the upgrade, then the router reads on
    i = next((i for i, (a, b) in enumerate(zip(mine.msgs, theirs.msgs)) if a != b), None)
    if i is not None:
        a, b = mine.msgs[i], theirs.msgs[i]
        assert replace(a, keep_alive=b.keep_alive) == b, "the same request read differently" + shown
        tokens = {t.strip().lower() for t in dict(a.hop).get(b"connection", b"").split(b",")}
        if not a.keep_alive and {b"close", b"keep-alive"} <= tokens:
            return "close-wins"
        raise AssertionError("keep-alive differs" + shown)
    if mine.end == "rejected" and mine.msgs == theirs.msgs[:len(mine.msgs)]:
        rule = _router_refuses(mine.why)
        assert rule is not None, "the router refuses what llhttp takes, for no listed reason" + shown
        return rule
    raise AssertionError("the router and llhttp frame these bytes differently" + shown)


def verdicts(data: bytes, cuts: tuple[int, ...] = ()) -> tuple[Verdict, Verdict]:
    return own(data, cuts), ref(data, cuts)


@pytest.mark.parametrize("name", list(CORPUS))
def test_each_corpus_case_gets_llhttps_verdict_or_a_listed_difference(name: str) -> None:
    data = CORPUS[name]
    mine, theirs = verdicts(data)
    rule = explain(data, mine, theirs)
    assert rule is None or rule in ALLOWED
    if len(data) < 4096:  # the same in 3-byte reads: framing must not depend on how bytes arrive
        cuts = tuple(range(3, len(data), 3))
        assert own(data, cuts) == mine  # the refusal's message too
        assert explain(data, mine, ref(data, cuts)) == rule


def test_every_allowed_difference_is_still_met_by_a_corpus_case() -> None:
    """A rule no case needs any more is one to delete, so the list stays the real difference."""
    met = {explain(data, *verdicts(data)) for data in CORPUS.values()} - {None}
    assert met == set(ALLOWED)


def test_the_smuggling_cases_are_refused_outright() -> None:
    """What a smuggler needs is refused by the router, nothing of it framed; llhttp refuses
    them too, but for "x" then "chunked", which it reads as chunked (the router: 501)."""
    for name in ("LF hides TE", "CR hides TE", "CL then TE", "TE then CL", "two different CLs",
                 "trailer with a bare LF hides a request", "chunk extension with a bare LF", "TE x, then TE chunked",
                 "TE chunked twice", "TE with a tab after", "hostile peers: LF hides TE", "tab ends the target"):
        mine, theirs = verdicts(CORPUS[name])
        assert mine.end == "rejected" and not mine.msgs, (name, mine)
        assert theirs.end == "rejected" or name in ("TE x, then TE chunked",), (name, theirs)


HOSTILE = [b"\r", b"\n", b"\r\n", b"\x00", b"\t", b" ", b":", b";", b",", b"\x0b", b"\x7f", b"\x80", b"\xff",
           b"0", b"F", b"x", b"-", b"+", b"\r\n\r\n", b"\r\n ", b"\n\n", b"chunked", b"close",
           b"Transfer-Encoding: chunked\r\n", b"Content-Length: 0\r\n", b"Content-Length: 5\r\n",
           b"Connection: close\r\n", b"0\r\n\r\n", b"GET /s HTTP/1.1\r\n\r\n"]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, tuple[int, ...]]:
    """A valid request (or pipelined run) mutated 1-4 times, and cuts into reads."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "replace", "delete", "duplicate", "case", "append"]))
        if op == "insert":
            data[at:at] = draw(st.sampled_from(HOSTILE))
        elif op == "replace":
            data[at:at + 1] = draw(st.sampled_from(HOSTILE))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 4))]
        elif op == "duplicate":  # the line ``at`` falls in, once more
            start = data.rfind(b"\r\n", 0, at) + 2
            stop = data.find(b"\r\n", at)
            if stop > start:
                data[start:start] = data[start:stop + 2]
        elif op == "case":
            data[at:at + 8] = data[at:at + 8].swapcase()
        else:
            data += draw(st.sampled_from(VALID))
    cuts = tuple(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3)))
    return bytes(data), cuts


@settings(max_examples=max(300, settings().max_examples), deadline=None)
@given(mutated())
def test_mutated_requests_get_llhttps_verdict_or_a_listed_difference(case: tuple[bytes, tuple[int, ...]]) -> None:
    data, cuts = case
    mine = own(data, cuts)
    assert mine == own(data), "the router's verdict depends on how the bytes are cut into reads"
    rule = explain(data, mine, ref(data, cuts))
    assert rule is None or rule in ALLOWED
