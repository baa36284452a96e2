"""The router's pooled HTTP/1.1 client to TorchServe, answering through a callback.

TorchServe on a GPU answers a whole batch at once, and the router then passes those
answers on one after another: every microsecond it spends per answer is paid again by
each answer behind it in the batch. So an exchange here costs no task, future or timer of
its own: the answer is parsed and handed on in the same callback that read it, and
deadlines.py ends the exchanges that ran past their deadline. ``request`` wraps it for
code that awaits.
"""
from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from typing import Callable

from tsfleet.router.wire.deadlines import Deadlines
from tsfleet.router.wire.http1_messages import LARGE_BODY, Body, HttpError, Response, body_mode, parse_head

log = logging.getLogger(__name__)
# done(answer, None) or done(None, error): UpstreamError, or asyncio.TimeoutError.
Done = Callable[[Response | None, BaseException | None], None]
# A request as written: one bytes, or (a large body) the head and the body, written together
# without copying the body into one with the head.
Message = bytes | list[bytes]


class UpstreamError(ConnectionError):
    """The upstream closed or refused the connection before a whole answer came back."""


class _Connection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "buf", "head", "body", "received", "closed", "head_only",
                 "done", "deadline", "message", "reused")

    def __init__(self, pool: RestUpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: tuple[int, list[bytes], bool] | None = None
        self.body: Body | None = None
        self.received = self.closed = self.head_only = self.reused = False
        self.done: Done | None = None
        self.deadline: float | None = None
        self.message = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None:
            if self.head is not None and self.body is not None and self.body.length == -1:
                self._finish(bytes(self.buf))  # a body that runs to the end of the connection
            else:
                self.fail(UpstreamError(f"connection closed by upstream ({exc or 'EOF'})"))

    def begin(self, message: Message, head_only: bool, deadline: float | None, done: Done) -> None:
        self.buf.clear()
        self.head = self.body = None
        self.received, self.head_only = False, head_only
        self.message, self.deadline, self.done = message, deadline, done
        assert self.transport is not None
        if isinstance(message, list):
            self.transport.writelines(message)
        else:
            self.transport.write(message)

    def data_received(self, data: bytes) -> None:
        self.received = True
        self.buf += data
        if self.done is None:
            return
        try:
            self._parse()
        except HttpError as exc:
            self.fail(UpstreamError(f"unreadable answer from upstream: {exc}"))

    def _parse(self) -> None:
        buf = self.buf
        if self.head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            first, headers, forward = parse_head(bytes(buf[:end]))
            del buf[:end + 4]
            status = int(first[1])
            if 100 <= status < 200:  # an interim answer; the real one follows
                if buf:
                    self._parse()
                return
            keep = b"close" not in headers.get(b"connection", b"").lower() and first[0] == b"HTTP/1.1"
            self.head = (status, forward, keep)
            if self.head_only or status in (204, 304):
                self.body = Body(0, 2**31)
            elif b"transfer-encoding" in headers or b"content-length" in headers:
                self.body = Body(body_mode(headers), 2**31)
            else:
                self.body = Body(None, 2**31)
                self.body.length = -1  # read until the upstream closes
                self.head = (status, forward, False)
                return
        assert self.body is not None
        if self.body.length == -1:
            return
        data = self.body.take(buf)
        if data is not None:
            self._finish(data)

    def _finish(self, body: bytes) -> None:
        status, forward, keep = self.head  # type: ignore[misc]
        done, self.done = self.done, None
        if done is not None:
            self.pool._finished(self, Response(status, body, forward, keep), None, done)

    def fail(self, exc: BaseException) -> None:
        """End the exchange with ``exc``; the connection is closed (an answer may still come)."""
        done, self.done = self.done, None
        if self.transport is not None:
            self.transport.close()
        if done is not None:
            self.pool._finished(self, None, exc, done)


class RestUpstreamPool:
    """Keep-alive connections to one HTTP server, each carrying one exchange at a time."""

    def __init__(self, host: str, port: int, max_idle: int = 256, ssl: ssl_module.SSLContext | None = None):
        self.host, self.port, self.max_idle, self.ssl = host, port, max_idle, ssl
        self.host_line = b"Host: %s:%d" % (host.encode(), port)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._tasks: set[asyncio.Task] = set()
        self._deadlines: Deadlines[_Connection] = Deadlines(lambda conn: conn.fail(asyncio.TimeoutError()))

    def start(self, method: str, target: str, headers: list[bytes], body: bytes, timeout: float | None,
              done: Done) -> None:
        """Send one request; ``done`` gets its answer or error later, from the event loop (never
        from inside this call). A kept connection the server had closed meanwhile is replaced."""
        head = b"\r\n".join([b"%s %s HTTP/1.1" % (method.encode(), target.encode("latin-1")), self.host_line,
                             *headers, b"Content-Length: %d" % len(body)]) + b"\r\n\r\n"
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        self._send(head + body if len(body) < LARGE_BODY else [head, body], method == "HEAD", deadline, done)

    async def request(self, method: str, target: str, headers: list[bytes], body: bytes,
                      timeout: float | None = None) -> Response:
        """One exchange, awaited. Raises UpstreamError (connection) or asyncio.TimeoutError."""
        future = asyncio.get_running_loop().create_future()

        def done(resp: Response | None, exc: BaseException | None) -> None:
            if not future.done():
                future.set_exception(exc) if exc is not None else future.set_result(resp)

        self.start(method, target, headers, body, timeout, done)
        return await future

    def _send(self, message: Message, head_only: bool, deadline: float | None, done: Done) -> None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                conn.reused = True
                self._begin(conn, message, head_only, deadline, done)
                return
        task = asyncio.get_running_loop().create_task(self._connect_then_send(message, head_only, deadline, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_then_send(self, message: Message, head_only: bool, deadline: float | None, done: Done) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self.ssl)
        except OSError as exc:
            _call(done, None, UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"))
            return
        self._begin(conn, message, head_only, deadline, done)

    def _begin(self, conn: _Connection, message: Message, head_only: bool, deadline: float | None, done: Done) -> None:
        self._busy.add(conn)
        conn.begin(message, head_only, deadline, done)
        if deadline is not None:
            self._deadlines.add(conn, deadline)

    def _finished(self, conn: _Connection, resp: Response | None, exc: BaseException | None, done: Done) -> None:
        self._busy.discard(conn)
        self._deadlines.discard(conn)
        if exc is not None:
            if isinstance(exc, UpstreamError) and conn.reused and not conn.received:
                # The server had closed an idle connection: not this request's fault.
                self._send(conn.message, conn.head_only, conn.deadline, done)
                return
            _call(done, None, exc)
            return
        conn.message = b""  # kept only for a resend; an idle connection must not hold a 16 MiB body
        if resp.keep_alive and not conn.closed and len(self._idle) < self.max_idle:  # type: ignore[union-attr]
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        _call(done, resp, None)

    def close(self) -> None:
        self._deadlines.close()
        for task in self._tasks:
            task.cancel()
        for conn in [*self._idle, *self._busy]:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        self._busy.clear()


def _call(done: Done, resp: Response | None, exc: BaseException | None) -> None:
    try:
        done(resp, exc)
    except Exception:  # noqa: BLE001 - a faulty callback must not take the connection's reader down
        log.exception("router: error while handing on an upstream answer")
