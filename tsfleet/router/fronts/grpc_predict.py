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
import time
from typing import TYPE_CHECKING

from tsfleet.router.wire.grpc_upstream import UpstreamCall
from tsfleet.router.wire.grpc_wire import NOT_FOUND_MARKS, OK, UNAVAILABLE, ServerCall, ServerConnection, UpstreamGone, header
from tsfleet.router.wire.hpack_codec import Header
from tsfleet.router.keys import REFUSED
from tsfleet.router.policy.routing import Choice

if TYPE_CHECKING:
    from tsfleet.router.fronts.grpc_front import GrpcRouter

log = logging.getLogger(__name__)
# TorchServe's words for a request that never reached a worker or lost its worker: safe to
# retry, since inference has no side effects. 0.12 sends "Worker died." after a kill, as
# INTERNAL, or RESOURCE_EXHAUSTED once it has seen exit code 137; "has no worker" means the
# request never reached one; "Worker scaled down" keeps parity with the REST side.
DROPPED = ("Worker died", "Worker scaled down", "has no worker to serve inference request")
# TorchServe appends its exception class to every error it sends; transport errors lack it.
FROM_TORCHSERVE = "org.pytorch.serve"
SERVER_SIDE = {13, 14, 2, 4, 15}  # INTERNAL, UNAVAILABLE, UNKNOWN, DEADLINE_EXCEEDED, DATA_LOSS
PERMISSION_DENIED = 7


def refused_own_key(router: GrpcRouter, call: ServerCall, code: int, message: str) -> bool:
    """TorchServe refused the key the router swapped in for its own (keys.py); a wrong key
    of the client's own is the client's answer."""
    keys = router.keys
    return code == PERMISSION_DENIED and REFUSED in message and keys is not None \
        and keys.swap(header(call.headers, b"authorization")) is not None


async def renewed_key(router: GrpcRouter, sent: list[Header]) -> list[Header] | None:
    """After ``refused_own_key``: the headers to try once more with, or None (nothing fresher)."""
    assert router.keys is not None
    fresh = await router.keys.refused(header(sent, b"authorization") or b"")
    if fresh is None:
        return None
    return [(name, fresh if name == b"authorization" else value) for name, value in sent]


def retryable(code: int, message: str) -> bool:
    return code != OK and (any(m in message for m in DROPPED)
                           or (code == UNAVAILABLE and FROM_TORCHSERVE not in message))


def not_found(message: str) -> bool:
    """No such model or version: not an arm (recorded, it would add a /metrics series per made-up name)."""
    return any(m in message for m in NOT_FOUND_MARKS)


def server_side(code: int, message: str) -> bool:
    # A dropped request is the arm's failure whatever the code (RESOURCE_EXHAUSTED after a SIGKILL).
    return any(m in message for m in DROPPED) or (code in SERVER_SIDE and not not_found(message))


class Prediction:
    """A client's Predictions call: routed, tried, retried once if TorchServe dropped it, answered."""

    __slots__ = ("router", "conn", "call", "model", "choice", "version", "headers", "payload", "started",
                 "retried", "renewed", "upstream")

    def __init__(self, router: GrpcRouter, conn: ServerConnection, call: ServerCall, model: str, choice: Choice,
                 headers: list[Header], payload: bytes | memoryview):
        self.router, self.conn, self.call, self.model, self.choice = router, conn, call, model, choice
        self.version, self.headers, self.payload = choice.version, headers, payload
        self.started, self.retried, self.renewed = time.perf_counter(), False, False
        self.upstream: tuple | None = None

    def attempt(self) -> None:
        """Send this attempt upstream; ``answered`` takes it from there."""
        router = self.router
        upstream = router.pool.ready()
        if upstream is None:
            router.spawn(self.conn, self.call, self._connect_then_attempt())
            return
        up = upstream.start(self.headers, router.message_for(self.model, self.payload, self.version), True,
                            then=self.answered)
        self.upstream = self.call.upstream = (upstream, up.id)
        if not self.retried:
            # A job lost with its worker is never answered: the first attempt is given up
            # after many times the arm's p99 and retried (see RoutingTable).
            router.pool.expire_after(upstream, up.id, router.table.attempt_timeout(
                self.model, self.version, router.timeout_s, router.min_attempt_s, router.latency_factor))

    async def _connect_then_attempt(self) -> None:
        try:
            await self.router.pool.connection()
        except UpstreamGone as exc:
            self.answered(None, exc)
            return
        if not self.call.cancelled:  # the client may have given up while the connection was made
            self.attempt()

    def answered(self, up: UpstreamCall | None, error: UpstreamGone | None) -> None:
        try:
            self._answered(up, error)
        except Exception:  # noqa: BLE001 - a bug of the router's must not leave the client waiting
            log.exception("gRPC prediction for %s failed in the router", self.model)
            self.router.abort(self.conn, self.call)

    def _answered(self, up: UpstreamCall | None, error: UpstreamGone | None) -> None:
        router, table, call = self.router, self.router.table, self.call
        if self.upstream is not None:
            router.pool.settled(*self.upstream)
            self.upstream = call.upstream = None
        if call.cancelled:
            return
        if error is not None or up is None:
            up, code, message = None, UNAVAILABLE, router.unreachable(error)
        else:
            code, message = up.status()
        if code == PERMISSION_DENIED and not self.renewed and refused_own_key(router, call, code, message):
            self.renewed = True  # once: a second refusal is the client's answer
            router.spawn(self.conn, call, self._renew_then_attempt(up, code, message))
            return
        if not self.retried and retryable(code, message):
            # The client will not see this failure, but the arm's record must.
            table.record(self.model, self.version, False, time.perf_counter() - self.started)
            choice = self.choice  # the baseline, unless the client named the version itself
            self.version = choice.version if choice.explicit else table.alternate(self.model, choice.version)
            self.retried = True
            self.attempt()
            return
        self._answer(up, code, message)

    async def _renew_then_attempt(self, up: UpstreamCall, code: int, message: str) -> None:
        fresh = await renewed_key(self.router, self.headers)
        if self.call.cancelled:
            return
        if fresh is None:
            self._answer(up, code, message)
            return
        self.headers = fresh
        self.attempt()

    def _answer(self, up: UpstreamCall | None, code: int, message: str) -> None:
        """Record the answer on its arm and send it to the client (then mirror it to a shadow)."""
        router, table, call = self.router, self.router.table, self.call
        if not not_found(message):
            ok = code == OK or not server_side(code, message)
            event = table.record(self.model, self.version, ok, time.perf_counter() - self.started, self.retried)
            if event:
                log.warning("rolled back %s %s: %s", self.model, event["version"], event["reason"])
        router.send(self.conn, call, up, self.version, message)
        self.conn.finish(call)
        if self.choice.shadow and up is not None and code == OK:
            router.mirror(self.model, self.choice.shadow, self.headers, self.payload, bytes(up.body))

