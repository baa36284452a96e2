"""Just enough HTTP/1.1 for the router's hot path: the server side (upstream.py: the client).

Every request through the router is paid for in CPU that, on a small box, comes out of the
model's own throughput. A general framework spends ~0.3 ms per proxied call building
request and response objects; a proxy needs far less of HTTP: a head split into lines, a
Content-Length or chunked body, keep-alive. Messages are read whole (inference bodies are
small), so streamed (chunked) answers are forwarded once complete, as before. Parsing and
its limits are http1_messages.py (no I/O); this module moves bytes and keeps connections.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Awaitable, Callable

from tsfleet.router.wire.http1_messages import (LARGE_BODY, REASONS, Body, HttpError, Request, Response, body_mode,
                                           encode_response, parse_head)
from tsfleet.router.wire.limits import DEFAULT_LIMITS, LimitCounters, RouterLimits

log = logging.getLogger(__name__)
MAX_CONNECTIONS = DEFAULT_LIMITS.connections  # per router process; each holds a socket and its buffers
_UNCOUNTED = LimitCounters()  # where a connection made without a Listener's counters counts
__all__ = ["HttpError", "Listener", "Request", "Response", "ServerConnection", "ROUTER_ERROR", "Reply", "Fast", "Handler"]


Handler = Callable[[Request], Awaitable[Response]]
Reply = Callable[[Request, Response], None]
# Takes a request it can answer without a task (True) and answers it later through the
# reply callback; False leaves the request to the (async) handler.
Fast = Callable[[Request, Reply], bool]
ROUTER_ERROR = Response(500, b'{"code": 500, "type": "InternalServerError", "message": "router error"}',
                        [b"Content-Type: application/json"])


class ServerConnection(asyncio.Protocol):
    """One client connection: requests are answered in order, one at a time (pipelining safe).
    Its limits are ``limits``'s (``max_body`` and ``max_connections``, when given, in place of
    theirs), read once here; each that fires is counted in ``counters``."""

    def __init__(self, handler: Handler, max_body: int | None, registry: set[ServerConnection], fast: Fast | None = None,
                 max_connections: int | None = None, limits: RouterLimits = DEFAULT_LIMITS,
                 counters: LimitCounters = _UNCOUNTED):
        self.handler, self.registry, self.fast, self.counters = handler, registry, fast, counters
        self.max_body = limits.body_bytes if max_body is None else max_body
        self.max_connections = limits.connections if max_connections is None else max_connections
        self.max_head, self.max_headers, self.max_trailers = limits.head_bytes, limits.header_lines, limits.trailer_bytes
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.pending: tuple[bytes, str, dict, list, bool, Body] | None = None
        self.collecting: Body | None = None  # the pending request's large body, while it comes
        self.busy = False
        self.current: Request | None = None  # the request being answered
        self.last_active = 0.0
        self.reading_since: float | None = None  # when the request not yet whole began to come
        self.paused = False  # reading paused: pipelined bytes wait in the kernel, not here
        self.refused = False
        self.draining = False  # the router is stopping: close after the answer under way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.registry) >= self.max_connections:
            self.refused = True
            self.counters.connections += 1
            body = b'{"code": 503, "type": "ServiceUnavailable", "message": "too many connections to this router process"}'
            transport.write(encode_response(Response(503, body, [b"Content-Type: application/json"]), False))  # type: ignore[attr-defined]
            transport.close()
            return
        self.transport = transport  # type: ignore[assignment]
        self.last_active = asyncio.get_running_loop().time()
        self.registry.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.registry.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        body = self.collecting
        if body is None:
            self.buf += data
        else:  # the rest of a large body: each read kept as it is, joined once when all is in
            need = body.length - body.size  # type: ignore[operator]
            if len(data) > need:
                self.buf += memoryview(data)[need:]  # a pipelined request behind it
                data = memoryview(data)[:need]
            body.parts.append(data)
            body.size += len(data)
            if body.size < body.length:  # type: ignore[operator]
                self.last_active = asyncio.get_running_loop().time()
                return
            self.collecting = None
        if not self.busy:
            self.last_active = asyncio.get_running_loop().time()
            self._next()
        elif len(self.buf) > self.max_head and not self.paused and self.transport is not None:
            # Requests pipelined behind the one being answered: 200 MiB of them were held once.
            self.paused = True
            self.transport.pause_reading()

    def idle_since(self) -> float | None:
        """When the connection last did anything, if it is waiting for a client now."""
        return None if self.busy else self.last_active

    def between_requests(self) -> bool:
        """No request under way, nor any part of the next one received."""
        return not self.busy and self.pending is None and self.collecting is None and not self.buf

    def _next(self) -> None:
        try:
            request = self._parse()
        except HttpError as exc:
            if exc.limit is not None:
                self.counters.hit(exc.limit)
            self._fail(exc.status, str(exc))
            return
        if request is None:
            if self.reading_since is None and not self.between_requests():
                self.reading_since = asyncio.get_running_loop().time()
            return
        self.reading_since = None
        self.busy, self.current = True, request
        if self.fast is not None:
            try:
                if self.fast(request, self.reply):
                    return
            except Exception:  # noqa: BLE001 - one bad request must not take the connection's others
                log.exception("router: unhandled error for %s %s", request.method, request.target)
                self.reply(request, ROUTER_ERROR)
                return
        asyncio.get_running_loop().create_task(self._answer(request))

    def _parse(self) -> Request | None:
        buf = self.buf
        if self.pending is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_head:
                    raise HttpError(431, "request head too large", "head_bytes")
                return None
            if end > self.max_head:  # it all came at once: the limit holds all the same
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
            if headers.get(b"expect", b"").lower() == b"100-continue" and (body.length or body.length is None) \
                    and not buf and self.transport:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        method, target, headers, forward, keep, reader = self.pending
        if reader.length is not None and reader.length >= LARGE_BODY and len(buf) < reader.length and not reader.parts:
            # An image still coming: appending each read to the buffer would copy it again
            # and again as the buffer grows; its reads are kept and joined once instead.
            reader.parts.append(buf)  # what came with the head: the buffer itself, uncopied
            reader.size = len(buf)
            self.buf, self.collecting = bytearray(), reader
            return None
        data = reader.take(buf)
        if data is None:
            return None
        self.pending = None
        return Request(method.decode("latin-1"), target, headers, forward, data, keep)

    async def _answer(self, request: Request) -> None:
        try:
            resp = await self.handler(request)
        except Exception:  # noqa: BLE001 - one bad request must not take the connection's others
            log.exception("router: unhandled error for %s %s", request.method, request.target)
            resp = ROUTER_ERROR
        self.reply(request, resp)

    def reply(self, request: Request, resp: Response) -> None:
        """Send the answer to ``request`` and go on to the next one (once per request)."""
        if request is not self.current:
            return
        self.current = None
        keep = request.keep_alive and resp.keep_alive and not self.draining
        if self.transport is None:
            return
        self.last_active = asyncio.get_running_loop().time()
        self.transport.write(encode_response(resp, keep, request.method == "HEAD"))
        if not keep:
            self.transport.close()
            return
        self.busy = False
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.buf:
            self._next()

    def _fail(self, status: int, message: str) -> None:
        self.reading_since = None  # answered: no deadline of its request can fire again
        if self.transport is None:
            return
        kind = REASONS.get(status, b"Error").decode().title().replace(" ", "").replace("-", "")
        body = json.dumps({"code": status, "type": kind, "message": message}).encode()
        self.transport.write(encode_response(Response(status, body, [b"Content-Type: application/json"]), False))
        self.transport.close()


class Listener:
    """A listening socket and its open connections, so stopping also ends keep-alive clients.

    ``limits`` (limits.py; the keyword arguments, when given, in place of some: tests) hold:
    a connection that sits idle (no request under way) for ``idle_timeout_s`` is closed,
    so clients that vanish without closing do not pile up open sockets; a request whose head
    is not whole ``head_timeout_s`` after its first byte, or that is not whole
    ``body_timeout_s`` after it, is answered 408 (one byte every second kept a connection
    open forever under the idle timer); past ``connections`` a new one is answered 503 and
    closed. Each limit that fires is counted in ``counters``.
    """

    def __init__(self, handler: Handler, max_body: int | None = None, idle_timeout: float | None = None,
                 fast: Fast | None = None, read_timeout: float | None = None, max_connections: int | None = None,
                 limits: RouterLimits | None = None, counters: LimitCounters | None = None):
        given = {"body_bytes": max_body, "idle_timeout_s": idle_timeout, "head_timeout_s": read_timeout,
                 "body_timeout_s": read_timeout, "connections": max_connections}
        self.limits = replace(limits or DEFAULT_LIMITS, **{k: v for k, v in given.items() if v is not None})
        self.counters = counters if counters is not None else LimitCounters()
        self.handler, self.fast = handler, fast
        self.max_body, self.idle_timeout = self.limits.body_bytes, self.limits.idle_timeout_s
        self.head_timeout, self.body_timeout = self.limits.head_timeout_s, self.limits.body_timeout_s
        self.read_timeout, self.max_connections = self.body_timeout, self.limits.connections
        self.connections: set[ServerConnection] = set()
        self.server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def _connection(self) -> ServerConnection:
        return ServerConnection(self.handler, None, self.connections, self.fast, None, self.limits, self.counters)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen on host:port (0: any free port); returns the port. ``reuse_port``: share
        the port with other router processes (SO_REUSEPORT)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._connection, host, port, backlog=1024,
                                               reuse_port=reuse_port or None)
        self._sweep()
        return self.server.sockets[0].getsockname()[1]

    def _sweep(self) -> None:
        # One timer for all connections, not one per request: a few seconds of slack is fine.
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.connections):
            since = conn.idle_since()
            if since is not None and now - since > self.idle_timeout and conn.transport is not None:
                conn.transport.close()
                self.counters.idle_timeout_s += 1
            elif conn.reading_since is not None and conn.transport is not None:
                waited = now - conn.reading_since
                if waited > self.head_timeout and conn.pending is None and conn.collecting is None:
                    conn._fail(408, f"request head not received whole within {self.head_timeout:g} s")
                    self.counters.head_timeout_s += 1
                elif waited > self.body_timeout:
                    conn._fail(408, f"request not received whole within {self.body_timeout:g} s")
                    self.counters.body_timeout_s += 1
        self._sweeper = loop.call_later(min(10.0, self.idle_timeout / 4, self.head_timeout / 4, self.body_timeout / 4),
                                        self._sweep)

    async def drain(self, grace_s: float) -> None:
        """Stop taking connections and close those between requests; answer the requests
        under way (each connection closes after its answer) for up to ``grace_s``; then close."""
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        end = loop.time() + grace_s
        for conn in list(self.connections):
            conn.draining = True
            if conn.between_requests() and conn.transport is not None:
                conn.transport.close()
        while self.connections and loop.time() < end:
            await asyncio.sleep(0.02)
        self.close()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
