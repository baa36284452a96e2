"""One routed gRPC prediction (unary Predictions), carried by callbacks from request to answer.

A GPU answers a batch at once and the router passes the answers on one after another, so
its CPU per answer is paid again by each answer behind it (upstream.py says more). A
prediction therefore costs no task, coroutine or future of its own: it starts in the
callback that read the request's last frame, and the answer is checked, recorded and sent
in the callback that read TorchServe's trailers. A retry is the same again; only a missing
upstream connection waits in a task, while it is made.
"""
from __future__ import annotations

import logging
from typing import Any, Coroutine, Protocol

from grpc import StatusCode

from tsfleet.router.keys import REFUSED
from tsfleet.router.policy.attempts import OK as OK_OUTCOME
from tsfleet.router.policy.attempts import (CLIENT_FAULT, DROPPED, KEY_REFUSED, NOT_FOUND, RENEW, RETRY, SERVER_FAULT,
                                            Routed, RoutingPolicy)
from tsfleet.router.wire.grpc_upstream import GrpcUpstreamPool, UpstreamCall
from tsfleet.router.wire.grpc_wire import NOT_FOUND_MARKS, GrpcServerConnection, ServerCall, UpstreamGone
from tsfleet.router.wire.h2frames import Data
from tsfleet.router.wire.hpack_codec import Header

log = logging.getLogger(__name__)
# TorchServe's words for a request that never reached a worker or lost its worker: safe to
# retry, since inference has no side effects. 0.12 sends "Worker died." after a kill, as
# INTERNAL, or RESOURCE_EXHAUSTED once it has seen exit code 137; "has no worker" means the
# request never reached one; "Worker scaled down" keeps parity with the REST side.
DROPPED_MARKS = ("Worker died", "Worker scaled down", "has no worker to serve inference request")
# TorchServe appends its exception class to every error it sends; transport errors lack it.
FROM_TORCHSERVE = "org.pytorch.serve"
# The codes that say the server failed (any other failure is the client's). A tuple, not a
# set: ``in`` finds a member by identity, where a set would call Enum's __hash__ (Python).
SERVER_SIDE = (StatusCode.INTERNAL, StatusCode.UNAVAILABLE, StatusCode.UNKNOWN, StatusCode.DEADLINE_EXCEEDED,
               StatusCode.DATA_LOSS)
# Module names for the codes read for every answer: cheaper than StatusCode.X (a metaclass look-up).
_OK, _UNAVAILABLE, _PERMISSION_DENIED = StatusCode.OK, StatusCode.UNAVAILABLE, StatusCode.PERMISSION_DENIED


def not_found(message: str) -> bool:
    """No such model or version (TorchServe answers it INTERNAL, naming its exception)."""
    return any(m in message for m in NOT_FOUND_MARKS)


def outcome(code: StatusCode, message: str) -> int:
    """What TorchServe's answer says of the arm (policy/attempts.py). KEY_REFUSED is the
    router's to renew only if it swapped its own key in (``Host.own_key``); else the client's."""
    if code is _OK:
        return OK_OUTCOME
    if any(m in message for m in DROPPED_MARKS) or (code is _UNAVAILABLE and FROM_TORCHSERVE not in message):
        return DROPPED  # a dropped request is retryable whatever the code (RESOURCE_EXHAUSTED after a SIGKILL)
    if not_found(message):
        return NOT_FOUND
    if code is _PERMISSION_DENIED and REFUSED in message:
        return KEY_REFUSED
    return SERVER_FAULT if code in SERVER_SIDE else CLIENT_FAULT


