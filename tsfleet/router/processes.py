"""A router of several processes: the leader (the ``tsfleet route`` process) and its fronts.

One Python process proxies on one core. On a box with a GPU and cores to spare, TorchServe
answered ~11,000 image requests a second with 64 clients, and one router process passed
0.76-0.81 of that; four passed 0.81-0.96 (docs/gpu-box.md). With ``--processes N`` the leader
starts N-1 front processes that listen on the same REST and gRPC ports (SO_REUSEPORT: the
kernel spreads connections, not requests, over all N; a gRPC channel is one connection).
The default, ``auto``, is one process per four usable CPUs, at most four (auto_processes).

The leader stays the one place that decides, so nothing a user sees depends on which
process a connection landed on:

- A front routes with a copy of the leader's routes, sent at its start and after every
  change (admin API, rollback), and never decides a rollback itself.
- A front sends the leader what it saw (each answer's arm, outcome and latency; shadow
  results) every ``FLUSH_S``. The leader adds them to its own statistics, so automatic
  rollbacks, ``/metrics``, the admin API and ``tsfleet rollout status`` count every process.
- ``/metrics`` on a front is answered from the leader's statistics.
- A front exits when the leader goes away (its channel closes); the leader starts a front
  again if one dies.

The channel is a socket pair carrying one JSON document per line.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tsfleet.router.keys import InferenceKeys, previous_keys, router_keys
from tsfleet.router.memory import keep_freed_memory
from tsfleet.router.readiness import ModelReadiness
from tsfleet.router.fronts.rest import RestRouter
from tsfleet.router.policy.routing import Route, RoutingTable
from tsfleet.router.wire.limits import FRONTS, LimitCounters, with_values

log = logging.getLogger(__name__)
FLUSH_S = 0.2
READY_TIMEOUT_S = 30.0
RESTART_BACKOFF_S = 1.0
LINE_LIMIT = 64 * 2**20  # a busy front's FLUSH_S of answers is one line
# Past four, more processes gained nothing on a 16-CPU box (docs/gpu-box.md).
AUTO_MAX = 4
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup CPU quota (a container's
    CPU limit, which the affinity does not show)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU controller here: the affinity is the limit
    return cpus


def auto_processes(cpus: int | None = None) -> int:
    """``--processes auto``: one per four CPUs, at most AUTO_MAX. A small box keeps one
    process, whose core TorchServe's workers need more."""
    return max(1, min(AUTO_MAX, (usable_cpus() if cpus is None else cpus) // 4))


def process_count(text: str) -> int:
    """``--processes`` as given: ``auto`` (auto_processes) or a count of at least 1."""
    if text == "auto":
        return auto_processes()
    if not (text.isdigit() and int(text) >= 1):
        raise ValueError(f"expected auto or a count of at least 1, got {text!r}")
    return int(text)


def _encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def _routes_message(table: RoutingTable) -> dict[str, Any]:
    return {"t": "routes", **table.state(), "streaming": {m: r.streaming for m, r in table.routes.items()}}


@dataclass
class _Front:
    proc: subprocess.Popen
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    applied: int = 0  # the last routes change it has taken
    task: asyncio.Task | None = None


class Fronts:
    """The leader's side: starts, feeds, hears and restarts the front processes."""

    def __init__(self, table: RoutingTable, count: int, options: dict[str, Any],
                 metrics: Callable[[], str] | None = None):
        self.table, self.count, self.options = table, count, options
        # /metrics as the leader answers it (a front's is asked of the leader).
        self.metrics = metrics if metrics is not None else table.prometheus
        # How often each limit fired in the fronts, all of them, every one started so far.
        self.hits = {front: LimitCounters() for front in FRONTS}
        self.fronts: list[_Front] = []
        self._stopping = False
        self._supervisor: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seq = 0  # routes changes sent so far
        self.key_generation = 0  # router key rotations: a front re-reads the key file on a new one
        table.on_change = self.broadcast

    async def start(self) -> None:
        """Start every front and wait until each listens."""
        self._loop = asyncio.get_running_loop()
        self.fronts = [await self._spawn() for _ in range(self.count)]
        await self._wait_ready(self.fronts)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    def pids(self) -> list[int]:
        return [f.proc.pid for f in self.fronts]

    async def _spawn(self) -> _Front:
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-m", "tsfleet.router.processes", json.dumps(self.options),
                                 str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT)
        front = _Front(proc, writer, reader, applied=self._seq)
        writer.write(_encode({**_routes_message(self.table), "seq": self._seq, "keys": self.key_generation}))
        front.task = asyncio.get_running_loop().create_task(self._hear(front))
        return front

    async def _wait_ready(self, fronts: list[_Front]) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*(f.ready.wait() for f in fronts)), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"a router front did not start listening within {READY_TIMEOUT_S:.0f} s "
                               f"(front pids {[f.proc.pid for f in fronts]})") from None

    async def _hear(self, front: _Front) -> None:
        while line := await front.reader.readline():
            msg = json.loads(line)
            kind = msg["t"]
            if kind == "seen":
                self._take(msg)
            elif kind == "metrics":
                front.writer.write(_encode({"t": "metrics", "id": msg["id"], "text": self.metrics()}))
            elif kind == "limits":
                for name, counts in msg["hits"].items():
                    self.hits[name].add(counts)
            elif kind == "applied":
                front.applied = max(front.applied, msg["seq"])
            elif kind == "ready":
                front.ready.set()

    def _take(self, msg: dict[str, Any]) -> None:
        now = time.monotonic()
        for model, version, ok, latency, retried in msg["answers"]:
            event = self.table.record(model, version, ok, latency, retried, now=now)
            if event:
                log.warning("rolled back %s %s: %s", model, event["version"], event["reason"])
        for model, version, ok, agree in msg["shadow"]:
            self.table.record_shadow(model, version, ok, agree)

    def broadcast(self) -> None:
        """Send every front the routes as they are now (from any thread: transports are the loop's)."""
        self._seq += 1
        data = _encode({**_routes_message(self.table), "seq": self._seq, "keys": self.key_generation})
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if self._loop is not None and here is not self._loop:
            self._loop.call_soon_threadsafe(self._send_all, data)
        else:
            self._send_all(data)

    def _send_all(self, data: bytes) -> None:
        for front in self.fronts:
            if not front.writer.is_closing():
                front.writer.write(data)

    async def reload_keys(self) -> None:
        """Have every front take the router key file's keys (after a rotation), and wait for it."""
        self.key_generation += 1
        self.broadcast()
        await self.settled()

    async def settled(self, timeout_s: float = 2.0) -> None:
        """Wait until every live front routes by the latest change, so that a change the
        admin API answered for is in force on every process."""
        want, deadline = self._seq, time.monotonic() + timeout_s
        while any(f.applied < want and f.proc.poll() is None for f in self.fronts):
            if time.monotonic() > deadline:
                log.warning("a router front has not taken routes change %d after %.0f s", want, timeout_s)
                return
            await asyncio.sleep(0.005)

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RESTART_BACKOFF_S)
            for i, front in enumerate(self.fronts):
                code = front.proc.poll()
                if code is None or self._stopping:
                    continue
                log.warning("router front %d exited with status %s; starting it again", front.proc.pid, code)
                front.writer.close()
                fresh = await self._spawn()
                self.fronts[i] = fresh
                try:
                    await self._wait_ready([fresh])
                except RuntimeError as exc:
                    log.error("%s", exc)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop every front: close its channel (it stops listening and exits), then wait."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        for front in self.fronts:
            front.writer.close()
        deadline = time.monotonic() + grace_s
        for front in self.fronts:
            while front.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if front.proc.poll() is None:
                front.proc.kill()
                front.proc.wait()
            if front.task is not None:
                front.task.cancel()


