"""The router's REST side: TorchServe's inference paths, routed, retried once, measured.

Clients call it exactly as they call TorchServe (same paths, bodies, keys and status
codes); the answer says which version served it in ``X-Model-Version``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
from aiohttp import web

from tsfleet.router.compare import answers_agree
from tsfleet.router.routing import RoutingTable

log = logging.getLogger(__name__)
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
# TorchServe's words for a request that a dying or retiring worker dropped: safe to retry,
# since inference has no side effects.
DROPPED = (b"Worker died", b"Worker scaled down", b"has no worker to serve inference request")


def _retryable(status: int, body: bytes) -> bool:
    return status in (500, 503, 507) and any(marker in body for marker in DROPPED)


def _body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"code": status, "type": kind, "message": message}).encode()


class RestRouter:
    """An aiohttp app that forwards inference calls to TorchServe at ``upstream``."""

    def __init__(self, table: RoutingTable, upstream: str, sticky_header: str = "X-User-Id",
                 timeout_s: float = 130, min_attempt_s: float = 2.0, latency_factor: float = 10.0):
        self.table, self.upstream, self.sticky_header = table, upstream.rstrip("/"), sticky_header
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.timeout_s, self.min_attempt_s, self.latency_factor = timeout_s, min_attempt_s, latency_factor
        self.session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task] = set()
        self.app = web.Application(client_max_size=16 * 2**20)
        self.app.add_routes([
            web.route("*", "/predictions/{model}", self.predict),
            web.route("*", "/predictions/{model}/{version}", self.predict),
            web.route("*", "/wfpredict/{workflow}", self.passthrough),
            web.get("/ping", self.passthrough),
            web.get("/metrics", self.metrics),
        ])
        self.app.on_startup.append(self._open)
        self.app.on_cleanup.append(self._close)

    async def _open(self, app: web.Application) -> None:
        # No connection cap: TorchServe queues; the router must not become the bottleneck.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=self.timeout,
                                             auto_decompress=False)

    async def _close(self, app: web.Application) -> None:
        for task in list(self._background):
            task.cancel()
        if self.session:
            await self.session.close()

    def attempt_timeout(self, model: str | None, version: str | None) -> float:
        """How long the first attempt may take before it is presumed lost.

        TorchServe silently drops the jobs a worker had gathered for its next batch when the
        worker dies; their clients would wait for ever. So a first attempt that takes far
        longer than this arm's recent p99 is retried once (inference is idempotent).
        """
        st = self.table.stats.get((model, version)) if model and version else None
        if st is None:
            return self.timeout_s
        samples, _, p99 = st.recent(60.0, time.monotonic())
        if samples < 20:
            return self.timeout_s
        return min(self.timeout_s, max(self.min_attempt_s, self.latency_factor * p99))

    async def _send(self, method: str, path: str, body: bytes, headers: dict[str, str],
                    timeout: float | None = None) -> tuple[int, bytes, dict]:
        assert self.session is not None
        limit = aiohttp.ClientTimeout(total=timeout) if timeout else None
        async with self.session.request(method, self.upstream + path, data=body, headers=headers,
                                        timeout=limit) as resp:
            return resp.status, await resp.read(), {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}

    def _forward_headers(self, request: web.Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}

    async def _call(self, method: str, path_for: str, body: bytes, headers: dict[str, str],
                    first: str | None, second: str | None,
                    model: str | None = None) -> tuple[int, bytes, dict, str | None, bool]:
        """One call, and one retry for a dropped request, a refused connection or a lost job."""
        version, retried = first, False
        for attempt in (0, 1):
            target = self.table.upstream(model, version)
            path = path_for + (f"/{target}" if target else "")
            t0 = time.perf_counter()
            try:
                timeout = self.attempt_timeout(model, version) if attempt == 0 else None
                status, data, resp_headers = await self._send(method, path, body, headers, timeout)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                if attempt == 0:
                    if model:
                        self.table.record(model, version, False, time.perf_counter() - t0)
                    version, retried = second, True
                    continue
                if isinstance(exc, asyncio.TimeoutError):
                    return 504, _body(504, "GatewayTimeout", f"no answer from TorchServe within {self.timeout_s:.0f} s"), \
                        {"Content-Type": "application/json"}, version, retried
                return 503, _body(503, "ServiceUnavailable", f"TorchServe is not reachable at {self.upstream}: {exc}"), \
                    {"Content-Type": "application/json"}, version, retried
            if attempt == 0 and _retryable(status, data):
                if model:
                    # The client will not see this failure, but the arm's record must.
                    self.table.record(model, version, False, time.perf_counter() - t0)
                version, retried = second, True
                continue
            return status, data, resp_headers, version, retried
        raise AssertionError("unreachable")

    async def predict(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        explicit = request.match_info.get("version")
        body = await request.read()
        headers = self._forward_headers(request)
        choice = self.table.choose(model, explicit, request.headers.get(self.sticky_header))
        second = self.table.alternate(model, choice.version) if not choice.explicit else choice.version
        started = time.perf_counter()
        status, data, resp_headers, version, retried = await self._call(
            request.method, f"/predictions/{model}", body, headers, choice.version, second, model)
        event = self.table.record(model, version, status < 500, time.perf_counter() - started, retried)
        if event:
            log.warning("rolled back %s %s: %s", model, event["version"], event["reason"])
        if choice.shadow and status < 500:
            self._mirror(request.method, model, choice.shadow, body, headers, data)
        if version:
            resp_headers["X-Model-Version"] = version
        return web.Response(status=status, body=data, headers=resp_headers)

    def _mirror(self, method: str, model: str, version: str, body: bytes, headers: dict, primary: bytes) -> None:
        async def run() -> None:
            try:
                status, data, _ = await self._send(method, f"/predictions/{model}/{version}", body, headers)
                ok = status < 500
                self.table.record_shadow(model, version, ok, answers_agree(primary, data) if ok and status < 400 else None)
            except aiohttp.ClientError:
                self.table.record_shadow(model, version, False, None)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        status, data, resp_headers, _, _ = await self._call(
            request.method, request.path, body, self._forward_headers(request), None, None)
        return web.Response(status=status, body=data, headers=resp_headers)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.table.prometheus(), content_type="text/plain")
