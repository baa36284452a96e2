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
import time
from typing import Any, Coroutine

from google.protobuf.message import DecodeError

from tsfleet.router.fronts import health
from tsfleet.router.policy.compare import answers_agree
from tsfleet.router.fronts.grpc_predict import Prediction, not_found, refused_own_key, renewed_key, server_side
from tsfleet.router.wire.grpc_upstream import UpstreamCall, UpstreamPool
from tsfleet.router.wire.grpc_wire import (GRPC_TYPE, INVALID_ARGUMENT, OK, RESOURCE_EXHAUSTED, STATUS_OK, UNAVAILABLE, UNIMPLEMENTED,
                                      Relay, ServerCall, ServerConnection, UpstreamGone, answer_headers, header,
                                      read_message, split_messages, status_trailers)
from tsfleet.router.wire.h2frames import INTERNAL_ERROR, Data
from tsfleet.router.wire.hpack_codec import Header
from tsfleet.router.keys import InferenceKeys
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.wire.protoscan import request_names
from tsfleet.router.readiness import ModelReadiness
from tsfleet.router.policy.routing import RoutingTable

log = logging.getLogger(__name__)
SERVICE = b"/org.pytorch.serve.grpc.inference.InferenceAPIsService/"
NOT_A_REQUEST = "the message is not a PredictionsRequest (or not in the grpc-encoding the call names)"
PREDICT, STREAM, SEQUENCE, PING = (SERVICE + m for m in (b"Predictions", b"StreamPredictions",
                                                         b"StreamPredictions2", b"Ping"))
BUFFERED = {PREDICT, STREAM, PING, health.CHECK, health.WATCH}  # one request message: read whole, then routed
LARGE_MESSAGE = 64 * 1024  # a request this big goes upstream in pieces, not joined
SHADOW_BACKLOG = 256  # mirrors in flight beyond this are skipped: a shadow must never pile up


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


