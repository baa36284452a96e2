"""The router's gRPC side: TorchServe's InferenceAPIsService, routed, retried once, measured.

Clients generated from TorchServe's own inference.proto call it unchanged (same service,
messages, metadata and status codes); the chosen version comes back as initial metadata
``x-model-version``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Sequence

import grpc
from google.protobuf import empty_pb2

from tsfleet.router.compare import answers_agree
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tsfleet.router.routing import RoutingTable

log = logging.getLogger(__name__)
Metadata = Sequence[tuple[str, str | bytes]]

# Set by gRPC itself on every call; forwarding them would clash with the upstream call's own.
NOT_FORWARDED = {"user-agent", "content-type", "te", "host"}
# TorchServe's words for a request that never reached a worker or lost its worker: safe to
# retry, since inference has no side effects. 0.12 sends "Worker died." after a kill, as
# INTERNAL, or RESOURCE_EXHAUSTED once it has seen exit code 137; "has no worker" means the
# request never reached one; "Worker scaled down" keeps parity with the REST side.
DROPPED = ("Worker died", "Worker scaled down", "has no worker to serve inference request")
# TorchServe appends its exception class to every error it sends; transport errors lack it.
FROM_TORCHSERVE = "org.pytorch.serve"
# Answers that are the client's doing (REST's 4xx): counted as served, not as arm errors.
NOT_FOUND = ("ModelNotFoundException", "ModelVersionNotFoundException")
SERVER_SIDE = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN,
               grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS}
MAX_MESSAGE = 64 * 2**20  # TorchServe enforces its own max_request_size; don't undercut it
SHADOW_BACKLOG = 256  # mirrors in flight beyond this are skipped: a shadow must never pile up


def _unreachable(err: grpc.aio.AioRpcError) -> bool:
    """The call never got an answer from TorchServe (refused, reset, closed)."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and FROM_TORCHSERVE not in (err.details() or "")


def _retryable(err: grpc.aio.AioRpcError) -> bool:
    return _unreachable(err) or any(m in (err.details() or "") for m in DROPPED)


def _server_side(err: grpc.aio.AioRpcError) -> bool:
    details = err.details() or ""
    # A dropped request is the arm's failure whatever the code (RESOURCE_EXHAUSTED after a SIGKILL).
    return any(m in details for m in DROPPED) or (
        err.code() in SERVER_SIDE and not any(m in details for m in NOT_FOUND))