# ---------------------------------------------------------------------- a front process
class _Leader:
    """A front's side of the channel."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, table: RoutingTable,
                 keys: InferenceKeys | None = None, key_file: Path | None = None, key_generation: int = 0,
                 hits: dict[str, LimitCounters] | None = None):
        self.reader, self.writer, self.table = reader, writer, table
        self.keys, self.key_file, self.key_generation = keys, key_file, key_generation
        self._asked: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self.hits = hits or {}  # this process's limit counters, per front
        self._told: dict[str, dict[str, int]] = {front: {} for front in self.hits}  # what the leader has of them

    def tell_hits(self) -> None:
        """Send the leader what this process's limits counted since it last did (it adds
        them up, so a front started again counts on from where the others are)."""
        delta = {}
        for front, counters in self.hits.items():
            now, told = counters.counts(), self._told[front]
            changed = {name: n - told.get(name, 0) for name, n in now.items() if n != told.get(name, 0)}
            if changed:
                delta[front] = changed
                self._told[front] = now
        if delta:
            self.writer.write(_encode({"t": "limits", "hits": delta}))

    async def metrics(self) -> str:
        self.tell_hits()  # ahead of the question, on the same channel: the answer counts them
        n = next(self._ids)
        fut = self._asked[n] = asyncio.get_running_loop().create_future()
        self.writer.write(_encode({"t": "metrics", "id": n}))
        try:
            return await asyncio.wait_for(fut, 10)
        finally:
            self._asked.pop(n, None)

    async def hear(self) -> None:
        """Apply the leader's route changes until the channel closes."""
        while line := await self.reader.readline():
            msg = json.loads(line)
            if msg["t"] == "routes":
                _take_routes(self.table, msg)
                if msg.get("keys", 0) != self.key_generation and self.keys is not None and self.key_file is not None:
                    self.keys.reload(self.key_file)
                    self.key_generation = msg["keys"]
                self.writer.write(_encode({"t": "applied", "seq": msg["seq"]}))
            elif msg["t"] == "metrics" and msg["id"] in self._asked:
                self._asked[msg["id"]].set_result(msg["text"])

    async def flush(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            self.tell_hits()
            if self.table.sink or self.table.shadow_sink:
                answers, shadow = self.table.sink, self.table.shadow_sink
                self.table.sink, self.table.shadow_sink = [], []
                self.writer.write(_encode({"t": "seen", "answers": answers, "shadow": shadow}))


def _take_routes(table: RoutingTable, msg: dict[str, Any]) -> None:
    """Route as the leader's ``_routes_message`` says: its models (a manifest change adds
    and removes some, manifest_routes.py) and their live weights."""
    for model in [m for m in table.routes if m not in msg["routes"]]:
        del table.routes[model]
    for model, saved in msg["routes"].items():
        if model not in table.routes:
            table.routes[model] = Route(model, saved["baseline"], dict(saved["weights"]))
        table.routes[model].streaming = msg["streaming"][model]
    table.apply_state(msg)


async def _front(options: dict[str, Any], fd: int) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd), limit=LINE_LIMIT)
    first = json.loads(await reader.readline())
    table = RoutingTable({})  # no state file: the leader keeps it
    _take_routes(table, first)
    table.sink, table.shadow_sink, table.decides = [], [], False
    keys = None
    if options.get("ts_key_file"):  # each process keeps its own copy fresh (keys.py)
        mine = router_keys(Path(options["key_file"]))
        keys = InferenceKeys(mine["inference"], Path(options["ts_key_file"]), options["upstream_management"],
                             previous_keys(mine))
        fresh = asyncio.get_running_loop().create_task(keys.keep_fresh())
    hits = {front: LimitCounters() for front in FRONTS}
    limits = with_values(options["limits"]) if options.get("limits") else None
    leader = _Leader(reader, writer, table, keys, Path(options["key_file"]), first.get("keys", 0), hits)
    readiness = ModelReadiness(table, keys, workflows=options.get("workflows", []))
    rest = RestRouter(table, options["upstream_rest"], metrics=leader.metrics, keys=keys, readiness=readiness,
                      limits=limits, counters=hits["rest"])
    await rest.start(options["host"], options["port"], reuse_port=True)
    grpc = None
    if options.get("grpc_port"):
        from tsfleet.router.fronts.grpc_front import start_grpc_router, stop_grpc_router

        grpc, _ = await start_grpc_router(table, options["upstream_grpc"], options["host"], options["grpc_port"],
                                          reuse_port=True, keys=keys, readiness=readiness, limits=limits,
                                          counters=hits["grpc"])
    writer.write(_encode({"t": "ready"}))
    loop = asyncio.get_running_loop()
    flusher = loop.create_task(leader.flush())
    hearing = loop.create_task(leader.hear())
    loop.add_signal_handler(signal.SIGTERM, hearing.cancel)
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):  # the leader is gone: stop too
        await hearing
    flusher.cancel()
    if keys is not None:
        fresh.cancel()
    drain = options.get("drain_s", 10.0)
    await asyncio.gather(rest.stop(drain), *([stop_grpc_router(grpc, grace=drain)] if grpc is not None else []))


def main(argv: list[str]) -> None:
    """``python -m tsfleet.router.processes OPTIONS_JSON FD``: one front, run by the leader."""
    # Ctrl-C reaches the whole process group: the leader stops the fronts in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s front %(process)d: %(message)s")
    options, fd = json.loads(argv[0]), int(argv[1])
    keep_freed_memory()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    (uvloop.run if uvloop else asyncio.run)(_front(options, fd))


if __name__ == "__main__":
    main(sys.argv[1:])