class GrpcRouter:
    """Serves the routed service and forwards every call to TorchServe's gRPC port at ``upstream``."""

    max_held = 64 * 2**20  # of a request stream, waiting for TorchServe to read it

    def __init__(self, table: RoutingTable, upstream: str, sticky_key: str = "x-user-id", timeout_s: float = 130,
                 min_attempt_s: float = 2.0, latency_factor: float = 10.0, keys: InferenceKeys | None = None,
                 readiness: ModelReadiness | None = None):
        self.table, self.upstream, self.keys, self.readiness = table, upstream, keys, readiness
        self.timeout_s, self.min_attempt_s, self.latency_factor = timeout_s, min_attempt_s, latency_factor
        host, _, port = upstream.rpartition(":")
        self.pool = UpstreamPool(host or "127.0.0.1", int(port))
        self.sticky = sticky_key.lower().encode()
        self.default_timeout = f"{int(timeout_s)}S".encode()  # when the client sets no deadline
        self.connections: set[ServerConnection] = set()
        self.stopping = False
        self.server: asyncio.base_events.Server | None = None
        self._calls: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: ServerConnection(self, self.connections), host, port,
                                               reuse_port=reuse_port or None)
        return self.server.sockets[0].getsockname()[1]

    # ------------------------------------------------------------ dispatch
    def opened(self, conn: ServerConnection, call: ServerCall) -> None:
        if call.path not in BUFFERED:
            call.queue = asyncio.Queue()
            self.spawn(conn, call, self._relay(conn, call))

    def ended(self, conn: ServerConnection, call: ServerCall) -> None:
        """A call with one request message (Predictions, StreamPredictions, Ping) is whole."""
        try:
            if call.path in (health.CHECK, health.WATCH):  # the router's own, not TorchServe's
                self.spawn(conn, call, (health.grpc_check if call.path == health.CHECK else health.grpc_watch)(
                    self, conn, call))
                return
            readable = self._readable(call) if call.path != PING else None
            if isinstance(readable, str) and call.path in (PREDICT, STREAM):
                # Bytes that are no PredictionsRequest: the client's fault, said as such
                # (TorchServe would answer UNKNOWN or INTERNAL, blaming the server).
                conn.send(call.id, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(INVALID_ARGUMENT, readable))
                conn.finish(call)
                return
            if not isinstance(readable, tuple):  # Ping, or a method only TorchServe can judge
                self.spawn(conn, call, self._pass(conn, call))
                return
            model, asked, payload, decompressed = readable
            route = self.table.routes.get(model)
            if call.path == STREAM and (route is None or route.streaming):
                self.spawn(conn, call, self._stream(conn, call, model, asked, payload, decompressed))
                return
            # TorchServe 0.12 kills the worker (failing its whole batch) when a handler that
            # does not stream gets a stream; the answer of such a model is one message anyway.
            sticky = header(call.headers, self.sticky)
            choice = self.table.choose(model, asked or None, sticky.decode() if sticky else None)
            Prediction(self, conn, call, model, choice, self._headers(call, PREDICT, decompressed), payload).attempt()
        except Exception:  # a bug of the router's must not take the client's connection down
            log.exception("gRPC call to %s failed in the router", call.path.decode(errors="replace"))
            self.abort(conn, call)

    def spawn(self, conn: ServerConnection, call: ServerCall, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` for ``call`` as a task; a router bug in it resets the call."""
        task = asyncio.get_running_loop().create_task(self._guarded(conn, call, work))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    @staticmethod
    async def _guarded(conn: ServerConnection, call: ServerCall, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:  # a bug of the router's must not leave the client waiting for its deadline
            log.exception("gRPC call to %s failed in the router", call.path.decode(errors="replace"))
            GrpcRouter.abort(conn, call)

    @staticmethod
    def abort(conn: ServerConnection, call: ServerCall) -> None:
        """End a call the router failed (INTERNAL_ERROR, unless it was answered already)."""
        if call.id in conn.windows:  # not answered yet
            conn.reset(call.id, INTERNAL_ERROR)
        conn.finish(call)

    # ------------------------------------------------------------- helpers
    def _headers(self, call: ServerCall, path: bytes, decompressed: bool = False) -> list[Header]:
        """The upstream call's headers: the client's metadata (the Authorization key above all)."""
        out = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", self.pool.authority)]
        deadline = False
        for name, value in call.headers:
            if name[0] == 58 or (decompressed and name == b"grpc-encoding"):
                continue
            deadline = deadline or name == b"grpc-timeout"
            if name == b"authorization" and self.keys is not None:
                value = self.keys.swap(value) or value  # the router's own key: TorchServe's instead
            out.append((name, value))
        if not deadline:
            out.append((b"grpc-timeout", self.default_timeout))
        return out

    def _request(self, call: ServerCall, flag: int, payload: bytes | memoryview) -> pb.PredictionsRequest | None:
        """The request, readable; None when it is not."""
        return read_message(pb.PredictionsRequest, call.headers, flag, payload)

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

    def send(self, conn: ServerConnection, call: ServerCall, up: UpstreamCall | None, version: str | None,
             error: str = "") -> None:
        """Answer ``call`` with TorchServe's answer ``up``, or (None) UNAVAILABLE and ``error``."""
        extra = [(b"x-model-version", version.encode())] if version else []
        if up is None:
            conn.send(call.id, [STATUS_OK, GRPC_TYPE] + extra, trailers=status_trailers(UNAVAILABLE, error))
            return
        head, trailers = answer_headers(up, extra)
        conn.send(call.id, head, bytes(up.body) if up.body else None, trailers)

    # ---------------------------------------------------------------- calls
    async def _pass(self, conn: ServerConnection, call: ServerCall) -> None:
        """Ping, or a request the router cannot read: passed to TorchServe as it is."""
        try:
            try:
                headers = self._headers(call, call.path)
                up = await self._call(call, headers, call.body)
                if refused_own_key(self, call, *up.status()) and (fresh := await renewed_key(self, headers)):
                    up = await self._call(call, fresh, call.body)
                self.send(conn, call, up, None)
            except UpstreamGone as exc:
                self.send(conn, call, None, None, self.unreachable(exc))
        finally:
            conn.finish(call)

    async def _stream(self, conn: ServerConnection, call: ServerCall, model: str, asked: str,
                      payload: bytes | memoryview, decompressed: bool) -> None:
        headers = self._headers(call, STREAM, decompressed)
        sticky = header(call.headers, self.sticky)
        choice = self.table.choose(model, asked or None, sticky.decode() if sticky else None)
        version, started = choice.version, time.perf_counter()
        relay = Relay(conn, call, [(b"x-model-version", version.encode())] if version else [])
        try:
            for attempt in (0, 1):
                try:
                    up = await self._call(call, headers, self.message_for(model, payload, version), relay)
                except UpstreamGone as exc:
                    if call.cancelled:
                        return
                    # Only an unreachable TorchServe is retried, and only before any answer:
                    # 0.12 answers "Worker died." (and restarts the worker) when a handler does
                    # not stream, so retrying that would take down a second worker.
                    if attempt == 0 and not relay.started:
                        continue
                    self.table.record(model, version, False, time.perf_counter() - started, attempt > 0)
                    relay.fail(UNAVAILABLE, self.unreachable(exc))
                    return
                code, message = up.status()
                if not not_found(message):
                    self.table.record(model, version, code == OK or not server_side(code, message),
                                      time.perf_counter() - started, attempt > 0)
                return
        finally:
            conn.finish(call)

    async def _relay(self, conn: ServerConnection, call: ServerCall) -> None:
        """A call that streams requests: StreamPredictions2 (one version for the whole
        sequence, no retries), or a method the router does not know (passed through)."""
        assert call.queue is not None
        try:
            rewrite, pending, version, model = call.path == SEQUENCE, bytearray(), None, ""
            first: list[bytes] = []
            if rewrite:
                while not (messages := split_messages(pending)):
                    chunk = await call.queue.get()
                    if chunk is None:
                        break
                    pending += chunk
                if call.cancelled:
                    return
                if not messages:  # the client ended the sequence before sending anything
                    conn.send(call.id, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(OK, ""))
                    return
                requests = [self._request(call, f, p) for f, p in messages]
                if any(r is None for r in requests):
                    conn.send(call.id, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(
                        UNIMPLEMENTED, "the router cannot read this sequence's messages"))
                    return
                model = requests[0].model_name
                sticky = header(call.headers, self.sticky)
                version = self.table.choose(model, requests[0].model_version or None,
                                            sticky.decode() if sticky else None).version
                first = [self.message_for(model, r.SerializeToString(), version, whole=True) for r in requests]
            relay = Relay(conn, call, [(b"x-model-version", version.encode())] if version else [])
            try:
                upstream = await self.pool.connection()
            except UpstreamGone as exc:
                relay.fail(UNAVAILABLE, self.unreachable(exc))
                return
            up = upstream.start(self._headers(call, call.path, decompressed=rewrite),
                                b"".join(first) or None, False, relay)
            call.upstream = (upstream, up.id)
            while (chunk := await call.queue.get()) is not None:
                if rewrite:
                    pending += chunk
                    requests = [self._request(call, f, p) for f, p in split_messages(pending)]
                    if any(r is None for r in requests):
                        upstream.fail(up.id, UpstreamGone("unreadable message"), reset=True)
                        relay.fail(UNIMPLEMENTED, "the router cannot read this sequence's messages")
                        return
                    chunk = b"".join(self.message_for(model, r.SerializeToString(), version, whole=True)
                                     for r in requests)
                if chunk:
                    upstream.send(up.id, data=chunk)
                    if upstream.held(up.id) > self.max_held:
                        upstream.fail(up.id, UpstreamGone("unread"), reset=True)
                        up.done.exception()  # seen: nobody else waits for this call now
                        relay.fail(RESOURCE_EXHAUSTED, f"TorchServe has not read the last {self.max_held >> 20} MiB "
                                                       "of this stream; the router holds no more")
                        return
            if call.cancelled:
                return
            upstream.send(up.id, data=b"", end=True)
            try:
                await up.done
            except UpstreamGone as exc:
                relay.fail(UNAVAILABLE, self.unreachable(exc))
        finally:
            call.upstream = None
            conn.finish(call)

    # --------------------------------------------------------------- shadow
    def mirror(self, model: str, version: str, headers: list[Header], payload: bytes | memoryview, primary: bytes) -> None:
        """Send a copy to the shadow after the client has its answer; compare, count, drop."""
        if len(self._background) >= SHADOW_BACKLOG:
            return

        async def run() -> None:
            try:
                conn = await self.pool.connection()
                up = conn.start(headers, self.message_for(model, payload, version), True)
                await up.done
            except UpstreamGone:
                self.table.record_shadow(model, version, False, None)
                return
            code, message = up.status()
            if code != OK:
                self.table.record_shadow(model, version, not server_side(code, message), None)
                return
            mine, theirs = _prediction(primary), _prediction(bytes(up.body))
            agree = answers_agree(mine, theirs) if mine is not None and theirs is not None else None
            self.table.record_shadow(model, version, True, agree)

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
