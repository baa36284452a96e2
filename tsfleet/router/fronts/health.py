"""The router's own health checks, which need no TorchServe key.

TorchServe's ``/ping`` (and gRPC ``Ping``) needs the inference key, which changes at every
start and expires, so a kubelet or a load balancer cannot probe it. Through the router it is
still TorchServe's own answer; the router answers these itself:

- liveness, REST ``GET /livez`` or gRPC ``grpc.health.v1.Health/Check`` with no service
  name: the router's event loop is answering. TorchServe being down does not fail it, so a
  liveness probe never restarts a healthy router because of TorchServe.
- readiness, REST ``GET /readyz`` or the same gRPC check naming TorchServe's
  ``InferenceAPIsService``: TorchServe answers a ping at the address this side forwards to
  (any answer counts: without a key it is a refusal).
- readiness by model, REST ``GET /readyz?models=all`` (or ``?models=a,b``) or a gRPC check
  naming one model: TorchServe answers, and each model has a worker ready where its traffic
  goes (readiness.py). Opt-in: one broken model then takes the whole pod out of service.

gRPC ``Health/Watch`` (what gRPC clients' own health checking uses) streams the same two
answers: the status now, then each change.
"""
from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs

from grpc import StatusCode
from grpc_health.v1 import health_pb2

from tsfleet.errors import error_body
from tsfleet.router.wire.grpc_wire import (GRPC_TYPE, STATUS_OK, GrpcServerConnection, ServerCall, UpstreamGone,
                                           frame_message, read_message, split_messages, status_trailers)
from tsfleet.router.wire.upstream import RestUpstreamPool, UpstreamError

if TYPE_CHECKING:
    from tsfleet.router.policy.routing import RoutingTable
    from tsfleet.router.readiness import ModelReadiness
    from tsfleet.router.wire.grpc_upstream import GrpcUpstreamPool

LIVE, READY = "/livez", "/readyz"
CHECK, WATCH = b"/grpc.health.v1.Health/Check", b"/grpc.health.v1.Health/Watch"
SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
PING = f"/{SERVICE}/Ping".encode()
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
PROBE_TIMEOUT_S = 2.0  # a kubelet's probe waits 1 s by default; a slower answer is no answer
WATCH_PERIOD_S = 1.0  # how often a Watch looks again


class HealthSubject(Protocol):
    """What the gRPC health service reads of its front (grpc_front.GrpcRouter)."""

    table: RoutingTable
    pool: GrpcUpstreamPool
    readiness: ModelReadiness | None
    stopping: bool


def _json(doc: dict[str, object]) -> bytes:
    return json.dumps(doc).encode()


def alive() -> tuple[int, bytes]:
    return 200, _json({"status": "alive"})


def _error(status: int, message: str, kind: str | None = None, **more: object) -> tuple[int, bytes]:
    return status, error_body(status, message, kind, **more)


def _models_asked(query: str, readiness: ModelReadiness | None) -> tuple[list[str], bool] | tuple[int, bytes] | None:
    """The models ``/readyz?models=...`` names and whether it asks for all (the workflows
    too), None when the query asks for none; or the 4xx answer."""
    if not query:
        return None
    asked = parse_qs(query, keep_blank_values=True)
    if set(asked) != {"models"} or len(asked["models"]) != 1 or not asked["models"][0].strip(", "):
        return _error(400, "/readyz takes one query parameter, models: 'all' or model names "
                      "separated by commas (e.g. /readyz?models=all)")
    if readiness is None:
        return _error(404, "this router does not check models' readiness")
    names = [m.strip() for m in asked["models"][0].split(",") if m.strip()]
    if names == ["all"]:
        return sorted(readiness.table.routes), True
    unknown = readiness.unknown(names)
    if unknown:
        return _error(404, f"unknown model(s) {', '.join(map(repr, unknown))}: the router routes "
                      + ", ".join(sorted(readiness.table.routes)), "ModelNotFound")
    return names, False


async def rest_ready(pool: RestUpstreamPool, upstream: str, query: str = "",
                     readiness: ModelReadiness | None = None) -> tuple[int, bytes]:
    """(status, body) of ``/readyz``: 200 when TorchServe answers at ``upstream`` (and, when
    the query names models, each has a worker ready where its traffic goes), else 503."""
    asked = _models_asked(query, readiness)
    if asked is not None and isinstance(asked[0], int):
        return asked  # type: ignore[return-value]  # the 4xx answer
    try:
        await pool.request("GET", "/ping", [], b"", PROBE_TIMEOUT_S)
    except (UpstreamError, asyncio.TimeoutError) as exc:
        reason = f"no answer within {PROBE_TIMEOUT_S:.0f} s" if isinstance(exc, asyncio.TimeoutError) else str(exc)
        return _error(503, f"not ready: TorchServe is not reachable at {upstream}: {reason}")
    if asked is None or readiness is None:
        return 200, _json({"status": "ready", "torchserve": upstream})
    models, everything = asked
    found = await readiness.check(models, workflows=everything)
    more = {"workflows": found.workflows} if found.workflows is not None else {}
    if not found.ready:
        return _error(503, "not ready: " + "; ".join(found.problems), models=found.versions, **more)
    return 200, _json({"status": "ready", "torchserve": upstream, "models": found.versions, **more})


