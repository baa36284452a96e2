"""The routes file a router follows (``tsfleet route --routes-file``): on Kubernetes, a key of
the routes ConfigMap that every replica mounts, so that one ``kubectl apply`` (or
``tsfleet rollout --kube``) moves the traffic of every replica.

The kubelet updates a mounted ConfigMap by an atomic swap: it writes the new content into a
fresh ``..<timestamp>`` directory, points a ``..data_tmp`` symlink at it and renames that
over ``..data``; the file itself (``routes.json -> ..data/routes.json``) never changes, and
inotify on it sees nothing. So the leader looks once a second at what the path resolves to
(a stat through the symlinks: device, inode, size, times) and hashes the content when that
moved, or every ``REHASH_EVERY`` looks whatever it says (a rewrite within one timestamp
tick). A content it has not seen is checked in full (policy/routes_doc.py): a bad one is
refused with one log line naming the file and the problem, counted, and the last good
routes hold; a good one is applied and saved to the state file, and reaches every router
process the way an admin API change does (the table's ``on_change``, router/processes.py).

On a restart the state file says which content it last took (``RoutingTable.routes_file_sha256``):
the same content means the saved routes win, since they may hold an automatic rollback made
after it; another content means someone changed the file while the router was down, and the
file wins.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable, Collection, Iterator, Mapping

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from tsfleet.router.policy import routes_doc
from tsfleet.router.policy.routing import RoutingTable

log = logging.getLogger(__name__)
POLL_S = 1.0
REHASH_EVERY = 30  # looks: a content change the stat cannot see is found within this many


class RoutesFile:
    """Follows one routes file for the leader's routing table."""

    def __init__(self, path: Path, table: RoutingTable, versions: Callable[[], Mapping[str, Collection[str]]],
                 poll_s: float = POLL_S):
        self.path, self.table, self.versions, self.poll_s = Path(path), table, versions, poll_s
        # With several router processes: wait until every one routes by a change taken here.
        self.settled: Callable[[], Awaitable[None]] | None = None
        self.refused = 0
        self.applied = 0
        self._stat: tuple | None = None
        self._seen: str | None = None  # the last content looked at (its digest), good or not
        self._absent_said = False
        self._looks = 0
        self._task: asyncio.Task | None = None

    # ---------------------------------------------------------------- reading
    def _signature(self) -> tuple | None:
        """Where the path leads now and what the file there looks like; None when absent."""
        try:
            st = os.stat(self.path)  # through routes.json -> ..data/routes.json -> ..<timestamp>/
            target = os.path.realpath(self.path)
        except FileNotFoundError:
            return None
        return target, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _read(self) -> bytes | None:
        """The file's content, or None while it is absent (not published yet, or mid-swap)."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(routes_doc.MAX_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            if not self._absent_said:
                log.warning("router: routes file %s is absent; routing as before until it appears", self.path)
                self._absent_said = True
            return None
        self._absent_said = False
        return data

    # ---------------------------------------------------------------- taking
    def start_up(self) -> None:
        """At the router's start, before it serves: the file's routes, or the saved ones when
        the file is the one they came from (see the module's docstring)."""
        self._stat = self._signature()
        data = self._read()
        if data is None:
            return
        seen = self._seen = routes_doc.digest(data)
        if seen == self.table.routes_file_sha256:
            log.info("router: routes file %s is as this router last took it (sha256 %s); its saved routes hold, "
                     "changes made since included", self.path, seen[:12])
            return
        self._take(data, seen)

    def poll(self) -> bool:
        """One look; True when it changed the routes."""
        self._looks += 1
        signature = self._signature()
        if signature == self._stat and self._looks % REHASH_EVERY and signature is not None:
            return False
        data = self._read()
        if data is None:
            self._stat = None
            return False
        self._stat = signature
        seen = routes_doc.digest(data)
        if seen == self._seen:
            return False
        self._seen = seen
        return self._take(data, seen)

    def _take(self, data: bytes, seen: str) -> bool:
        try:
            routes = routes_doc.parse(data, self.versions())
        except ValueError as exc:
            self.refused += 1
            log.error("router: routes file %s refused: %s; the last good routes hold", self.path, exc)
            return False
        before = self.table.state()["routes"]
        state = {"routes": {model: {**route, "aliases": dict(self.table.routes[model].aliases)}
                            for model, route in routes.items()}}
        self.table.apply_state(state)
        self.table.routes_file_sha256 = seen
        self.table.save(quiet=True)  # and on to every front process (on_change)
        self.applied += 1
        after = self.table.state()["routes"]
        changed = [m for m in sorted(routes) if before.get(m) != after.get(m)]
        log.info("router: routes file %s applied (sha256 %s): %s", self.path, seen[:12],
                 "; ".join(f"{m} {_weights(after[m])}" for m in changed) or "no route changed")
        return True

    # ---------------------------------------------------------------- running
    async def _watch(self) -> None:
        unreadable: str | None = None
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                changed = self.poll()
                unreadable = None
            except OSError as exc:  # unreadable (permissions, I/O): say so once, keep the routes, look again
                if str(exc) != unreadable:
                    log.error("router: routes file %s cannot be read (%s); the last good routes hold", self.path, exc)
                changed, unreadable = False, str(exc)
            if changed and self.settled is not None:
                await self.settled()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def collect(self) -> Iterator[Metric]:
        """Contents taken and refused, and which one the routes came from (a Prometheus collector)."""
        yield CounterMetricFamily("tsfleet_router_routes_file_applied_total", "Routes file contents this router took.",
                                  value=self.applied)
        yield CounterMetricFamily("tsfleet_router_routes_file_refused_total",
                                  "Routes file contents refused (bad JSON, unknown model or version, bad weights); "
                                  "the last good routes held.", value=self.refused)
        info = GaugeMetricFamily("tsfleet_router_routes_file_info",
                                 "The routes file content (sha256, first 12 digits) this router's routes last came "
                                 "from; replicas that disagree show two values.", labels=("sha256",))
        if self.table.routes_file_sha256:
            info.add_metric((self.table.routes_file_sha256[:12],), 1)
        yield info

    def prometheus(self) -> str:
        """``collect`` as /metrics text."""
        return generate_latest(self).decode()


def _weights(route: dict[str, Any]) -> str:
    return ", ".join(f"{v} {w:g}" for v, w in sorted(route["weights"].items())) + f" (baseline {route['baseline']})"