class Host(Protocol):
    """What a prediction needs of its front (grpc_front.GrpcRouter)."""

    policy: RoutingPolicy
    pool: GrpcUpstreamPool

    def spawn(self, conn: GrpcServerConnection, call: ServerCall, work: Coroutine[Any, Any, None]) -> None: ...

    def message_for(self, model: str, payload: bytes | memoryview, version: str | None, whole: bool = False) -> Data: ...

    def unreachable(self, exc: Exception | None) -> str: ...

    def abort(self, conn: GrpcServerConnection, call: ServerCall) -> None: ...

    def send(self, conn: GrpcServerConnection, call: ServerCall, up: UpstreamCall | None, version: str | None,
             error: str = "") -> None: ...

    def own_key(self, call: ServerCall) -> bool: ...

    async def renewed_key(self, sent: list[Header]) -> list[Header] | None: ...

    def mirror(self, model: str, version: str, headers: list[Header], payload: bytes | memoryview,
               primary: bytes | None) -> None: ...


class Prediction:
    """A client's Predictions call: routed, tried, retried once if TorchServe dropped it, answered."""

    __slots__ = ("host", "conn", "call", "routed", "headers", "payload", "upstream")

    def __init__(self, host: Host, conn: GrpcServerConnection, call: ServerCall, routed: Routed,
                 headers: list[Header], payload: bytes | memoryview):
        self.host, self.conn, self.call, self.routed = host, conn, call, routed
        self.headers, self.payload = headers, payload
        self.upstream: tuple | None = None

    def attempt(self) -> None:
        """Send this attempt upstream; ``answered`` takes it from there."""
        host, routed = self.host, self.routed
        upstream = host.pool.ready()
        if upstream is None:
            host.spawn(self.conn, self.call, self._connect_then_attempt())
            return
        up = upstream.start(self.headers, host.message_for(routed.model, self.payload, routed.version), True,
                            then=self.answered)
        self.upstream = self.call.upstream = (upstream, up.id)
        if not routed.retried:
            # A job lost with its worker is never answered: the first attempt is given up
            # after many times the arm's p99 and retried (see RoutingTable).
            host.pool.expire_after(upstream, up.id, host.policy.attempt_timeout(routed))

    async def _connect_then_attempt(self) -> None:
        try:
            await self.host.pool.connection()
        except UpstreamGone as exc:
            self.answered(None, exc)
            return
        if not self.call.cancelled:  # the client may have given up while the connection was made
            self.attempt()

    def answered(self, up: UpstreamCall | None, error: UpstreamGone | None) -> None:
        """TorchServe's answer (or why there is none): answer, retry or renew the key."""
        host, call = self.host, self.call
        try:
            if self.upstream is not None:
                host.pool.settled(*self.upstream)
                self.upstream = call.upstream = None
            if call.cancelled:
                return
            if error is not None or up is None:
                up, code, message = None, _UNAVAILABLE, host.unreachable(error)
            else:
                code, message = up.status()
            result = outcome(code, message)
            if result == KEY_REFUSED and not host.own_key(call):
                result = CLIENT_FAULT  # the client's own key, refused: its answer
            step = host.policy.after(self.routed, result)
            if step == RETRY:
                self.attempt()
            elif step == RENEW:
                host.spawn(self.conn, call, self._renew_then_attempt(up, code, message))
            else:
                self._answer(up, result, message)
        except Exception:  # noqa: BLE001 - a bug of the router's must not leave the client waiting
            log.exception("gRPC prediction for %s failed in the router", self.routed.model)
            host.abort(self.conn, call)

    async def _renew_then_attempt(self, up: UpstreamCall | None, code: StatusCode, message: str) -> None:
        fresh = await self.host.renewed_key(self.headers)
        if self.call.cancelled:
            return
        if fresh is None:
            self._answer(up, KEY_REFUSED, message)
            return
        self.headers = fresh
        self.attempt()

    def _answer(self, up: UpstreamCall | None, result: int, message: str) -> None:
        """Record the answer on its arm and send it to the client (then mirror it to a shadow)."""
        host, call, routed = self.host, self.call, self.routed
        shadow = host.policy.answered(routed, result)
        host.send(self.conn, call, up, routed.version, message)
        self.conn.finish(call)
        if shadow is not None:
            host.mirror(routed.model, shadow, self.headers, self.payload,
                        bytes(up.body) if up is not None and result == OK_OUTCOME else None)
