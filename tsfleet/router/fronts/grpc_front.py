"""The router's gRPC side: TorchServe's InferenceAPIsService, routed, retried once, measured.

Clients generated from TorchServe's own inference.proto call it unchanged (same service,
messages, metadata and status codes); the chosen version comes back as initial metadata
``x-model-version``. Messages pass through as bytes: the router reads a request's model
name and appends the chosen ``model_version`` (protobuf keeps the last value of a field),
and reads nothing of an answer but its status (and, for a shadow, its prediction).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine

from google.protobuf.message import DecodeError
from grpc import StatusCode

from tsfleet.router.fronts import health
from tsfleet.router.fronts.grpc_predict import KEY_REFUSED, OK_OUTCOME, Prediction, outcome
from tsfleet.router.fronts.grpc_streams import PING, PREDICT, STREAM, StreamCalls
from tsfleet.router.wire.grpc_upstream import GrpcUpstreamPool, UpstreamCall
from tsfleet.router.wire.grpc_wire import (GRPC_TYPE, STATUS_OK, GrpcServerConnection, ServerCall, UpstreamGone, header,
                                           read_message, split_messages, status_trailers)
from tsfleet.router.wire.grpc_answers import Relay, answer_headers
from tsfleet.router.wire.h2frames import INTERNAL_ERROR, Data
from tsfleet.router.wire.hpack_codec import Encoded, Header
from tsfleet.router.wire.limits import DEFAULT_LIMITS, LimitCounters, RouterLimits
from tsfleet.router.keys import InferenceKeys
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.wire.protoscan import request_names
from tsfleet.router.readiness import ModelReadiness
from tsfleet.router.policy.attempts import DROPPED, RoutingPolicy
from tsfleet.router.policy.routing import RoutingTable

log = logging.getLogger(__name__)
NOT_A_REQUEST = "the message is not a PredictionsRequest (or not in the grpc-encoding the call names)"
BUFFERED = {PREDICT, STREAM, PING, health.CHECK, health.WATCH}  # one request message: read whole, then routed
LARGE_MESSAGE = 64 * 1024  # a request this big goes upstream in pieces, not joined


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _prediction(body: bytes) -> bytes | None:
    messages = split_messages(bytearray(body))
    if len(messages) != 1 or messages[0][0]:
        return None
    try:
        return pb.PredictionResponse.FromString(messages[0][1]).prediction
    except DecodeError:
        return None


class GrpcRouter(StreamCalls):
    """Serves the routed service and forwards every call to TorchServe's gRPC port at ``upstream``."""

    max_held = 64 * 2**20  # of a request stream, waiting for TorchServe to read it

    def __init__(self, table: RoutingTable, upstream: str, sticky_key: str = "x-user-id", timeout_s: float = 130,
                 min_attempt_s: float = 2.0, latency_factor: float = 10.0, keys: InferenceKeys | None = None,
                 readiness: ModelReadiness | None = None, limits: RouterLimits | None = None,
                 counters: LimitCounters | None = None):
        self.table, self.upstream, self.keys, self.readiness = table, upstream, keys, readiness
        # router.limits (limits.py), handed to every client connection; None: their defaults.
        self.limits, self.counters = limits, counters if counters is not None else LimitCounters()
        if limits is not None:
            self.max_held = limits.held_bytes
        self.timeout_s = timeout_s
        # The policy both fronts follow (retry, key renewal, recording, shadows).
        self.policy = RoutingPolicy(table, timeout_s, min_attempt_s, latency_factor)
        host, _, port = upstream.rpartition(":")
        self.pool = GrpcUpstreamPool(host or "127.0.0.1", int(port))
        self.sticky = sticky_key.lower().encode()
        self.default_timeout = f"{int(timeout_s)}S".encode()  # when the client sets no deadline
        self.connections: set[GrpcServerConnection] = set()
        self.stopping = False
        self.server: asyncio.base_events.Server | None = None
        self._calls: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()
        # By version: (TorchServe's header and trailer lists, what the client gets of them); send().
        self._answers: dict[str | None, tuple[list[Header] | None, list[Header], Encoded, Encoded]] = {}

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: GrpcServerConnection(self, self.connections, self.limits, self.counters), host, port,
            reuse_port=reuse_port or None)
        return self.server.sockets[0].getsockname()[1]

    # ------------------------------------------------------------ dispatch
    def opened(self, conn: GrpcServerConnection, call: ServerCall) -> None:
        if call.path not in BUFFERED:
            call.queue = asyncio.Queue()
            self.spawn(conn, call, self._relay(conn, call))

    def ended(self, conn: GrpcServerConnection, call: ServerCall) -> None:
        """A call with one request message (Predictions, StreamPredictions, Ping) is whole."""
        try:
            if call.path in (health.CHECK, health.WATCH):  # the router's own, not TorchServe's
                self.spawn(conn, call, (health.grpc_check if call.path == health.CHECK else health.grpc_watch)(
                    self, conn, call))
                return
            readable = self._readable(call) if call.path != PING else None
            if readable.__class__ is not tuple:
                if isinstance(readable, str) and call.path in (PREDICT, STREAM):
                    # Bytes that are no PredictionsRequest: the client's fault, said as such
                    # (TorchServe would answer UNKNOWN or INTERNAL, blaming the server).
                    conn.send(call.id, [STATUS_OK, GRPC_TYPE],
                              trailers=status_trailers(StatusCode.INVALID_ARGUMENT, readable))
                    conn.finish(call)
                else:  # Ping, or a method only TorchServe can judge
                    self.spawn(conn, call, self._pass(conn, call))
                return
            model, asked, payload, decompressed = readable
            route = self.table.routes.get(model)
            if call.path == STREAM and (route is None or route.streaming):
                self.spawn(conn, call, self._stream(conn, call, model, asked, payload, decompressed))
                return
            # TorchServe 0.12 kills the worker (failing its whole batch) when a handler that
            # does not stream gets a stream; the answer of such a model is one message anyway.
            headers, sticky = self._forwarded(conn, call, decompressed)
            routed = self.policy.begin(model, asked, sticky.decode("latin-1") if sticky else None)
            Prediction(self, conn, call, routed, headers, payload).attempt()
        except Exception:  # a bug of the router's must not take the client's connection down
            log.exception("gRPC call to %s failed in the router", call.path.decode(errors="replace"))
            self.abort(conn, call)

    def spawn(self, conn: GrpcServerConnection, call: ServerCall, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` for ``call`` as a task; a router bug in it resets the call."""
        task = asyncio.get_running_loop().create_task(self._guarded(conn, call, work))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    @staticmethod
    async def _guarded(conn: GrpcServerConnection, call: ServerCall, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:  # a bug of the router's must not leave the client waiting for its deadline
            log.exception("gRPC call to %s failed in the router", call.path.decode(errors="replace"))
            GrpcRouter.abort(conn, call)

    @staticmethod
    def abort(conn: GrpcServerConnection, call: ServerCall) -> None:
        """End a call the router failed (INTERNAL_ERROR, unless it was answered already)."""
        if call.id in conn.windows:  # not answered yet
            conn.reset(call.id, INTERNAL_ERROR)
        conn.finish(call)

    # ------------------------------------------------------------- helpers
    def _headers(self, call: ServerCall, path: bytes, decompressed: bool = False) -> tuple[list[Header], bytes | None]:
        """The upstream call's headers: the client's metadata (the Authorization key above
        all); and the sticky key's value, found on the way (one pass over the client's list)."""
        out = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", self.pool.authority)]
        deadline, sticky, sticky_name = False, None, self.sticky
        for name, value in call.headers:
            if name == sticky_name and sticky is None:
                sticky = value
            # A client's content-length no longer holds once the version is appended (TorchServe
            # then resets the call: h2load and nghttp send one, grpcio does not).
            if name[0] == 58 or name == b"content-length" or (decompressed and name == b"grpc-encoding"):
                continue
            deadline = deadline or name == b"grpc-timeout"
            if name == b"authorization" and self.keys is not None:
                value = self.keys.swap(value) or value  # the router's own key: TorchServe's instead
            out.append((name, value))
        if not deadline:
            out.append((b"grpc-timeout", self.default_timeout))
        return out, sticky

    def _forwarded(self, conn: GrpcServerConnection, call: ServerCall, decompressed: bool) -> tuple[list[Header], bytes | None]:
        """``_headers`` for a Predictions call, encoded once per connection: a client sends the
        same metadata with every call, which its decoder gives as the same list (hpack_codec),
        and building and encoding the upstream list was a twentieth of a routed call's CPU.
        Remembered only while the keys the swap read stay as they are, and never for a key
        a rotation replaced (its grace ends with time, not with a change here)."""
        keys, memo, sent = self.keys, conn.remembered, call.headers
        if memo is not None and memo[0] is sent and memo[1] == decompressed and memo[2] is not None and (
                keys is None or (memo[4] is keys.current and memo[5] is keys.presented and memo[6] is keys.previous)):
            return memo[2], memo[3]
        headers, sticky = self._headers(call, PREDICT, decompressed)
        if memo is None or memo[0] is not sent:
            # Seen once: remembered from the second time (a client whose metadata changes
            # with every call, a grpc-timeout counting down, would pay for it every call).
            conn.remembered = (sent, decompressed, None, None, None, None, None)
            return headers, sticky
        headers = Encoded(headers)
        presented = header(sent, b"authorization")
        if keys is None:
            conn.remembered = (sent, decompressed, headers, sticky, None, None, None)
        elif presented is None or keys.is_current(presented) or keys.swap(presented) is None:
            conn.remembered = (sent, decompressed, headers, sticky, keys.current, keys.presented, keys.previous)
        return headers, sticky

    def _request(self, call: ServerCall, flag: int, payload: bytes | memoryview) -> pb.PredictionsRequest | None:
        """The request, readable; None when it is not. A call's one message arrives decompressed
        by its connection (``call.plain``, bounded there); a sequence's messages are
        decompressed here, to at most the router's message limit each."""
        if flag and call.plain is not None:
            flag, payload = 0, call.plain
        try:
            return read_message(pb.PredictionsRequest, call.headers, flag, payload,
                                (self.limits or DEFAULT_LIMITS).message_bytes)
        except ValueError:  # MessageTooLarge, NotEncoded (grpc_inflate.py): not a request the router reads
            return None

    def _readable(self, call: ServerCall) -> tuple[str, str, bytes | memoryview, bool] | str:
        """(model, version asked for, the request's serialized bytes, whether they were
        decompressed) when the call's body is exactly one message the router can read as a
        PredictionsRequest; else what is wrong with it."""
        data = call.body  # the request's one copy (when it came in pieces): what follows are views of it
        if len(data) < 5:
            return f"the call carries {len(data)} bytes, not a length-prefixed message"
        if len(data) != 5 + int.from_bytes(data[1:5], "big"):
            return f"the call carries {len(data) - 5} bytes after its prefix, which declares {int.from_bytes(data[1:5], 'big')}"
        payload = memoryview(data)[5:]
        if not data[0] and len(payload) >= LARGE_MESSAGE:  # an image: read without a copy of it
            names = request_names(payload)
            return NOT_A_REQUEST if names is None else (*names, payload, False)
        request = self._request(call, data[0], payload)
        if request is None:
            return NOT_A_REQUEST
        return (request.model_name, request.model_version, request.SerializeToString() if data[0] else payload,
                bool(data[0]))

    def message_for(self, model: str, payload: bytes | memoryview, version: str | None, whole: bool = False) -> Data:
        """The request message, for ``version`` (appended: the last value of a field wins).
        A large one is its pieces: its prefix, ``payload`` and the version, sent as they are
        (an image's bytes are most of a call's cost); a small one, or any when ``whole``, bytes."""
        target = (self.table.upstream(model, version) or "").encode()
        suffix = b"\x12" + _varint(len(target)) + target
        prefix = b"\x00" + (len(payload) + len(suffix)).to_bytes(4, "big")
        if len(payload) >= LARGE_MESSAGE and not whole:
            return [prefix, payload, suffix]
        return b"".join((prefix, payload, suffix))

    async def _call(self, call: ServerCall, headers: list[Header], data: Data, sink: Relay | None = None) -> UpstreamCall:
        """One upstream call, awaited (Ping, streams)."""
        conn = await self.pool.connection()
        up = conn.start(headers, data, True, sink)
        call.upstream = (conn, up.id)
        try:
            await up.done
        finally:
            call.upstream = None
        return up

    def unreachable(self, exc: Exception | None) -> str:
        return f"TorchServe is not reachable at {self.upstream}: {exc}"

    def own_key(self, call: ServerCall) -> bool:
        """Whether the router swapped its own key in for the client's (keys.py): TorchServe's
        refusal of it is then the router's to renew, not the client's answer."""
        return self.keys is not None and self.keys.swap(header(call.headers, b"authorization")) is not None

    async def renewed_key(self, sent: list[Header]) -> list[Header] | None:
        """After TorchServe refused the router's key: the headers to try once more with, or
        None (nothing fresher)."""
        assert self.keys is not None
        fresh = await self.keys.refused(header(sent, b"authorization") or b"")
        if fresh is None:
            return None
        return [(name, fresh if name == b"authorization" else value) for name, value in sent]

    def send(self, conn: GrpcServerConnection, call: ServerCall, up: UpstreamCall | None, version: str | None,
             error: str = "") -> None:
        """Answer ``call`` with TorchServe's answer ``up``, or (None) UNAVAILABLE and ``error``."""
        if up is None:
            extra = [(b"x-model-version", version.encode())] if version else []
            conn.send(call.id, [STATUS_OK, GRPC_TYPE] + extra, trailers=status_trailers(StatusCode.UNAVAILABLE, error))
            return
        # TorchServe's answers to a version carry the same headers and trailers, which the
        # upstream decoder gives as the same lists (hpack_codec): what the client gets of
        # them is made and encoded once (a twentieth of a routed call's CPU, as _forwarded).
        memo = self._answers.get(version)
        if memo is not None and memo[0] is up.headers and memo[1] is up.trailers:
            head, trailers = memo[2], memo[3]
        else:
            head, trailers = answer_headers(up, [(b"x-model-version", version.encode())] if version else [])
            head, trailers = Encoded(head), Encoded(trailers)
            if len(self._answers) >= 256:  # versions come and go over a router's life
                self._answers.clear()
            self._answers[version] = (up.headers, up.trailers, head, trailers)
        conn.send(call.id, head, bytes(up.body) if up.body else None, trailers)

    # ---------------------------------------------------------------- calls
    async def _pass(self, conn: GrpcServerConnection, call: ServerCall) -> None:
        """Ping, or a request the router cannot read: passed to TorchServe as it is."""
        try:
            try:
                headers = self._headers(call, call.path)[0]
                up = await self._call(call, headers, call.body)
                if outcome(*up.status()) == KEY_REFUSED and self.own_key(call) and (fresh := await self.renewed_key(headers)):
                    up = await self._call(call, fresh, call.body)
                self.send(conn, call, up, None)
            except UpstreamGone as exc:
                self.send(conn, call, None, None, self.unreachable(exc))
        finally:
            conn.finish(call)

    # --------------------------------------------------------------- shadow
    def mirror(self, model: str, version: str, headers: list[Header], payload: bytes | memoryview,
               primary: bytes | None) -> None:
        """Send a copy to the shadow after the client has its answer (``primary``: the
        answer's message when OK); the policy compares and counts it."""

        async def run() -> None:
            result, answer = DROPPED, None
            try:
                conn = await self.pool.connection()
                up = conn.start(headers, self.message_for(model, payload, version), True)
                await up.done
                result = outcome(*up.status())
                answer = _prediction(bytes(up.body)) if result == OK_OUTCOME else None
            except UpstreamGone:
                pass
            finally:  # once per mirror, cancelled or not: the policy counts mirrors in flight
                self.policy.shadow_done(model, version, result, _prediction(primary) if primary else None, answer)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (a bounded while) for mirrors in flight, then cancel what is left."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
        for task in list(self._background):
            task.cancel()

    async def stop(self, grace: float = 2.0) -> None:
        """Stop accepting calls, let those in flight finish for ``grace`` s, then close."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.goaway(conn.last_stream)
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=grace)
        # Predictions are callbacks, not tasks: wait for the calls still open on connections.
        while any(conn.calls for conn in self.connections) and loop.time() < end:
            await asyncio.sleep(0.02)
        for task in list(self._calls):
            task.cancel()
        for conn in list(self.connections):
            conn.close(last_stream=conn.last_stream)
        await self.drain()
        self.pool.close()


async def start_grpc_router(table: RoutingTable, upstream: str, host: str = "127.0.0.1",
                            port: int = 0, sticky_key: str = "x-user-id", reuse_port: bool = False,
                            **options: Any) -> tuple[GrpcRouter, int]:
    """Serve the routed InferenceAPIsService on ``host:port`` (0: any free port); return the
    router and the port it bound. ``options``: GrpcRouter's timeouts, keys and readiness."""
    router = GrpcRouter(table, upstream, sticky_key, **options)
    try:
        bound = await router.start(host, port, reuse_port)
    except OSError as exc:
        raise OSError(f"cannot listen for gRPC on {host}:{port}: {exc}") from exc
    return router, bound


async def stop_grpc_router(router: GrpcRouter, grace: float = 2.0) -> None:
    await router.stop(grace)
