"""Shared pieces of the benchmarks: a private TorchServe, the router as its own process,
and a bounded closed-loop load generator that records every answer."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import requests

from tsfleet.manifest import Fleet
from tsfleet.build.properties import Endpoints
from tsfleet.control.server import TorchServe


def start_torchserve(fleet: Fleet, store: Path, workdir: Path) -> TorchServe:
    """An isolated TorchServe serving ``fleet``, started and ready."""
    ts = TorchServe.isolated(fleet, store, workdir)
    ts.start(snapshots=False)
    try:
        ts.wait_ready(fleet, timeout=300, progress=lambda line: None)
    except Exception:
        ts.stop()
        raise
    return ts


class RouterProcessRunner:
    """``tsfleet route`` as its own process, as in production: a router sharing the load
    generator's interpreter would share its GIL and measure that instead."""

    def __init__(self, manifest: Path, config: Path, workdir: Path, processes: int = 1, code: Path | None = None):
        """``config``: the config.properties of the TorchServe (or stand-in) to route to;
        ``code``: another checkout whose router to run (to compare two versions of it)."""
        free = Endpoints.on_free_ports()
        port, admin, grpc_port = free.inference, free.management, free.metrics
        self.url = f"http://127.0.0.1:{port}"
        self.grpc = f"127.0.0.1:{grpc_port}"
        log_path = workdir / "router.log"
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        earlier = self.log.tell()  # a router started here before left its own banner
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tsfleet", "--manifest", str(manifest), "--config", str(config),
             "--router-key-file", str(workdir / "router_key.json"), "route", "--port", str(port),
             "--admin-port", str(admin), "--grpc-port", str(grpc_port),
             "--state-file", str(workdir / "router_state.json"), "--processes", str(processes)],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **({"PYTHONPATH": str(code)} if code else {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            # The banner comes once every process listens.
            if b"router: REST" in log_path.read_bytes()[earlier:]:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the router did not start")

    def pids(self) -> list[int]:
        """The router's processes: the leader and its fronts."""
        return [self.proc.pid, *(p.pid for p in psutil.Process(self.proc.pid).children())]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # what each failed request was told

    @property
    def failed(self) -> int:
        return sum(s != 200 for s in self.statuses)

    def pct(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.statuses) / self.seconds if self.seconds else 0.0

    def row(self) -> dict:
        return {"requests": len(self.statuses), "failed": self.failed, "rps": round(self.throughput, 1),
                "p50_ms": round(self.pct(0.5), 2), "p99_ms": round(self.pct(0.99), 2), "errors": self.errors[:20]}


def closed_loop(url: str, body: bytes, headers: dict[str, str], clients: int, seconds: float,
                until: Callable[[], bool] = lambda: False, max_requests: int = 100_000) -> LoadResult:
    """``clients`` threads, each sending the next request when the last answered, for
    ``seconds`` (or until ``until()``), at most ``max_requests`` in all."""
    result, lock = LoadResult(), threading.Lock()
    started = deadline = time.monotonic()
    deadline += seconds

    def worker() -> None:
        session = requests.Session()
        while time.monotonic() < deadline and not until():
            with lock:
                if len(result.statuses) >= max_requests:
                    return
            t0 = time.perf_counter()
            error = None
            try:
                resp = session.post(url, data=body, headers=headers, timeout=60)
                status = resp.status_code
                if status != 200:
                    error = f"{status} {resp.text[:200]}"
            except requests.RequestException as exc:
                status, error = 599, f"client error: {exc}"
            with lock:
                result.latencies.append(time.perf_counter() - t0)
                result.statuses.append(status)
                if error:
                    result.errors.append(f"{time.monotonic() - started:.1f} s: {error}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - started
    return result


def median_spread(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), (max(values) - min(values)) if values else 0.0
