"""`tsfleet route`: the REST router, its admin API and (when available) the gRPC router in one process."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from aiohttp import web
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from tsfleet.k8s.kubectl import SERVICE_ACCOUNT_DIR, KubeApi
from tsfleet.manifest import Fleet
from tsfleet.router.fronts.admin import AdminApi
from tsfleet.router.fronts.admin_site import DeadlineSite
from tsfleet.router.keys import InferenceKeys, previous_keys, rotate_router_key, router_keys
from tsfleet.router.policy.manifest_routes import fleet_routes, routes_from_fleet, take_fleet
from tsfleet.router.memory import keep_freed_memory
from tsfleet.router.readiness import ModelReadiness
from tsfleet.router.rollback_record import RollbackRecorder
from tsfleet.router.routes_file import RoutesFile
from tsfleet.router.selfstats import ProcessMetrics
from tsfleet.router.fronts.rest import RestRouter
from tsfleet.router.policy.arm_metrics import ArmMetrics
from tsfleet.router.policy.routing import RoutingTable
from tsfleet.router.wire.limits import DEFAULT_LIMITS, LimitCounters, LimitHits, RouterLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    upstream_rest: str = "http://127.0.0.1:8080"
    upstream_grpc: str = "127.0.0.1:7070"
    upstream_management: str = "http://127.0.0.1:8081"  # its token API renews the inference key
    ts_key_file: Path | None = None  # TorchServe's key_file.json: clients may then send the router's key
    host: str = "127.0.0.1"  # REST and gRPC: 0.0.0.0 to serve other machines (clients, a pod's probes)
    admin_host: str = "127.0.0.1"  # the admin API stays on loopback unless asked
    port: int = 8090
    admin_port: int = 8091
    grpc_port: int = 7090
    state_file: Path = Path("router_state.json")
    key_file: Path = Path("router_key.json")
    processes: int = 1  # more than 1: the leader and fronts on the same ports (router/processes.py)
    drain_s: float = 10.0  # on stop: how long requests under way may take to be answered
    limits: RouterLimits = DEFAULT_LIMITS  # fleet.yaml's router.limits, for every process's fronts
    # A routes file every replica follows (a mounted ConfigMap's key, router/routes_file.py);
    # None: the routes are this router's own, as on one machine.
    routes_file: Path | None = None
    # The ConfigMap holding it (key: the file's name): automatic rollbacks are written there.
    routes_configmap: str | None = None
    service_account_dir: Path = SERVICE_ACCOUNT_DIR  # the pod's API credentials (kube.py)
    routes_poll_s: float = 1.0


class RouterProcess:
    """Owns the routing table and every listener; ``start``/``stop`` inside an event loop."""

    def __init__(self, fleet: Fleet, config: RouterConfig):
        self.config = config
        self.table = RoutingTable(routes_from_fleet(fleet), config.state_file)
        # The saved weights may predate a manifest edited while the router was down (a version
        # retired, a default moved): they yield to it, as they do to a running apply.
        self.specs = fleet_routes(fleet)
        for change in take_fleet(self.table, self.specs):
            log.info("router: %s", change)
        self.routes_file: RoutesFile | None = None
        self.recorder: RollbackRecorder | None = None
        if config.routes_file is not None:
            self.routes_file = RoutesFile(config.routes_file, self.table, self.versions, config.routes_poll_s)
            self.routes_file.start_up()  # before serving: the file's routes, or the saved ones (precedence)
            self.recorder = RollbackRecorder(self.table, config.routes_configmap, config.routes_file.name,
                                             KubeApi.in_cluster(config.service_account_dir), self.versions)
            self.table.on_rollback = self.recorder.rolled_back
        keys = router_keys(config.key_file)
        self.keys = InferenceKeys(keys["inference"], config.ts_key_file, config.upstream_management,
                                  previous_keys(keys)) if config.ts_key_file is not None else None
        self.readiness = ModelReadiness(self.table, self.keys, workflows=list(fleet.workflows))
        # How often each limit fired here, per front; /metrics adds the front processes' to it.
        self.hits = {"rest": LimitCounters(), "grpc": LimitCounters()}
        self.rest = RestRouter(self.table, config.upstream_rest, keys=self.keys, readiness=self.readiness,
                               metrics=self._metrics, limits=config.limits, counters=self.hits["rest"])
        self.admin = AdminApi(self.table, keys["admin"], config.limits)
        self.admin.fleet_taken = self._fleet_taken
        if self.keys is not None:
            self.admin.rotate = self.rotate_key
        self._runners: list[web.AppRunner] = []
        self._fresh: asyncio.Task | None = None
        self._grpc = None
        self.fronts = None
        self.ports: dict[str, int] = {}
        # /metrics: collectors that read the counters where they are kept, at scrape time only
        # (a request pays an integer add, never any formatting); prometheus_client writes the text.
        self.registry = CollectorRegistry()
        for collector in (ArmMetrics(self.table), self.routes_file, self.recorder, LimitHits(self._limit_sources),
                          ProcessMetrics(self._processes)):
            if collector is not None:
                self.registry.register(collector)

    async def start(self) -> None:
        many = self.config.processes > 1
        if self.keys is not None:
            self._fresh = asyncio.get_running_loop().create_task(self.keys.keep_fresh())
        self.ports["rest"] = await self.rest.start(self.config.host, self.config.port, reuse_port=many)
        runner = self.admin.connections.runner(self.admin.app)
        await runner.setup()
        await DeadlineSite(runner, self.config.admin_host, self.config.admin_port, self.admin.connections).start()
        self._runners.append(runner)
        self.ports["admin"] = runner.addresses[0][1]
        try:
            from tsfleet.router.fronts.grpc_front import start_grpc_router
        except ImportError:
            start_grpc_router = None
        if start_grpc_router is not None:
            self._grpc, self.ports["grpc"] = await start_grpc_router(
                self.table, self.config.upstream_grpc, self.config.host, self.config.grpc_port, reuse_port=many,
                keys=self.keys, readiness=self.readiness, limits=self.config.limits, counters=self.hits["grpc"])
        if many:
            from tsfleet.router.processes import Fronts

            self.fronts = Fronts(self.table, self.config.processes - 1, {
                "upstream_rest": self.config.upstream_rest, "upstream_grpc": self.config.upstream_grpc,
                "host": self.config.host, "port": self.ports["rest"], "grpc_port": self.ports.get("grpc", 0),
                "upstream_management": self.config.upstream_management, "key_file": str(self.config.key_file),
                "drain_s": self.config.drain_s, "limits": asdict(self.config.limits),
                "workflows": self.readiness.workflows,
                "ts_key_file": str(self.config.ts_key_file) if self.config.ts_key_file is not None else None},
                metrics=self.metrics_text)
            await self.fronts.start()
            self.admin.settled = self.fronts.settled
        if self.routes_file is not None and self.recorder is not None:
            self.routes_file.settled = self.fronts.settled if self.fronts is not None else None
            self.routes_file.start()
            self.recorder.start()

    def versions(self) -> Mapping[str, Collection[str]]:
        """Each routed model's versions in the manifest: what a routes file may name."""
        return {m: spec["versions"] for m, spec in self.specs.items() if m in self.table.routes}

    def _fleet_taken(self, specs: dict[str, dict[str, Any]]) -> None:
        self.specs = specs  # apply brought the routes to an edited manifest (PUT /fleet)

    def metrics_text(self) -> str:
        """/metrics of the whole router: the routes' statistics (every process's, the leader
        adds them up), the routes file's and rollback records' counters, how often each limit
        fired (in this process and in the fronts), and each process's CPU and memory."""
        return generate_latest(self.registry).decode()

    def _limit_sources(self) -> list[dict[str, LimitCounters]]:
        """This process's limit counters, and the sums the fronts sent (processes.py)."""
        return [self.hits] + ([self.fronts.hits] if self.fronts is not None else [])

    def _processes(self) -> dict[str, int]:
        """Every router process by role: the leader (this one) and its fronts."""
        fronts = self.fronts.pids() if self.fronts is not None else []
        return {"leader": os.getpid(), **{f"front-{n}": pid for n, pid in enumerate(fronts, 1)}}

    async def _metrics(self) -> str:
        return self.metrics_text()

    async def rotate_key(self, grace_s: float) -> dict[str, Any]:
        """A new router inference key, taken by every process before this returns; the old
        one is taken for ``grace_s`` more seconds."""
        assert self.keys is not None
        keys = rotate_router_key(self.config.key_file, grace_s)
        previous = previous_keys(keys)
        self.keys.take(keys["inference"], previous)
        if self.fronts is not None:
            await self.fronts.reload_keys()
        until = datetime.fromtimestamp(previous[-1][1], timezone.utc).isoformat(timespec="seconds") if previous else None
        return {"inference": keys["inference"], "previous_valid_until": until, "older_keys_taken": max(0, len(previous) - 1)}

    async def stop(self) -> None:
        """Stop taking requests; answer those under way (for up to ``drain_s``), then stop."""
        drain = self.config.drain_s
        if self.routes_file is not None:
            self.routes_file.stop()
        stopping = [self.rest.stop(drain)]
        if self.fronts is not None:
            stopping.append(self.fronts.stop(drain + 5))
        if self._grpc is not None:
            from tsfleet.router.fronts.grpc_front import stop_grpc_router

            stopping.append(stop_grpc_router(self._grpc, grace=drain))
        await asyncio.gather(*stopping)
        if self._fresh is not None:
            self._fresh.cancel()
        if self.recorder is not None:
            await self.recorder.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self.table.save()


def serve(fleet: Fleet, config: RouterConfig, say: Callable[[str], None] = print) -> None:
    """Run until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def main() -> None:
        router = RouterProcess(fleet, config)
        await router.start()
        say(f"router: REST http://{config.host}:{router.ports['rest']}  admin http://{config.admin_host}:"
            f"{router.ports['admin']}" + (f"  gRPC {config.host}:{router.ports['grpc']}" if "grpc" in router.ports else "")
            + (f"  ({config.processes} processes)" if config.processes > 1 else ""))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await router.stop()
        say("router stopped")

    keep_freed_memory()  # large bodies reuse the heap instead of faulting in fresh pages
    try:
        import uvloop  # libuv's event loop: the router's per-request CPU cost roughly halves

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
