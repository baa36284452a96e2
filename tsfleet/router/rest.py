"""The router's REST side: TorchServe's inference paths, routed, retried once, measured.

Clients call it exactly as they call TorchServe (same paths, bodies, keys and status
codes); the answer says which version served it in ``X-Model-Version``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from typing import Awaitable, Callable
from urllib.parse import quote, unquote, urlsplit

from tsfleet.router.compare import answers_agree
from tsfleet.router.http1 import Listener, Request, Response, UpstreamError, UpstreamPool
from tsfleet.router.routing import RoutingTable

log = logging.getLogger(__name__)
# TorchServe's words for a request that a dying or retiring worker dropped: safe to retry,
# since inference has no side effects.
DROPPED = (b"Worker died", b"Worker scaled down", b"has no worker to serve inference request")
JSON = [b"Content-Type: application/json"]


def _retryable(status: int, body: bytes) -> bool:
    return status in (500, 503, 507) and any(marker in body for marker in DROPPED)


def _body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"code": status, "type": kind, "message": message}).encode()


class RestRouter:
    """Forwards inference calls to TorchServe at ``upstream``; ``start`` listens."""

    def __init__(self, table: RoutingTable, upstream: str, sticky_header: str = "X-User-Id",
                 timeout_s: float = 130, min_attempt_s: float = 2.0, latency_factor: float = 10.0,
                 max_body: int = 16 * 2**20, metrics: Callable[[], Awaitable[str]] | None = None):
        self.table, self.upstream = table, upstream.rstrip("/")
        self.sticky = sticky_header.lower().encode()
        self.timeout_s, self.min_attempt_s, self.latency_factor = timeout_s, min_attempt_s, latency_factor
        url = urlsplit(self.upstream)
        secure = url.scheme == "https"  # TorchServe configured with its own certificate
        self.pool = UpstreamPool(url.hostname or "127.0.0.1", url.port or (443 if secure else 80),
                                 ssl=ssl.create_default_context() if secure else None)
        self.listener = Listener(self.handle, max_body)
        # A front of a router of several processes asks the leader, which counts for all.
        self.metrics = metrics
        self._background: set[asyncio.Task] = set()

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen; returns the port (useful when ``port`` is 0)."""
        return await self.listener.start(host, port, reuse_port)

    async def stop(self) -> None:
        self.listener.close()
        for task in list(self._background):
            task.cancel()
        self.pool.close()

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/predictions/"):
            parts = path[len("/predictions/"):].split("/")
            if 1 <= len(parts) <= 2 and all(parts):
                return await self.predict(request, unquote(parts[0]), unquote(parts[1]) if len(parts) == 2 else None)
        if path == "/metrics" and request.method == "GET":
            text = await self.metrics() if self.metrics is not None else self.table.prometheus()
            return Response(200, text.encode(), [b"Content-Type: text/plain; charset=utf-8"])
        # /ping, /wfpredict/..., anything else: TorchServe answers it, errors included.
        status, data, resp_headers, _, _ = await self._call(
            request.method, request.target, "", request.body, request.forward, None, None)
        return Response(status, data, resp_headers)

    def attempt_timeout(self, model: str | None, version: str | None) -> float:
        """How long the first attempt may take before it is presumed lost (see RoutingTable)."""
        return self.table.attempt_timeout(model, version, self.timeout_s, self.min_attempt_s, self.latency_factor)

    async def _call(self, method: str, path_for: str, query: str, body: bytes, headers: list[bytes],
                    first: str | None, second: str | None,
                    model: str | None = None) -> tuple[int, bytes, list[bytes], str | None, bool]:
        """One call, and one retry for a dropped request, a refused connection or a lost job."""
        version, retried = first, False
        for attempt in (0, 1):
            target = self.table.upstream(model, version)
            path = path_for + (f"/{quote(target, safe='')}" if target else "") + query
            t0 = time.perf_counter()
            try:
                timeout = self.attempt_timeout(model, version) if attempt == 0 else self.timeout_s
                resp = await self.pool.request(method, path, headers, body, timeout)
            except (UpstreamError, asyncio.TimeoutError) as exc:
                if attempt == 0:
                    if model:
                        self.table.record(model, version, False, time.perf_counter() - t0)
                    version, retried = second, True
                    continue
                if isinstance(exc, asyncio.TimeoutError):
                    return 504, _body(504, "GatewayTimeout", f"no answer from TorchServe within {self.timeout_s:.0f} s"), \
                        JSON, version, retried
                return 503, _body(503, "ServiceUnavailable", f"TorchServe is not reachable at {self.upstream}: {exc}"), \
                    JSON, version, retried
            if attempt == 0 and _retryable(resp.status, resp.body):
                if model:
                    # The client will not see this failure, but the arm's record must.
                    self.table.record(model, version, False, time.perf_counter() - t0)
                version, retried = second, True
                continue
            return resp.status, resp.body, resp.headers, version, retried
        raise AssertionError("unreachable")

    async def predict(self, request: Request, model: str, explicit: str | None) -> Response:
        sticky = request.headers.get(self.sticky)
        choice = self.table.choose(model, explicit, sticky.decode("latin-1") if sticky is not None else None)
        second = self.table.alternate(model, choice.version) if not choice.explicit else choice.version
        query = request.target[len(request.path):]
        started = time.perf_counter()
        status, data, resp_headers, version, retried = await self._call(
            request.method, f"/predictions/{quote(model, safe='')}", query, request.body, request.forward,
            choice.version, second, model)
        event = self.table.record(model, version, status < 500, time.perf_counter() - started, retried)
        if event:
            log.warning("rolled back %s %s: %s", model, event["version"], event["reason"])
        if choice.shadow and status < 500:
            self._mirror(request, model, choice.shadow, data)
        if version:
            resp_headers = [*resp_headers, b"X-Model-Version: " + version.encode()]
        return Response(status, data, resp_headers)

    def _mirror(self, request: Request, model: str, version: str, primary: bytes) -> None:
        async def run() -> None:
            try:
                resp = await self.pool.request(request.method, f"/predictions/{quote(model, safe='')}/{quote(version, safe='')}",
                                               request.forward, request.body, self.timeout_s)
            except (UpstreamError, asyncio.TimeoutError):
                self.table.record_shadow(model, version, False, None)
                return
            ok = resp.status < 500
            self.table.record_shadow(model, version, ok, answers_agree(primary, resp.body) if ok and resp.status < 400 else None)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
