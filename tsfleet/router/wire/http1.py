"""Just enough HTTP/1.1 for the router's hot path: the server side (upstream.py: the client).

Every request through the router is paid for in CPU that, on a small box, comes out of the
model's own throughput. A general framework spends ~0.3 ms per proxied call building
request and response objects; a proxy needs far less of HTTP: a request's method, target,
headers and body, keep-alive. Messages are read whole (inference bodies are small), so
streamed (chunked) answers are forwarded once complete, as before. Requests are read by
http1_requests.py (llhttp and the router's own checks, no I/O); answers are encoded by
http1_messages.py; this module moves bytes and keeps connections.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Awaitable, Callable

from tsfleet.errors import error_body
from tsfleet.router.wire.http1_messages import HttpError, Request, Response, encode_response
from tsfleet.router.wire.http1_requests import RequestReader
from tsfleet.router.wire.limits import DEFAULT_LIMITS, LimitCounters, RouterLimits

log = logging.getLogger(__name__)
MAX_CONNECTIONS = DEFAULT_LIMITS.connections  # per router process; each holds a socket and its buffers
# Requests read whole behind the one being answered before reading pauses (with their bytes
# past the connection's head_bytes, whichever comes first).
MAX_QUEUED = 16
_UNCOUNTED = LimitCounters()  # where a connection made without a Listener's counters counts
__all__ = ["HttpError", "Listener", "Request", "Response", "Http1ServerConnection", "ROUTER_ERROR", "Reply", "Fast",
           "Handler"]


Handler = Callable[[Request], Awaitable[Response]]
Reply = Callable[[Request, Response], None]
# Takes a request it can answer without a task (True) and answers it later through the
# reply callback; False leaves the request to the (async) handler.
Fast = Callable[[Request, Reply], bool]
ROUTER_ERROR = Response(500, error_body(500, "router error"), [b"Content-Type: application/json"])
# Made once: a flood of connections past the cap is answered with it, each.
TOO_MANY = Response(503, error_body(503, "too many connections to this router process"), [b"Content-Type: application/json"])


class Http1ServerConnection(asyncio.Protocol):
    """One client connection: requests are answered in order, one at a time (pipelining safe).
    Its limits are ``limits``'s (``max_body`` and ``max_connections``, when given, in place of
    theirs), read once here; each that fires is counted in ``counters``."""

    def __init__(self, handler: Handler, max_body: int | None, registry: set[Http1ServerConnection],
                 fast: Fast | None = None, max_connections: int | None = None, limits: RouterLimits = DEFAULT_LIMITS,
                 counters: LimitCounters = _UNCOUNTED):
        self.handler, self.registry, self.fast, self.counters = handler, registry, fast, counters
        self.max_body = limits.body_bytes if max_body is None else max_body
        self.max_connections = limits.connections if max_connections is None else max_connections
        self.max_head, self.max_headers, self.max_trailers = limits.head_bytes, limits.header_lines, limits.trailer_bytes
        self.reader = RequestReader(self.max_body, self.max_head, self.max_headers, self.max_trailers)
        self.queue = self.reader.requests  # read whole, not yet answered
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.busy = False
        self.current: Request | None = None  # the request being answered
        self.error: HttpError | None = None  # a request refused: answered after those before it
        self.dispatching = False  # in _next: a reply made there goes on in its loop, not deeper
        self.last_active = 0.0
        self.reading_since: float | None = None  # when the request not yet whole began to come
        self.paused = False  # reading paused: pipelined bytes wait in the kernel, not here
        self.refused = False
        self.draining = False  # the router is stopping: close after the answer under way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.registry) >= self.max_connections:
            self.refused = True
            self.counters.connections += 1
            transport.write(encode_response(TOO_MANY, False))  # type: ignore[attr-defined]
            transport.close()
            return
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        self.registry.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.registry.discard(self)
        self.reader.close()

    def data_received(self, data: bytes) -> None:
        if self.refused or self.error is not None:
            return
        try:
            self.reader.feed(data)
        except HttpError as exc:
            if exc.limit is not None:
                self.counters.hit(exc.limit)
            self.error = exc
        if not self.busy:
            self.last_active = self.loop.time()  # type: ignore[union-attr]
            self._next()
        elif self.queue or self.reader.open:
            self._flow()

    def idle_since(self) -> float | None:
        """When the connection last did anything, if it is waiting for a client now."""
        return None if self.busy else self.last_active

    def between_requests(self) -> bool:
        """No request under way, nor any part of the next one received."""
        return not self.busy and not self.queue and not self.reader.open and self.error is None

    def head_whole(self) -> bool:
        """The head of the request coming (reading_since) is whole: its body is what is awaited."""
        return self.reader.head_done

    def _next(self) -> None:
        """Answer the requests read, in order, one at a time; then wait for the next one."""
        if self.dispatching:
            return
        self.dispatching = True
        queue = self.queue
        try:
            while not self.busy and queue:
                request = queue.popleft()
                self.busy, self.current, self.reading_since = True, request, None
                if self.fast is not None:
                    try:
                        if self.fast(request, self.reply):
                            continue
                    except Exception:  # noqa: BLE001 - one bad request must not take the connection's others
                        log.exception("router: unhandled error for %s %s", request.method, request.target)
                        self.reply(request, ROUTER_ERROR)
                        continue
                self.loop.create_task(self._answer(request))  # type: ignore[union-attr]
        finally:
            self.dispatching = False
        if self.busy:
            if queue or self.reader.open or self.paused:
                self._flow()
            return
        if self.error is not None:
            self._fail(self.error.status, str(self.error))
            return
        if self.paused:
            self._flow()
        reader = self.reader
        if not reader.open:
            self.reading_since = None
            return
        if self.reading_since is None:
            self.reading_since = self.loop.time()  # type: ignore[union-attr]
        if reader.expect and self.transport is not None:
            # Its turn, and none of its body came: the client waits for this before sending it.
            reader.expect = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _flow(self) -> None:
        """Pause reading while requests pile up behind the one being answered (200 MiB of
        pipelined bytes were held once), and read again once it is answered."""
        over = self.busy and (len(self.queue) >= MAX_QUEUED or self.backlog() > self.max_head)
        if over is not self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = over
            if over:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def backlog(self) -> int:
        """Bytes held of the requests read behind the one being answered (bodies and targets)."""
        reader = self.reader
        return sum(len(r.body) + len(r.target) for r in self.queue) + (reader.size if reader.open else 0)

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
        self.last_active = self.loop.time()  # type: ignore[union-attr]
        self.transport.write(encode_response(resp, keep, request.method == "HEAD"))
        if not keep:
            self.transport.close()
            return
        self.busy = False
        self._next()

    def _fail(self, status: int, message: str) -> None:
        self.reading_since = None  # answered: no deadline of its request can fire again
        if self.transport is None:
            return
        body = error_body(status, message)
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
        self.connections: set[Http1ServerConnection] = set()
        self.server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def _connection(self) -> Http1ServerConnection:
        return Http1ServerConnection(self.handler, None, self.connections, self.fast, None, self.limits, self.counters)

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
                if waited > self.head_timeout and not conn.head_whole():
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