def _service(call: ServerCall) -> str | None:
    """The service a Check's HealthCheckRequest names; None when it cannot be read."""
    messages = split_messages(bytearray(call.body))  # a few bytes
    if len(messages) != 1:
        return None
    flag, payload = messages[0]
    if flag and call.plain is not None:  # decompressed, and bounded, by its connection
        flag, payload = 0, call.plain
    try:
        request = read_message(health_pb2.HealthCheckRequest, call.headers, flag, payload)
    except ValueError:  # too large or corrupt once decompressed (grpc_inflate.py): unreadable
        return None
    return None if request is None else request.service


async def _torchserve_answers(pool: GrpcUpstreamPool) -> bool:
    """Whether TorchServe answers a Ping with no key (PERMISSION_DENIED is an answer)."""
    try:
        conn = await asyncio.wait_for(pool.connection(), PROBE_TIMEOUT_S)
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", PING), (b":authority", pool.authority),
                   (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"2S")]
        up = conn.start(headers, frame_message(b""), True)
        pool.expire_after(conn, up.id, PROBE_TIMEOUT_S)
        try:
            await up.done
        finally:
            pool.settled(conn, up.id)
    except (UpstreamGone, asyncio.TimeoutError):
        return False
    return True


def _known(router: HealthSubject, service: str) -> bool:
    return service in ("", SERVICE) or (router.readiness is not None and service in router.table.routes)


async def _status(router: HealthSubject, service: str) -> int:
    """SERVING or NOT_SERVING for a service ``_known`` knows: "" (the router), SERVICE
    (TorchServe answers) or a model's name (TorchServe answers and the model is ready)."""
    if service == "":
        return SERVING
    if not await _torchserve_answers(router.pool):
        return NOT_SERVING
    if service == SERVICE or router.readiness is None:
        return SERVING
    return SERVING if (await router.readiness.check([service])).ready else NOT_SERVING


async def grpc_check(router: HealthSubject, conn: GrpcServerConnection, call: ServerCall) -> None:
    """Answer one ``grpc.health.v1.Health/Check``: "" is liveness, SERVICE readiness, a
    model's name that model's readiness."""
    try:
        code, message, status = StatusCode.OK, "", SERVING
        service = _service(call)
        if service is None:
            code, message = StatusCode.INVALID_ARGUMENT, "the router cannot read this HealthCheckRequest"
        elif not _known(router, service):
            also = " and the models it routes" if router.readiness is not None else ""
            code, message = StatusCode.NOT_FOUND, f"unknown service {service!r}: the router checks '' (itself), " \
                                                  f"{SERVICE!r}{also}"
        else:
            status = await _status(router, service)
        answer = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        conn.send(call.id, [STATUS_OK, GRPC_TYPE], frame_message(answer) if code is StatusCode.OK else None,
                  status_trailers(code, message))
    finally:
        conn.finish(call)


async def grpc_watch(router: HealthSubject, conn: GrpcServerConnection, call: ServerCall) -> None:
    """Answer one ``grpc.health.v1.Health/Watch``: the status now, then each change (looked
    at every WATCH_PERIOD_S), until the client goes away or the router stops."""
    try:
        service = _service(call)
        if service is None:
            conn.send(call.id, [STATUS_OK, GRPC_TYPE],
                      trailers=status_trailers(StatusCode.INVALID_ARGUMENT, "the router cannot read this HealthCheckRequest"))
            return
        conn.send(call.id, [STATUS_OK, GRPC_TYPE])
        last = None
        while not call.cancelled and not router.stopping:
            if not _known(router, service):
                status = SERVICE_UNKNOWN  # the protocol's answer for a name it does not know: watched, not refused
            else:
                status = await _status(router, service)
            if status != last:
                conn.send(call.id, data=frame_message(health_pb2.HealthCheckResponse(status=status).SerializeToString()))
                last = status
            await asyncio.sleep(WATCH_PERIOD_S)
        if not call.cancelled:
            conn.send(call.id, trailers=status_trailers(StatusCode.UNAVAILABLE, "the router is stopping"))
    finally:
        conn.finish(call)
