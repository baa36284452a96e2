"""The router's own health checks, which need no TorchServe key.

TorchServe's ``/ping`` (and gRPC ``Ping``) needs the inference key, which changes at every
start and expires, so a kubelet or a load balancer cannot probe it. Through the router it is
still TorchServe's own answer; the router answers these itself:

- liveness, REST ``GET /livez`` or gRPC ``grpc.health.v1.Health/Check`` with no service
  name: the router's event loop is answering. TorchServe being down does not fail it, so a
  liveness probe never restarts a healthy router because of TorchServe.
- readiness, REST ``GET /readyz`` or the same gRPC check naming TorchServe's
  ``InferenceAPIsService``: TorchServe answers a ping at the address this side forwards to
  (any answer counts: without a key it is a refusal). Whether every model has a worker is
  TorchServe's ``/ping`` with a key, or ``tsfleet status``.

gRPC ``Health/Watch`` (what gRPC clients' own health checking uses) streams the same two
answers: the status now, then each change.
"""
from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2

from tsfleet.router.grpc_wire import (GRPC_TYPE, INVALID_ARGUMENT, NOT_FOUND, OK, STATUS_OK, UNAVAILABLE, ServerCall,
                                      ServerConnection, UpstreamGone, frame_message, read_message, split_messages,
                                      status_trailers)
from tsfleet.router.upstream import UpstreamError, UpstreamPool

if TYPE_CHECKING:
    from tsfleet.router.grpc_front import GrpcRouter
    from tsfleet.router.grpc_upstream import UpstreamPool as GrpcPool

LIVE, READY = "/livez", "/readyz"
CHECK, WATCH = b"/grpc.health.v1.Health/Check", b"/grpc.health.v1.Health/Watch"
SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
PING = f"/{SERVICE}/Ping".encode()
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
PROBE_TIMEOUT_S = 2.0  # a kubelet's probe waits 1 s by default; a slower answer is no answer
WATCH_PERIOD_S = 1.0  # how often a Watch looks again


def _json(doc: dict[str, object]) -> bytes:
    return json.dumps(doc).encode()


def alive() -> tuple[int, bytes]:
    return 200, _json({"status": "alive"})


async def rest_ready(pool: UpstreamPool, upstream: str) -> tuple[int, bytes]:
    """(status, body) of ``/readyz``: 200 when TorchServe answers at ``upstream``, else 503."""
    try:
        await pool.request("GET", "/ping", [], b"", PROBE_TIMEOUT_S)
    except (UpstreamError, asyncio.TimeoutError) as exc:
        reason = f"no answer within {PROBE_TIMEOUT_S:.0f} s" if isinstance(exc, asyncio.TimeoutError) else str(exc)
        return 503, _json({"code": 503, "type": "ServiceUnavailable",
                           "message": f"not ready: TorchServe is not reachable at {upstream}: {reason}"})
    return 200, _json({"status": "ready", "torchserve": upstream})


def _service(call: ServerCall) -> str | None:
    """The service a Check's HealthCheckRequest names; None when it cannot be read."""
    messages = split_messages(bytearray(call.body))  # a few bytes
    if len(messages) != 1:
        return None
    request = read_message(health_pb2.HealthCheckRequest, call.headers, *messages[0])
    return None if request is None else request.service


async def _torchserve_answers(pool: GrpcPool) -> bool:
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


async def grpc_check(router: GrpcRouter, conn: ServerConnection, call: ServerCall) -> None:
    """Answer one ``grpc.health.v1.Health/Check``: "" is liveness, SERVICE readiness."""
    try:
        code, message, status = OK, "", SERVING
        service = _service(call)
        if service is None:
            code, message = INVALID_ARGUMENT, "the router cannot read this HealthCheckRequest"
        elif service not in ("", SERVICE):
            code, message = NOT_FOUND, f"unknown service {service!r}: the router checks '' (itself) and {SERVICE!r}"
        elif service == SERVICE and not await _torchserve_answers(router.pool):
            status = NOT_SERVING
        answer = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        conn.send(call.id, [STATUS_OK, GRPC_TYPE], frame_message(answer) if code == OK else None,
                  status_trailers(code, message))
    finally:
        conn.finish(call)


async def grpc_watch(router: GrpcRouter, conn: ServerConnection, call: ServerCall) -> None:
    """Answer one ``grpc.health.v1.Health/Watch``: the status now, then each change (looked
    at every WATCH_PERIOD_S), until the client goes away or the router stops."""
    try:
        service = _service(call)
        if service is None:
            conn.send(call.id, [STATUS_OK, GRPC_TYPE],
                      trailers=status_trailers(INVALID_ARGUMENT, "the router cannot read this HealthCheckRequest"))
            return
        conn.send(call.id, [STATUS_OK, GRPC_TYPE])
        last = None
        while not call.cancelled and not router.stopping:
            if service not in ("", SERVICE):
                status = SERVICE_UNKNOWN  # the protocol's answer for a name it does not know: watched, not refused
            else:
                status = SERVING if service == "" or await _torchserve_answers(router.pool) else NOT_SERVING
            if status != last:
                conn.send(call.id, data=frame_message(health_pb2.HealthCheckResponse(status=status).SerializeToString()))
                last = status
            await asyncio.sleep(WATCH_PERIOD_S)
        if not call.cancelled:
            conn.send(call.id, trailers=status_trailers(UNAVAILABLE, "the router is stopping"))
    finally:
        conn.finish(call)
