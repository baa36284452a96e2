"""Deadlines and a connection cap for the router's admin API (aiohttp).

aiohttp's server has no deadline on a request's head or body: a client sending a byte a
second held its connection (and a socket of the router) until aiohttp's keep-alive check,
an hour later (3630 s in aiohttp 3.14), and any number of them could. Here each connection's
protocol is aiohttp's own, wrapped (``Deadlined``), and the admin API's middleware says when
a head is whole (``Deadlined.head_done``); the same ``router.limits`` as the REST
front's apply:

- ``head_timeout_s`` from a request's first byte to its head being whole: 408 and closed;
- ``body_timeout_s`` from the head to the body's last byte: 408, and closed ``head_timeout_s``
  later (aiohttp reads the body's rest meanwhile, so that a client still sending reads it);
- ``idle_timeout_s``: a keep-alive connection with nothing under way is closed (aiohttp's
  keepalive_timeout);
- ``connections``: past it a new connection gets 503 and is closed.

Bodies are read as sent (no Content-Encoding is taken: 415), at most aiohttp's
client_max_size (1 MiB; 413).
"""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from tsfleet.errors import error_body
from tsfleet.router.wire.limits import DEFAULT_LIMITS, RouterLimits


def _answer(status: int, reason: str, message: str) -> bytes:
    body = error_body(status, message)
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class Deadlined(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a deadline on each request's head."""

    def __init__(self, inner: Any, owner: "AdminConnections"):
        self.inner, self.owner = inner, owner
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False  # a request's head was whole and it is not answered yet
        self.draining = False  # answered before its body was read: what comes is that body's rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.owner.live) >= self.owner.limits.connections:
            transport.write(_answer(503, "Service Unavailable", "too many connections to the admin API"))  # type: ignore[attr-defined]
            transport.close()
            return
        self.owner.live[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.timer is None and not self.busy:  # a request's first byte: its head's deadline runs
            self.timer = asyncio.get_running_loop().call_later(self.owner.limits.head_timeout_s, self._late)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.owner.live.get(self.transport) is self:
            del self.owner.live[self.transport]
            self.inner.connection_lost(exc)

    def head_done(self) -> None:
        self.busy = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def answered(self, body_read: bool) -> None:
        """Its handler returned; ``body_read``: the request's body was read to its end."""
        self.busy = False  # the next byte starts the next head's deadline
        self.draining = not body_read
        if self.draining and self.timer is None:  # aiohttp would read the rest for 10 s more
            self.timer = asyncio.get_running_loop().call_later(self.owner.limits.head_timeout_s, self._late)

    def _late(self) -> None:
        self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            if self.draining:  # the rest of a body answered already (aiohttp reads it, then the next head)
                self.transport.close()
                return
            seconds = f"{self.owner.limits.head_timeout_s:g}"
            self.transport.write(_answer(408, "Request Timeout", f"no whole request head within {seconds} s"))
            self.transport.close()


class AdminConnections:
    """The admin API's open connections, by transport (for its middleware), and its limits."""

    def __init__(self, limits: RouterLimits = DEFAULT_LIMITS):
        self.limits = limits
        self.live: dict[Any, Deadlined] = {}

    def of(self, request: web.BaseRequest) -> Deadlined | None:
        """The connection ``request`` came on; None where it was not served by a DeadlineSite."""
        return self.live.get(request.transport)

    def runner(self, app: web.Application) -> web.AppRunner:
        """An AppRunner for ``app`` that closes idle keep-alive connections as the REST front
        does, and leaves bodies as sent: aiohttp decompressed a Content-Encoding by itself,
        answering corrupt gzip 500 and an unknown coding 400, each with a traceback in the
        log (the admin API refuses any coding instead: AdminApi's middleware, 415)."""
        return web.AppRunner(app, access_log=None, keepalive_timeout=self.limits.idle_timeout_s,
                             auto_decompress=False)


class DeadlineSite(web.TCPSite):
    """aiohttp's TCPSite, each connection's protocol wrapped in ``Deadlined``."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, connections: AdminConnections):
        super().__init__(runner, host, port)
        self.connections = connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Deadlined(server(), self.connections), self._host, self._port)
        self._bound_port = self._server.sockets[0].getsockname()[1]
