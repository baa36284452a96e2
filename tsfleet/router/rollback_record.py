"""An automatic rollback, recorded where every replica sees it.

The leader that sees a canary regress sets its weight to 0 at once (policy/routing.py) and
saves that locally. With a routes file (router/routes_file.py) that is only this replica:
the others go on sending the canary traffic, and a pod started later takes the file's
weights. So the rollback is also written into the routes ConfigMap, through the API with
the pod's service account (tsfleet/k8s/kubectl.py): the file's content for the model is read,
the version's weight set to 0 and the event recorded, and patched back only if nobody
changed the ConfigMap in between (its resourceVersion; a conflict reads it again, three
tries in all). The kubelets then give every replica the new file, as for a ``kubectl apply``.

Where that fails (RBAC forbids the patch, the API is unreachable, no service account, no
ConfigMap named) the rollback holds on this replica and across its restarts (the state file
keeps it, routes_file.py), a Warning Event says so (where RBAC allows creating one), a
warning is logged and ``tsfleet_router_rollback_unrecorded_total`` counts it: the signal to
finish the job by hand (``tsfleet rollout rollback MODEL --kube``).

All of it runs in a background task of the leader's loop: a request that triggered a
rollback is answered at once, and no call is tried for ever (kube.py's timeouts).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Any, Callable, Collection, Iterator, Mapping

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from tsfleet.errors import KubeError
from tsfleet.k8s.kubectl import KubeApi
from tsfleet.router.policy import routes_doc
from tsfleet.router.policy.routing import RoutingTable

log = logging.getLogger(__name__)
TRIES = 3
COMPONENT = "tsfleet-router"


def pod_name() -> str:
    """This pod's name (a pod's hostname is its name unless the spec sets another)."""
    return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()


class RollbackRecorder:
    """Writes the leader's automatic rollbacks into key ``key`` of ConfigMap ``configmap``."""

    def __init__(self, table: RoutingTable, configmap: str | None, key: str, api: KubeApi | None,
                 versions: Callable[[], Mapping[str, Collection[str]]], pod: str | None = None):
        self.table, self.configmap, self.key, self.api = table, configmap, key, api
        self.versions = versions  # model -> the manifest's versions, as the routers check the file
        self.pod = pod or pod_name()
        self.recorded = 0
        self.unrecorded = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def rolled_back(self, model: str, version: str, event: dict[str, Any]) -> None:
        """The table's ``on_rollback``: record it in the background, never in the request's way."""
        if self._loop is None:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        try:
            if here is self._loop:
                self._spawn(model, version, event)
            else:
                self._loop.call_soon_threadsafe(self._spawn, model, version, event)
        except RuntimeError:  # the loop is closing (the router stops): the state file keeps it
            self._unrecorded(model, version, "the router was stopping")

    def _spawn(self, model: str, version: str, event: dict[str, Any]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self.record(model, version, dict(event)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def record(self, model: str, version: str, event: dict[str, Any]) -> bool:
        """Write the rollback into the ConfigMap; else an Event, a warning and the counter."""
        if model not in self.table.routes:
            return False  # the model left the manifest meanwhile: nothing is routed to it
        if self.api is None or not self.configmap:
            why = "the router runs outside a pod, or without its service account token" if self.api is None \
                else "no routes ConfigMap was named (--routes-configmap)"
            self._unrecorded(model, version, why)
            return False
        try:
            await self._patch(model, version, event)
        except KubeError as exc:
            self._unrecorded(model, version, str(exc))
            await self._event(model, version, event, str(exc))
            return False
        self.recorded += 1
        log.info("router: rollback of %s %s recorded in ConfigMap %s/%s (key %s) for every replica",
                 model, version, self.api.namespace, self.configmap, self.key)
        return True

    async def _patch(self, model: str, version: str, event: dict[str, Any]) -> None:
        assert self.api is not None and self.configmap
        for attempt in range(1, TRIES + 1):
            found = await self.api.get_configmap(self.configmap)
            text = (found.get("data") or {}).get(self.key) or '{"routes": {}}'
            try:
                doc = json.loads(text)
            except ValueError:
                doc = {}
            routes = {m: routes_doc.entry(r) for m, r in self.table.state()["routes"].items()}
            # The model's route as this router has it stands in where the file has none.
            new = routes_doc.with_rollback(doc if isinstance(doc, dict) else {}, model, version, event, routes[model])
            try:
                routes_doc.check_routes(new, self.versions())
            except ValueError as exc:
                # Every router refuses the file as it is: this router's routes (its last good
                # ones, the rollback included) replace it, so that the rollback takes effect.
                log.warning("router: routes ConfigMap %s holds a document the routers refuse (%s); writing this "
                            "router's routes in its place", self.configmap, exc)
                new = routes_doc.with_rollback({"routes": routes}, model, version, event, routes[model])
            try:
                await self.api.patch_configmap(self.configmap, {self.key: routes_doc.dumps(new)},
                                               (found.get("metadata") or {}).get("resourceVersion"))
                return
            except KubeError as exc:
                if exc.status != 409 or attempt == TRIES:
                    raise
                # Changed since it was read (a kubectl apply, another replica's rollback): read again.

    def _unrecorded(self, model: str, version: str, why: str) -> None:
        self.unrecorded += 1
        log.warning("router: rolled back %s %s on this replica only: it could not be written to the routes "
                    "ConfigMap (%s); other replicas may still send it traffic. Record it with "
                    "`tsfleet rollout rollback %s --kube`", model, version, why, model)

    async def _event(self, model: str, version: str, event: dict[str, Any], why: str) -> None:
        assert self.api is not None
        message = (f"rolled back {model} {version} ({event.get('reason', '')}) on pod {self.pod} only: the routes "
                   f"ConfigMap {self.configmap} could not be patched ({why})")
        try:
            await self.api.create_event({"kind": "Pod", "name": self.pod}, "RollbackNotRecorded", message,
                                        COMPONENT, host=self.pod)
        except KubeError as exc:
            log.warning("router: no Event either (%s)", exc)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Give records under way a moment to finish (a rollback just before a SIGTERM)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in self._tasks:
            task.cancel()

    def collect(self) -> Iterator[Metric]:
        """Rollbacks recorded in the ConfigMap, and those that were not (a Prometheus collector)."""
        yield CounterMetricFamily("tsfleet_router_rollback_recorded_total",
                                  "Automatic rollbacks written to the routes ConfigMap.", value=self.recorded)
        yield CounterMetricFamily("tsfleet_router_rollback_unrecorded_total",
                                  "Automatic rollbacks that hold on this replica only (the routes ConfigMap could not "
                                  "be patched).", value=self.unrecorded)

    def prometheus(self) -> str:
        """``collect`` as /metrics text."""
        return generate_latest(self).decode()
