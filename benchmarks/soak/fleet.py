"""The fleet the soak loads: started the way `tsfleet up` starts it, on free loopback ports.

`tsfleet up` puts its router on fixed ports (8090, 7090, 8091), which a fleet or a test
already running on the machine may hold. So this runs up's own steps from the library:
``up.bring_up`` (TorchServe started, taken to the manifest with apply, workers ready, the
serving path warmed up), then the recycler and the router as the same companions, under the
same Supervisor (started again if they exit), only on ports the kernel says are free.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import yaml

from tsfleet.control import companions

from tsfleet.control import up
from tsfleet.errors import FleetError
from tsfleet.manifest import Fleet, load_fleet
from tsfleet.control.recycle import EVENTS, read_reports
from tsfleet.control.server import TorchServe

ROOT = Path(__file__).resolve().parents[2]
Say = Callable[[str], None]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class Proc:
    """One process of the fleet at one look: ``kind`` is frontend, worker, router, recycler or
    log writer; ``role`` tells a worker's serving process from a waiter (the slot process
    after a replacement) or a successor still loading."""

    pid: int
    kind: str
    label: str
    role: str = ""


class SoakFleet:
    """TorchServe, its router and its recycler in ``work``; ``start`` then ``stop``."""

    def __init__(self, work: Path, say: Say, manifest: Path = ROOT / "fleet.yaml"):
        self.work, self.say = work, say
        folder = work / "manifest"
        folder.mkdir(parents=True, exist_ok=True)
        # The manifest's handler paths are relative to its folder.
        for name in ("handlers", "model_store"):
            link = folder / name
            if not link.exists():
                link.symlink_to(ROOT / name)
        self.manifest = folder / "fleet.yaml"
        shutil.copyfile(manifest, self.manifest)
        self.fleet: Fleet = load_fleet(self.manifest)
        self.ts = TorchServe.isolated(self.fleet, ROOT / "model_store", work / "fleet")
        self.rest_port, self.grpc_port, self.admin_port, self.recycler_port = free_ports(4)
        self.supervisor: companions.Supervisor | None = None

    # ------------------------------------------------------------------ life
    def start(self, timeout: float = 300) -> None:
        up.bring_up(self.ts, self.fleet, timeout, lambda line: self.say("  " + line))

    def start_companions(self) -> None:
        """The recycler and the router, as up's _start_companions, on this fleet's ports."""
        ts = self.ts
        common = ["--manifest", str(self.manifest), "--config", str(ts.config),
                  "--key-file", str(ts.workdir / "key_file.json"), "--report-dir", str(ts.report_dir)]
        self.supervisor = companions.Supervisor(ts.workdir, lambda line: self.say("  " + line))
        self.supervisor.start("recycle", [*common, "recycle", "--metrics-port", str(self.recycler_port)])
        router = self.supervisor.start("route", [*common, "route", "--processes", "auto", "--host", "127.0.0.1",
                                                 "--port", str(self.rest_port), "--grpc-port", str(self.grpc_port),
                                                 "--admin-port", str(self.admin_port)])
        for port in (self.rest_port, self.grpc_port, self.admin_port):
            if not companions.wait_listening(router, "127.0.0.1", port):
                raise FleetError(f"the router did not start listening on 127.0.0.1:{port}; "
                                 f"see {ts.workdir / 'logs' / 'route.log'}")

    def check_companions(self) -> None:
        """What up's watch loop does each second: start again a companion that exited."""
        if self.supervisor is not None:
            self.supervisor.check()

    def stop(self) -> None:
        up.stop_all(self.ts)

    # ------------------------------------------------------------- recycling
    def add_recycling(self, due: dict[tuple[str, str], float], say: Say) -> dict[str, str]:
        """Give each version in ``due`` a max_age_s that falls due ``due[...]`` seconds from
        now, unless its own policy already replaces it sooner; write the manifest the
        recycler follows. Returns what was done, per version, for the report."""
        doc = yaml.safe_load(self.manifest.read_text())
        done: dict[str, str] = {}
        now = time.time()
        for (model, version), in_s in due.items():
            spec = self.fleet.models[model].versions[version]
            reports = read_reports(self.ts.report_dir, model, version)
            age = now - min((r.started for r in reports.values()), default=now)
            max_age = int(math.ceil(age + in_s))
            own = spec.recycle
            name = f"{model} {version}"
            if own.max_age_s and own.max_age_s <= max_age:
                done[name] = f"fleet.yaml's own policy (max_age_s {own.max_age_s}) replaces it within the run"
                continue
            versions = doc["models"][model]["versions"]
            entry = versions.get(version) or {}
            entry["recycle"] = {**(entry.get("recycle") or {}), "max_age_s": max_age}
            versions[version] = entry
            before = "no recycle policy" if not own.enabled else "a policy that may not fall due within the run"
            done[name] = (f"fleet.yaml gives it {before}; this run adds max_age_s {max_age} "
                          f"(its worker is {age:.0f} s old: replaced about {in_s:.0f} s into the load)")
        self.manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.fleet = load_fleet(self.manifest)
        for name, text in done.items():
            say(f"  recycling {name}: {text}")
        return done

    def recycles(self) -> list[dict]:
        """The recycler's events so far (its log in the workers' report folder)."""
        try:
            lines = (self.ts.report_dir / EVENTS).read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    # ------------------------------------------------------------- processes
    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def router_grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def router_key(self, which: str = "inference") -> str:
        return json.loads((self.ts.workdir / "router_key.json").read_text())[which]

    def frontend_pid(self) -> int | None:
        try:
            return int((self.ts.tmp_dir / ".model_server.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def worker_slots(self) -> dict[int, tuple[str, str, int]]:
        """Each worker's slot pid (the one TorchServe shows) -> (model, version, the pid of the
        process serving it now), from the workers' own reports."""
        slots = {}
        for path in self.ts.report_dir.glob("*/*/*.json"):
            try:
                doc = json.loads(path.read_text())
                slots[int(doc["pid"])] = (path.parent.parent.name, path.parent.name, int(doc.get("process", doc["pid"])))
            except (OSError, ValueError, KeyError):
                continue  # being written, or a stale file of a dead worker
        return slots

    def processes(self) -> list[Proc]:
        """Every process of the fleet now."""
        out: list[Proc] = []
        frontend = self.frontend_pid()
        if frontend is not None and psutil.pid_exists(frontend):
            out.append(Proc(frontend, "frontend", "TorchServe frontend (JVM)"))
            slots = self.worker_slots()
            try:
                tree = psutil.Process(frontend).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            for proc in tree:
                out.append(self._worker(proc, slots))
        # The companions' log writers (tsfleet/control/rolling_log.py) run as children of whoever
        # started the companions: this process.
        for child in psutil.Process().children():
            try:
                cmd = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "tsfleet.control.rolling_log" in cmd and any(a.startswith(str(self.ts.workdir)) for a in cmd):
                log = next(Path(a).name for a in cmd if a.startswith(str(self.ts.workdir)))
                out.append(Proc(child.pid, "log writer", f"log writer ({log})"))
        for name, kind in (("route", "router"), ("recycle", "recycler")):
            pid = companions.running(self.ts.workdir, name)
            if pid is None:
                continue
            out.append(Proc(pid, kind, "router (leader)" if kind == "router" else "recycler"))
            if kind == "router":
                try:
                    out += [Proc(c.pid, kind, "router (front)") for c in psutil.Process(pid).children()]
                except psutil.NoSuchProcess:
                    pass
        return out

    def listeners(self) -> list[str]:
        """Every address a fleet process listens on (TCP), as "ip:port"."""
        out = set()
        for p in self.processes():
            try:
                conns = psutil.Process(p.pid).net_connections("tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            out |= {f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN}
        return sorted(out)

    @staticmethod
    def _worker(proc: psutil.Process, slots: dict[int, tuple[str, str, int]]) -> Proc:
        """Name a process under the frontend by the slot it belongs to: itself or its
        nearest ancestor that is a slot (a successor runs under the process it replaces)."""
        pid, here = proc.pid, proc
        while here is not None and here.pid not in slots:
            try:
                here = here.parent()
            except psutil.NoSuchProcess:
                here = None
        if here is None:
            return Proc(pid, "worker", f"worker pid {pid} (no report yet)", "serving")
        model, version, serving = slots[here.pid]
        try:
            # A replaced slot process execs the waiter (handlers/handover.py): its command line
            # says so at once, where the report naming the new serving process lags a little.
            waiter = any("waiter_main" in arg for arg in proc.cmdline())
        except psutil.NoSuchProcess:
            waiter = False
        role = "waiter" if waiter else "serving" if pid in (serving, here.pid) else "successor"
        return Proc(pid, "worker", f"{model} {version} (slot {here.pid})", role)

    # -------------------------------------------------------------- the CLI
    def tsfleet(self, *args: str) -> subprocess.CompletedProcess:
        """A `tsfleet` command against this fleet, as an operator types it in its folder."""
        argv = [sys.executable, "-m", "tsfleet", "--manifest", str(self.manifest), "--config", str(self.ts.config),
                "--key-file", str(self.ts.workdir / "key_file.json"), "--report-dir", str(self.ts.report_dir),
                "--router-admin", f"http://127.0.0.1:{self.admin_port}",
                "--router-key-file", str(self.ts.workdir / "router_key.json"), *args]
        return subprocess.run(argv, cwd=self.ts.workdir, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
