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
from typing import Any, Awaitable, Callable, Coroutine
from urllib.parse import quote, unquote, urlsplit

from tsfleet.errors import error_body
from tsfleet.router.fronts import health
from tsfleet.router.wire.http1 import ROUTER_ERROR, Listener, Reply, Request, Response
from tsfleet.router.wire.limits import LimitCounters, RouterLimits
from tsfleet.router.keys import REFUSED_BYTES, InferenceKeys
from tsfleet.router.readiness import ModelReadiness
from tsfleet.router.policy.attempts import (CLIENT_FAULT, DROPPED, KEY_REFUSED, NOT_FOUND, OK, RENEW, RETRY, SERVER_FAULT,
                                            Routed, RoutingPolicy)
from tsfleet.router.policy.routing import RoutingTable
from tsfleet.router.wire.upstream import RestUpstreamPool, UpstreamError

log = logging.getLogger(__name__)
# TorchServe's words for a request that a dying or retiring worker dropped: safe to retry,
# since inference has no side effects.
DROPPED_MARKS = (b"Worker died", b"Worker scaled down", b"has no worker to serve inference request")
# TorchServe's frontend (Netty) reads a form body itself, before any worker, and answers one
# it cannot read 500 naming its own exception ("a=%", "&&&", a multipart body without its
# boundary): the client's fault, so the router says 400.
FORM_UNREADABLE = (b"ErrorDataDecoderException", b"StringIndexOutOfBoundsException")
JSON = [b"Content-Type: application/json"]
WORKFLOWS = "/wfpredict/"


def _retryable(status: int, body: bytes) -> bool:
    return status in (500, 503, 507) and any(marker in body for marker in DROPPED_MARKS)


def _outcome(resp: Response | None, own_key: bool) -> int:
    """What TorchServe's answer says of the arm (policy/attempts.py); ``own_key``: the router
    swapped its own key in for the client's, so a refusal of it is the router's to renew."""
    if resp is None:
        return DROPPED
    status = resp.status
    if status < 400:
        return OK
    if status == 404:
        return NOT_FOUND
    if status < 500:
        return KEY_REFUSED if own_key and status == 400 and REFUSED_BYTES in resp.body else CLIENT_FAULT
    if _retryable(status, resp.body):
        return DROPPED
    return CLIENT_FAULT if status == 500 and any(mark in resp.body for mark in FORM_UNREADABLE) else SERVER_FAULT


def _for_client(resp: Response) -> Response:
    """TorchServe's answer as the client gets it: as it is, but a 500 for a form body it could
    not read becomes the 400 it is (its message kept)."""
    if resp.status != 500 or not any(mark in resp.body for mark in FORM_UNREADABLE):
        return resp
    try:
        said = json.loads(resp.body).get("message", "")
    except (ValueError, AttributeError):
        said = ""
    return Response(400, error_body(400, f"the form body could not be read: {said}".rstrip(": ")), JSON)


def _quoted(name: str) -> str:
    """A model or version name as one path segment (a short one cached: it is the same few
    names all day; a client's long made-up ones would fill the cache with its bytes)."""
    return _quoted_short(name) if len(name) <= 128 else quote(name, safe="")


@functools.lru_cache(maxsize=4096)
def _quoted_short(name: str) -> str:
    return quote(name, safe="")


def _path(path_for: str, version: str | None, query: str) -> str:
    return path_for + "/" + _quoted(version) + query if version else path_for + query


def _with_authorization(lines: list[bytes], value: bytes) -> list[bytes]:
    return [b"Authorization: " + value if line[:14].lower() == b"authorization:" else line for line in lines]


class RestRouter:
    """Forwards inference calls to TorchServe at ``upstream``; ``start`` listens."""

    def __init__(self, table: RoutingTable, upstream: str, sticky_header: str = "X-User-Id",
                 timeout_s: float = 130, min_attempt_s: float = 2.0, latency_factor: float = 10.0,
                 max_body: int | None = None, metrics: Callable[[], Awaitable[str]] | None = None,
                 keys: InferenceKeys | None = None, readiness: ModelReadiness | None = None,
                 limits: RouterLimits | None = None, counters: LimitCounters | None = None):
        self.table, self.upstream, self.keys, self.readiness = table, upstream.rstrip("/"), keys, readiness
        self.sticky = sticky_header.lower().encode()
        self.timeout_s = timeout_s
        # The policy both fronts follow (retry, key renewal, recording, shadows).
        self.policy = RoutingPolicy(table, timeout_s, min_attempt_s, latency_factor)
        url = urlsplit(self.upstream)
        secure = url.scheme == "https"  # TorchServe configured with its own certificate
        self.pool = RestUpstreamPool(url.hostname or "127.0.0.1", url.port or (443 if secure else 80),
                                 ssl=ssl.create_default_context() if secure else None)
        # router.limits (limits.py; ``max_body``, when given, in place of its body_bytes).
        self.listener = Listener(self.handle, max_body, fast=self.route, limits=limits, counters=counters)
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

    async def _renew_key(self, request: Request) -> bool:
        """After TorchServe refused the key swapped in: swap in a fresher one, if there is one
        (once: a second refusal is the client's answer)."""
        assert self.keys is not None and request.auth is not None
        fresh, request.auth = await self.keys.refused(request.auth), None
        if fresh is None:
            return False
        request.forward = _with_authorization(request.forward, fresh)
        return True

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
            if _outcome(resp, request.auth is not None) == KEY_REFUSED and await self._renew_key(request):
                continue
            if not retried and _outcome(resp, False) == DROPPED:
                retried = True
                continue
            resp = _for_client(resp)
            if resp.status == 404 and request.path.startswith(WORKFLOWS) and b"WorkflowNotFoundException" in resp.body:
                name = request.path[len(WORKFLOWS):].partition("/")[0]
                if self.readiness is not None and name in self.readiness.workflows:
                    # The fleet declares it: TorchServe was started again and `up` (or a pod's
                    # start) has not registered it yet. Not found would be the wrong answer
                    # for a client to act on; the outage's own 503 is the right one.
                    return 503, error_body(503, f"workflow {name} is not registered in TorchServe at "
                                           f"{self.upstream} yet (started again?); try again shortly"), JSON
            return resp.status, resp.body, resp.headers

    def _unreachable(self, exc: BaseException) -> tuple[int, bytes, list[bytes]]:
        if isinstance(exc, asyncio.TimeoutError):
            return 504, error_body(504, f"no answer from TorchServe within {self.timeout_s:.0f} s"), JSON
        return 503, error_body(503, f"TorchServe is not reachable at {self.upstream}: {exc}"), JSON

    def predict(self, request: Request, model: str, explicit: str | None, query: str, reply: Reply) -> None:
        """Route one inference call; it is all callbacks (upstream.py says why), but for a key
        renewal, which waits for the key file in a task: it is rare."""
        sticky = request.headers.get(self.sticky)
        self._attempt(request, reply, self.policy.begin(model, explicit, sticky.decode("latin-1") if sticky else None),
                      query)

    def _attempt(self, request: Request, reply: Reply, call: Routed, query: str) -> None:
        def done(resp: Response | None, exc: BaseException | None) -> None:
            try:
                self._attempted(request, reply, call, query, resp, exc)
            except Exception:  # noqa: BLE001 - the client must get an answer whatever went wrong
                log.exception("router: unhandled error for %s %s", request.method, request.target)
                reply(request, ROUTER_ERROR)

        path = _path("/predictions/" + _quoted(call.model), self.policy.upstream(call), query)
        self.pool.start(request.method, path, request.forward, request.body, self.policy.attempt_timeout(call), done)

    def _attempted(self, request: Request, reply: Reply, call: Routed, query: str, resp: Response | None,
                   exc: BaseException | None) -> None:
        outcome = _outcome(resp, request.auth is not None)
        step = self.policy.after(call, outcome)
        if step == RETRY:
            self._attempt(request, reply, call, query)
            return
        if step == RENEW:
            self._spawn(self._renew_then(request, reply, call, query, resp))
            return
        self._answer(request, reply, call, outcome, resp, exc)

    async def _renew_then(self, request: Request, reply: Reply, call: Routed, query: str, refusal: Response | None) -> None:
        try:
            if await self._renew_key(request):
                self._attempt(request, reply, call, query)
            else:
                self._answer(request, reply, call, KEY_REFUSED, refusal, None)
        except Exception:  # noqa: BLE001 - the client must get an answer whatever went wrong
            log.exception("router: unhandled error for %s %s", request.method, request.target)
            reply(request, ROUTER_ERROR)

    def _answer(self, request: Request, reply: Reply, call: Routed, outcome: int, resp: Response | None,
                exc: BaseException | None) -> None:
        if resp is not None:
            resp = _for_client(resp) if outcome == CLIENT_FAULT else resp
            status, data, headers = resp.status, resp.body, resp.headers
        else:
            status, data, headers = self._unreachable(exc or UpstreamError("no answer"))
        shadow = self.policy.answered(call, outcome)
        if shadow is not None:
            self._mirror(request, call.model, shadow, data if outcome == OK else None)
        if call.version:
            headers = [*headers, b"X-Model-Version: " + call.version.encode()]
        reply(request, Response(status, data, headers))

    def _mirror(self, request: Request, model: str, version: str, primary: bytes | None) -> None:
        def done(resp: Response | None, exc: BaseException | None) -> None:
            outcome = _outcome(resp, False)
            self.policy.shadow_done(model, version, outcome, primary, resp.body if resp is not None and outcome == OK else None)

        self.pool.start(request.method, _path("/predictions/" + _quoted(model), version, ""), request.forward,
                        request.body, self.timeout_s, done)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
