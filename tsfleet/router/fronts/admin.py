"""The router's admin API: read and change routes live. Loopback only, token-protected.

The token is made at first start and kept as ``admin`` in ``router_key.json`` (mode 0600)
beside the state file; send it as ``Authorization: Bearer <key>``.
"""
from __future__ import annotations

import asyncio
import math
import secrets
from typing import Any, Awaitable, Callable

from aiohttp import web

from tsfleet.errors import FleetError, error_doc, http_answer
from tsfleet.router.fronts.admin_site import AdminConnections
from tsfleet.router.policy.manifest_routes import check_fleet_routes, take_fleet
from tsfleet.router.policy.routing import RoutingTable
from tsfleet.router.wire.limits import DEFAULT_LIMITS, RouterLimits

MAX_GRACE_S = 30 * 86400


def _error(status: int, message: str) -> web.Response:
    return web.json_response(error_doc(status, message), status=status)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _version(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _checked_change(doc: dict[str, Any], weights_now: dict[str, float]) -> tuple[
        dict[str, float], str | None, tuple[str | None, float], dict[str, str]]:
    """A PUT /routes/{model} body's weights, baseline, shadow (version, share) and aliases,
    or ValueError naming the first part that is not what the route can take."""
    weights = doc.get("weights", weights_now)
    if not isinstance(weights, dict) or not all(_version(v) and _number(w) for v, w in weights.items()):
        raise ValueError("weights must map version strings to numbers")
    baseline = doc.get("baseline")
    if baseline is not None and not _version(baseline):
        raise ValueError("baseline must be a version string")
    shadow = doc.get("shadow") or {}
    if not isinstance(shadow, dict):
        raise ValueError('shadow must be {"version": version, "share": 0..1} or null')
    version, share = shadow.get("version"), shadow.get("share", 0.0)
    if (version is not None and not _version(version)) or not _number(share) or not 0 <= share <= 1:
        raise ValueError('shadow must be {"version": version, "share": 0..1} or null')
    aliases = doc.get("aliases", {})
    if not isinstance(aliases, dict) or not all(_version(k) and _version(v) for k, v in aliases.items()):
        raise ValueError("aliases must map version strings to version strings")
    return {v: float(w) for v, w in weights.items()}, baseline, (version, float(share)), aliases


class AdminApi:
    """GET /routes, PUT /routes/{model}, POST /routes/{model}/rollback, PUT /fleet, POST /keys/inference."""

    def __init__(self, table: RoutingTable, key: str, limits: RouterLimits = DEFAULT_LIMITS):
        self.table, self.key = table, key
        # Its connections, served by admin_site.DeadlineSite: deadlines on heads and bodies.
        self.connections = AdminConnections(limits)
        # With several router processes: wait until every one routes by a change made here.
        self.settled: Callable[[], Awaitable[None]] | None = None
        self.app = web.Application(middlewares=[self._auth])
        self.app.add_routes([
            web.get("/routes", self.list_routes),
            web.put("/routes/{model}", self.update),
            web.post("/routes/{model}/rollback", self.rollback),
            web.put("/fleet", self.take_fleet),
            web.post("/keys/inference", self.rotate_key),
        ])
        # Told of each manifest taken (PUT /fleet): the router checks a routes file against it.
        self.fleet_taken: Callable[[dict[str, dict[str, Any]]], None] | None = None
        # Set by the router when it swaps its own inference key for TorchServe's (keys.py).
        self.rotate: Callable[[float], Awaitable[dict[str, Any]]] | None = None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        conn = self.connections.of(request)
        if conn is not None:
            conn.head_done()
        try:
            if not secrets.compare_digest(request.headers.get("Authorization", ""), f"Bearer {self.key}"):
                return _error(401, "admin token missing or wrong (see router_key.json)")
            coding = request.headers.get("Content-Encoding", "identity").strip().lower()
            if coding != "identity":  # no client of the admin API compresses; a coding is a bomb's way in
                return _error(415, f"the admin API takes no Content-Encoding (got {coding[:40]!r}): send the "
                                   "body as it is")
            if conn is not None and request.can_read_body:
                # Read here, within the body deadline (aiohttp has none); handlers get it from
                # aiohttp's cache. Its size limit (client_max_size) is checked as it is read.
                timeout = self.connections.limits.body_timeout_s
                try:
                    await asyncio.wait_for(request.read(), timeout)
                except asyncio.TimeoutError:
                    return _error(408, f"the request body was not received whole within {timeout:g} s")
            return await handler(request)
        except FleetError as exc:
            # A change the router could not save (its routes or keys file refused by a full
            # or read-only disk): the status the error's class names (507) and its own words,
            # not aiohttp's bare 500.
            status, body = http_answer(exc)
            return web.Response(status=status, body=body, content_type="application/json", charset="utf-8")
        finally:
            if conn is not None:
                conn.answered(request.content.at_eof())

    async def list_routes(self, request: web.Request) -> web.Response:
        return web.json_response(self.table.snapshot())

    async def update(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.table.routes:
            return _error(404, f"no route for model {model!r} (models: {', '.join(sorted(self.table.routes))})")
        try:
            doc = await request.json()
        except ValueError:
            return _error(400, "body must be JSON")
        if not isinstance(doc, dict) or not set(doc) <= {"weights", "baseline", "shadow", "aliases"} or not doc:
            return _error(400, 'expected {"weights": {version: 0..100}, "baseline": version, "shadow": {...}, '
                                 '"aliases": {version: torchserve_version}}')
        try:
            # Every part is checked before any is applied: a refused change leaves the route
            # as it was (a bad shadow after good weights used to keep the weights), and
            # nothing but version strings and finite numbers reaches the routes, which the
            # request path and GET /routes (strict JSON: no NaN) rely on.
            weights, baseline, shadow, aliases = _checked_change(doc, self.table.routes[model].weights)
            with self.table.taken_back_on_failure(model):  # a save the disk refuses: none of it holds
                if "weights" in doc or "baseline" in doc:
                    self.table.set_weights(model, weights, baseline)
                if "shadow" in doc:
                    self.table.set_shadow(model, *shadow)
                if "aliases" in doc:
                    self.table.set_aliases(model, aliases)
        except (ValueError, TypeError) as exc:
            return _error(400, f"{model}: {exc}")
        if self.settled is not None:
            await self.settled()
        return web.json_response(self.table.snapshot()[model])

    async def rollback(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        route = self.table.routes.get(model)
        if route is None:
            return _error(404, f"no route for model {model!r}")
        candidates = [v for v, w in route.weights.items() if v != route.baseline and w > 0]
        for version in candidates:
            self.table.roll_back(model, version, "rolled back by hand")
        if self.settled is not None:
            await self.settled()
        return web.json_response(self.table.snapshot()[model])

    async def take_fleet(self, request: web.Request) -> web.Response:
        """Bring the routes to the manifest's models (manifest_routes.py); answers what changed."""
        try:
            specs = check_fleet_routes(await request.json())
            changes = take_fleet(self.table, specs)
        except (ValueError, TypeError) as exc:  # not JSON, not the expected shape
            return _error(400, f"PUT /fleet: {exc}")
        if self.fleet_taken is not None:
            self.fleet_taken(specs)
        if self.settled is not None:
            await self.settled()
        return web.json_response({"changes": changes})

    async def rotate_key(self, request: web.Request) -> web.Response:
        """A new router inference key; the old one is taken ``grace_s`` more seconds (default 3600)."""
        if self.rotate is None:
            return _error(409, "this router takes no key of its own: it was started without TorchServe's "
                               "key file (--key-file)")
        try:
            # Read already by the middleware (within its deadline): can_read_body is False then.
            doc = await request.json() if await request.read() else {}
        except ValueError:
            return _error(400, "body must be JSON")
        grace = doc.get("grace_s", 3600) if isinstance(doc, dict) else None
        if not isinstance(grace, (int, float)) or isinstance(grace, bool) or not 0 <= grace <= MAX_GRACE_S:
            return _error(400, f'expected {{"grace_s": 0..{MAX_GRACE_S}}} (seconds the old key is still taken)')
        return web.json_response(await self.rotate(float(grace)))