class GrpcRouter(pb_grpc.InferenceAPIsServiceServicer):
    """Forwards every call to TorchServe's gRPC inference port at ``upstream``."""

    def __init__(self, table: RoutingTable, upstream: str, sticky_key: str = "x-user-id",
                 timeout_s: float = 130):
        self.table, self.upstream, self.sticky_key, self.timeout_s = table, upstream, sticky_key.lower(), timeout_s
        self.channel = grpc.aio.insecure_channel(upstream, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE),
            # Reconnect fast once TorchServe is back instead of gRPC's default backoff of up to 2 min.
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)])
        self.stub = pb_grpc.InferenceAPIsServiceStub(self.channel)
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------- helpers
    def _metadata(self, context: grpc.aio.ServicerContext) -> list[tuple[str, str | bytes]]:
        """The client's metadata (the Authorization key above all), minus what gRPC sets itself."""
        return [(m.key, m.value) for m in context.invocation_metadata() or ()
                if not m.key.startswith((":", "grpc-")) and m.key not in NOT_FORWARDED]

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The client's own deadline if it set one, so an abandoned call stops upstream too."""
        remaining = context.time_remaining()
        return min(self.timeout_s, remaining) if remaining is not None else self.timeout_s

    async def _fail(self, context: grpc.aio.ServicerContext, err: grpc.aio.AioRpcError) -> None:
        """Answer with TorchServe's own status and details, or say TorchServe is unreachable."""
        if _unreachable(err):
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"TorchServe is not reachable at {self.upstream}: {err.details()}")
        trailing = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if not k.startswith("grpc-"))
        await context.abort(err.code(), err.details() or "", trailing_metadata=trailing)

    def _for(self, request: pb.PredictionsRequest, version: str | None) -> pb.PredictionsRequest:
        out = pb.PredictionsRequest()
        out.CopyFrom(request)  # keeps fields this proto does not know, too
        out.model_version = self.table.upstream(request.model_name, version) or ""
        return out

    # ----------------------------------------------------------------- RPCs
    async def Ping(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> pb.TorchServeHealthResponse:
        try:
            return await self.stub.Ping(request, metadata=self._metadata(context), timeout=self._timeout(context))
        except grpc.aio.AioRpcError as err:
            await self._fail(context, err)
            raise  # not reached: abort raises

    async def Predictions(self, request: pb.PredictionsRequest, context: grpc.aio.ServicerContext) -> pb.PredictionResponse:
        model, metadata = request.model_name, self._metadata(context)
        choice = self.table.choose(model, request.model_version or None, dict(metadata).get(self.sticky_key))
        # A retry goes to the baseline, unless the client named the version itself.
        second = choice.version if choice.explicit else self.table.alternate(model, choice.version)
        version, retried, started = choice.version, False, time.perf_counter()
        while True:
            try:
                reply = await self.stub.Predictions(self._for(request, version), metadata=metadata,
                                                    timeout=self._timeout(context))
                error = None
            except grpc.aio.AioRpcError as err:
                reply, error = None, err
                if not retried and _retryable(err):
                    # The client will not see this failure, but the arm's record must.
                    self.table.record(model, version, False, time.perf_counter() - started)
                    version, retried = second, True
                    continue
            break
        ok = error is None or not _server_side(error)
        event = self.table.record(model, version, ok, time.perf_counter() - started, retried)
        if event:
            log.warning("rolled back %s %s: %s", model, event["version"], event["reason"])
        if version:
            await context.send_initial_metadata((("x-model-version", version),))
        if error is not None:
            await self._fail(context, error)
        assert reply is not None
        if choice.shadow:
            self._mirror(model, choice.shadow, request, metadata, reply.prediction)
        return reply

    async def StreamPredictions(self, request: pb.PredictionsRequest,
                                context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PredictionResponse]:
        model, metadata = request.model_name, self._metadata(context)
        route = self.table.routes.get(model)
        if route is not None and not route.streaming:
            # TorchServe 0.12 kills the worker (failing its whole batch) when a handler that
            # does not stream gets a stream. The answer of such a model is one message anyway.
            yield await self.Predictions(request, context)
            return
        choice = self.table.choose(model, request.model_version or None, dict(metadata).get(self.sticky_key))
        version, started, sent = choice.version, time.perf_counter(), 0
        if version:
            await context.send_initial_metadata((("x-model-version", version),))
        for attempt in (0, 1):
            try:
                call = self.stub.StreamPredictions(self._for(request, version), metadata=metadata,
                                                   timeout=self._timeout(context))
                async for reply in call:
                    sent += 1
                    yield reply
                self.table.record(model, version, True, time.perf_counter() - started, attempt > 0)
                return
            except grpc.aio.AioRpcError as err:
                # Only a refused connection is retried: TorchServe 0.12 answers "Worker died."
                # (and restarts the worker) when a handler does not stream, so retrying that
                # would take down a second worker.
                if attempt == 0 and sent == 0 and _unreachable(err):
                    continue
                self.table.record(model, version, not _server_side(err), time.perf_counter() - started, attempt > 0)
                await self._fail(context, err)

    async def StreamPredictions2(self, request_iterator: AsyncIterator[pb.PredictionsRequest],
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PredictionResponse]:
        """A sequence (stateful models): one version for the whole stream, no retries."""
        metadata = self._metadata(context)
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        choice = self.table.choose(first.model_name, first.model_version or None, dict(metadata).get(self.sticky_key))
        if choice.version:
            await context.send_initial_metadata((("x-model-version", choice.version),))

        async def requests() -> AsyncIterator[pb.PredictionsRequest]:
            yield self._for(first, choice.version)
            async for req in request_iterator:
                yield self._for(req, choice.version)

        try:
            async for reply in self.stub.StreamPredictions2(requests(), metadata=metadata,
                                                            timeout=self._timeout(context)):
                yield reply
        except grpc.aio.AioRpcError as err:
            await self._fail(context, err)

    # --------------------------------------------------------------- shadow
    def _mirror(self, model: str, version: str, request: pb.PredictionsRequest, metadata: Metadata,
                primary: bytes) -> None:
        """Send a copy to the shadow after the client has its answer; compare, count, drop."""
        if len(self._background) >= SHADOW_BACKLOG:
            return

        async def run() -> None:
            try:
                reply = await self.stub.Predictions(self._for(request, version), metadata=metadata,
                                                    timeout=self.timeout_s)
                self.table.record_shadow(model, version, True, answers_agree(primary, reply.prediction))
            except grpc.aio.AioRpcError as err:
                self.table.record_shadow(model, version, not _server_side(err), None)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (a bounded while) for mirrors in flight, then cancel what is left."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
        for task in list(self._background):
            task.cancel()

    async def close(self) -> None:
        await self.drain()
        await self.channel.close()


_routers: dict[int, GrpcRouter] = {}


async def start_grpc_router(table: RoutingTable, upstream: str, host: str = "127.0.0.1",
                            port: int = 0, sticky_key: str = "x-user-id") -> tuple[grpc.aio.Server, int]:
    """Serve the routed InferenceAPIsService on ``host:port`` (0: any free port); return the
    server and the port it bound."""
    router = GrpcRouter(table, upstream, sticky_key)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                      ("grpc.max_receive_message_length", MAX_MESSAGE),
                                      ("grpc.so_reuseport", 0)])  # a second router must not share the port
    pb_grpc.add_InferenceAPIsServiceServicer_to_server(router, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    _routers[id(server)] = router
    return server, bound


async def stop_grpc_router(server: grpc.aio.Server, grace: float = 2.0) -> None:
    """Stop accepting calls, let those in flight finish for ``grace`` s, then close upstream."""
    await server.stop(grace)
    router = _routers.pop(id(server), None)
    if router is not None:
        await router.close()


def router_of(server: grpc.aio.Server) -> GrpcRouter | None:
    """The servicer behind a server from ``start_grpc_router`` (tests drain its mirrors)."""
    return _routers.get(id(server))
