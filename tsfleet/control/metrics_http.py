"""The recycler's /metrics: Prometheus text over a small http.server, in a daemon thread.

Every request head must be whole within METRICS_HEAD_TIMEOUT_S of its connection: http.server
has no deadline of its own, so a client sending a byte a second held a thread and a socket
for as long as it liked."""
from __future__ import annotations

import contextlib
import http.server
import io
import socket
import threading
import time
from typing import Any, Callable

# The recycler's /metrics: the whole request head within this long. A constant, not
# router.limits (the router's, for the router's clients): a scrape sends its head at once,
# and the recycler answers nothing else.
METRICS_HEAD_TIMEOUT_S = 10.0


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes until ``timeout_s`` after it was made, then TimeoutError (``owner.late``)."""

    def __init__(self, sock: socket.socket, timeout_s: float, owner: Any):
        self.sock, self.owner = sock, owner
        self.deadline = time.monotonic() + timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.owner.late = True
            raise TimeoutError("request head deadline")
        self.sock.settimeout(left)  # each read waits only for what is left of the deadline
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            self.owner.late = True
            raise


def serve_metrics(host: str, port: int, metrics: Callable[[], str]) -> http.server.ThreadingHTTPServer:
    """A Prometheus endpoint (``/metrics``, no key) on ``host``:``port``, serving in a daemon
    thread. ``host`` is an IPv4 or IPv6 address: "::" serves an IPv6-only pod network."""
    class Metrics(http.server.BaseHTTPRequestHandler):
        def setup(self) -> None:
            super().setup()
            # http.server has no deadline: a head sent a byte a second held its thread and
            # socket for ever. The whole head must come within METRICS_HEAD_TIMEOUT_S of the
            # connection (one request per connection: HTTP/1.0), whatever its pace.
            self.late = False
            self.rfile = io.BufferedReader(_DeadlineReader(self.connection, METRICS_HEAD_TIMEOUT_S, self))

        def parse_request(self) -> bool:
            # The head is whole: the answer's writes get a deadline of their own.
            self.connection.settimeout(METRICS_HEAD_TIMEOUT_S)
            return super().parse_request()

        def handle_one_request(self) -> None:
            super().handle_one_request()  # logs nothing on a timeout; close_connection set
            if self.late:
                body = f"no whole request head within {METRICS_HEAD_TIMEOUT_S:g} s\n".encode()
                with contextlib.suppress(OSError):
                    self.wfile.write(b"HTTP/1.0 408 Request Timeout\r\nContent-Type: text/plain\r\n"
                                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = metrics().encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body if self.path == "/metrics" else b"")

        def do_HEAD(self) -> None:  # noqa: N802
            # A probe's HEAD: the GET's status and headers, no body.
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()

        def _not_allowed(self) -> None:
            # http.server answers a method it has no do_ for with 501, a server fault; the
            # fault is the client's: 405, naming what is allowed.
            self.send_response(405)
            self.send_header("Allow", "GET, HEAD")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        # The base class binds IPv4 sockets only, which refuse an address such as "::".
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = Server((host, port), Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd
