"""The router's REST side: TorchServe's inference paths, routed, retried once, measured.

Clients call it exactly as they call TorchServe (same paths, bodies, keys and status
codes); the answer says which version served it in ``X-Model-Version``.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import time
from typing import Any, Awaitable, Callable, Coroutine
from urllib.parse import quote, unquote, urlsplit

from tsfleet.router.fronts import health
from tsfleet.router.policy.compare import answers_agree
from tsfleet.router.wire.http1 import ROUTER_ERROR, Listener, Reply, Request, Response
from tsfleet.router.keys import REFUSED_BYTES, InferenceKeys
from tsfleet.router.readiness import ModelReadiness
from tsfleet.router.policy.routing import Choice, RoutingTable
from tsfleet.router.wire.upstream import UpstreamError, UpstreamPool

log = logging.getLogger(__name__)
# TorchServe's words for a request that a dying or retiring worker dropped: safe to retry,
# since inference has no side effects.
DROPPED = (b"Worker died", b"Worker scaled down", b"has no worker to serve inference request")
JSON = [b"Content-Type: application/json"]


def _retryable(status: int, body: bytes) -> bool:
    return status in (500, 503, 507) and any(marker in body for marker in DROPPED)


@functools.lru_cache(maxsize=4096)
def _quoted(name: str) -> str:
    """A model or version name as one path segment (cached: it is the same few names all day)."""
    return quote(name, safe="")


def _path(path_for: str, version: str | None, query: str) -> str:
    return path_for + "/" + _quoted(version) + query if version else path_for + query


def _with_authorization(lines: list[bytes], value: bytes) -> list[bytes]:
    return [b"Authorization: " + value if line[:14].lower() == b"authorization:" else line for line in lines]


def _body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"code": status, "type": kind, "message": message}).encode()


class RestRouter:
    """Forwards inference calls to TorchServe at ``upstream``; ``start`` listens."""

    def __init__(self, table: RoutingTable, upstream: str, sticky_header: str = "X-User-Id",
                 timeout_s: float = 130, min_attempt_s: float = 2.0, latency_factor: float = 10.0,
                 max_body: int = 16 * 2**20, metrics: Callable[[], Awaitable[str]] | None = None,
                 keys: InferenceKeys | None = None, readiness: ModelReadiness | None = None):
        self.table, self.upstream, self.keys, self.readiness = table, upstream.rstrip("/"), keys, readiness
        self.sticky = sticky_header.lower().encode()
        self.timeout_s, self.min_attempt_s, self.latency_factor = timeout_s, min_attempt_s, latency_factor
        url = urlsplit(self.upstream)
        secure = url.scheme == "https"  # TorchServe configured with its own certificate
        self.pool = UpstreamPool(url.hostname or "127.0.0.1", url.port or (443 if secure else 80),
                                 ssl=ssl.create_default_context() if secure else None)
        self.listener = Listener(self.handle, max_body, fast=self.route)
        # A front of a router of several processes asks the leader, which counts for all.
        self.metrics = metrics
        self._background: set[asyncio.Task] = set()

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen; returns the port (useful when ``port`` is 0)."""
        return await self.listener.start(host, port, reuse_port)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop; requests under way get their answers for up to ``grace_s`` first."""
        await self.listener.drain(grace_s)
        for task in list(self._background):
            task.cancel()
        self.pool.close()

    def route(self, request: Request, reply: Reply) -> bool:
        """Take an inference call (``/predictions/{model}[/{version}]``) without a task of its
        own; anything else is left to ``handle``."""
        target = request.target
        if not target.startswith("/predictions/"):
            return False
        path, mark, query = target.partition("?")
        parts = path[len("/predictions/"):].split("/")
        if not (1 <= len(parts) <= 2 and all(parts)):
            return False
        self._swap_key(request)
        self.predict(request, unquote(parts[0]), unquote(parts[1]) if len(parts) == 2 else None, mark + query, reply)
        return True

    async def handle(self, request: Request) -> Response:
        if request.path == "/metrics" and request.method == "GET":
            text = await self.metrics() if self.metrics is not None else self.table.prometheus()
            if self.keys is not None:
                text += self.keys.prometheus()
            return Response(200, text.encode(), [b"Content-Type: text/plain; charset=utf-8"])
        if request.path in (health.LIVE, health.READY) and request.method == "GET":
            status, data = health.alive() if request.path == health.LIVE else await health.rest_ready(
                self.pool, self.upstream, request.target.partition("?")[2], self.readiness)
            return Response(status, data, JSON)
        # /ping, /wfpredict/..., anything else: TorchServe answers it, errors included.
        self._swap_key(request)
        status, data, resp_headers = await self._call(request)
        return Response(status, data, resp_headers)

    def _swap_key(self, request: Request) -> None:
        """The router's own inference key goes upstream as TorchServe's current one (keys.py)."""
        if self.keys is not None and (sent := self.keys.swap(request.headers.get(b"authorization"))) is not None:
            request.auth = sent
            request.forward = _with_authorization(request.forward, sent)

    @staticmethod
    def _refused(request: Request, resp: Response) -> bool:
        return request.auth is not None and resp.status == 400 and REFUSED_BYTES in resp.body

    async def _renew_key(self, request: Request) -> bool:
        """After TorchServe refused the key swapped in: swap in a fresher one, if there is one
        (once: a second refusal is the client's answer)."""
        assert self.keys is not None and request.auth is not None
        fresh, request.auth = await self.keys.refused(request.auth), None
        if fresh is None:
            return False
        request.forward = _with_authorization(request.forward, fresh)
        return True

    def attempt_timeout(self, model: str | None, version: str | None) -> float:
        """How long the first attempt may take before it is presumed lost (see RoutingTable)."""
        return self.table.attempt_timeout(model, version, self.timeout_s, self.min_attempt_s, self.latency_factor)

    async def _call(self, request: Request) -> tuple[int, bytes, list[bytes]]:
        """A call that names no model (/ping, workflows...), retried once like an inference call."""
        retried = False
        while True:
            try:
                resp = await self.pool.request(request.method, request.target, request.forward, request.body,
                                               self.timeout_s)
            except (UpstreamError, asyncio.TimeoutError) as exc:
                if not retried:
                    retried = True
                    continue
                return self._unreachable(exc)
            if self._refused(request, resp) and await self._renew_key(request):
                continue
            if not retried and _retryable(resp.status, resp.body):
                retried = True
                continue
            return resp.status, resp.body, resp.headers

    def _unreachable(self, exc: BaseException) -> tuple[int, bytes, list[bytes]]:
        if isinstance(exc, asyncio.TimeoutError):
            return 504, _body(504, "GatewayTimeout", f"no answer from TorchServe within {self.timeout_s:.0f} s"), JSON
        return 503, _body(503, "ServiceUnavailable", f"TorchServe is not reachable at {self.upstream}: {exc}"), JSON

    def predict(self, request: Request, model: str, explicit: str | None, query: str, reply: Reply) -> None:
        """Route one inference call; its first attempt is all callbacks (upstream.py says why),
        a retry is a task: it is rare."""
        sticky = request.headers.get(self.sticky)
        choice = self.table.choose(model, explicit, sticky.decode("latin-1") if sticky is not None else None)
        self._first(request, reply, model, choice, query, time.perf_counter())

    def _first(self, request: Request, reply: Reply, model: str, choice: Choice, query: str, started: float) -> None:
        path_for = "/predictions/" + _quoted(model)
        target = self.table.upstream(model, choice.version)

        def first_done(resp: Response | None, exc: BaseException | None) -> None:
            try:
                if resp is not None and self._refused(request, resp):
                    self._spawn(self._renew_then(request, reply, model, choice, query, started, resp))
                    return
                if resp is not None and not _retryable(resp.status, resp.body):
                    self._answered(request, reply, model, choice, choice.version, resp.status, resp.body,
                                   resp.headers, started, False)
                    return
                # The client will not see this failure, but the arm's record must.
                self.table.record(model, choice.version, False, time.perf_counter() - started)
                second = self.table.alternate(model, choice.version) if not choice.explicit else choice.version
                self._spawn(self._retry(request, reply, model, choice, second, path_for, query, started))
            except Exception:  # noqa: BLE001 - the client must get an answer whatever went wrong
                log.exception("router: unhandled error for %s %s", request.method, request.target)
                reply(request, ROUTER_ERROR)

        self.pool.start(request.method, _path(path_for, target, query), request.forward, request.body,
                        self.attempt_timeout(model, choice.version), first_done)

    async def _renew_then(self, request: Request, reply: Reply, model: str, choice: Choice, query: str,
                          started: float, refusal: Response) -> None:
        try:
            if await self._renew_key(request):
                self._first(request, reply, model, choice, query, started)
            else:
                self._answered(request, reply, model, choice, choice.version, refusal.status, refusal.body,
                               refusal.headers, started, False)
        except Exception:  # noqa: BLE001 - the client must get an answer whatever went wrong
            log.exception("router: unhandled error for %s %s", request.method, request.target)
            reply(request, ROUTER_ERROR)

    async def _retry(self, request: Request, reply: Reply, model: str, choice: Choice, version: str | None,
                     path_for: str, query: str, started: float) -> None:
        try:
            target = self.table.upstream(model, version)
            try:
                resp = await self.pool.request(request.method, _path(path_for, target, query), request.forward,
                                               request.body, self.timeout_s)
                status, data, headers = resp.status, resp.body, resp.headers
            except (UpstreamError, asyncio.TimeoutError) as exc:
                status, data, headers = self._unreachable(exc)
            self._answered(request, reply, model, choice, version, status, data, headers, started, True)
        except Exception:  # noqa: BLE001 - the client must get an answer whatever went wrong
            log.exception("router: unhandled error for %s %s", request.method, request.target)
            reply(request, ROUTER_ERROR)

    def _answered(self, request: Request, reply: Reply, model: str, choice: Choice, version: str | None,
                  status: int, data: bytes, headers: list[bytes], started: float, retried: bool) -> None:
        # TorchServe's 404 is no such model or version: not an arm. Counting it would give
        # /metrics a new series for every name a client makes up.
        event = self.table.record(model, version, status < 500, time.perf_counter() - started,
                                  retried) if status != 404 else None
        if event:
            log.warning("rolled back %s %s: %s", model, event["version"], event["reason"])
        if choice.shadow and status < 500:
            self._mirror(request, model, choice.shadow, data)
        if version:
            headers = [*headers, b"X-Model-Version: " + version.encode()]
        reply(request, Response(status, data, headers))

    def _mirror(self, request: Request, model: str, version: str, primary: bytes) -> None:
        def done(resp: Response | None, exc: BaseException | None) -> None:
            if resp is None:
                self.table.record_shadow(model, version, False, None)
                return
            ok = resp.status < 500
            self.table.record_shadow(model, version, ok, answers_agree(primary, resp.body) if ok and resp.status < 400 else None)

        self.pool.start(request.method, _path("/predictions/" + _quoted(model), version, ""), request.forward,
                        request.body, self.timeout_s, done)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
