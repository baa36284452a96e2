"""A real `tsfleet up` for tests: TorchServe, the router and the recycler as a user starts
them, in a folder of the test's own, with what it printed and where each part listens.

Shared by tests/integration/test_cli_up.py and tests/reliability/test_faults_under_load.py.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.fleet_fixtures import ROOT, free_ports
from tsfleet.control import companions
from tsfleet.manifest import Fleet
from tsfleet.build.properties import Endpoints, render_properties


def _lines(proc: subprocess.Popen) -> "queue.Queue[str]":
    q: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in proc.stdout], daemon=True).start()
    return q


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass(frozen=True)
class CompanionPorts:
    """Where `up` starts the router (REST, gRPC, admin) and the recycler's metrics."""

    rest: int = 8090
    grpc: int = 7090
    admin: int = 8091
    recycler: int = 8083

    @classmethod
    def free(cls) -> "CompanionPorts":
        return cls(*free_ports(4))

    def options(self) -> list[str]:
        return ["--router-port", str(self.rest), "--router-grpc-port", str(self.grpc),
                "--router-admin-port", str(self.admin), "--recycler-port", str(self.recycler)]


@dataclass
class Up:
    """A running `tsfleet up`: its process, ports, and the lines it printed so far."""

    proc: subprocess.Popen
    ep: Endpoints
    lines: "queue.Queue[str]"
    seen: list[str]
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    ports: CompanionPorts

    def wait_for(self, text: str, seconds: float) -> float:
        """Wait until ``text`` is printed; when (time.monotonic()) its line was read."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return time.monotonic()
        raise AssertionError(f"{text!r} not printed in time:\n{''.join(self.seen)}")

    def pid(self, name: str) -> int:
        """The pid of a companion (route, recycle) from its pid file."""
        return int((self.workdir / "logs" / f"{name}.pid").read_text())

    def router_keys(self) -> dict:
        """The router's own tokens (admin, inference)."""
        return json.loads((self.workdir / "router_key.json").read_text())

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.rest}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.admin}"


@contextmanager
def running_up(fleet: Fleet, model_store: Path, tmp_path: Path, *options: str, manifest: Path = ROOT / "fleet.yaml",
               ports: CompanionPorts = CompanionPorts()) -> Iterator[Up]:
    """`tsfleet up` in ``tmp_path``, TorchServe on free ports (config.properties rendered from
    ``fleet``), the router and the recycler on ``ports`` (free ones: ``CompanionPorts.free()``),
    until it says the fleet serves; stopped after, with whatever it left running."""
    ep = Endpoints.on_free_ports()
    config = tmp_path / "config.properties"
    config.write_text(render_properties(fleet, ep, str(model_store)))
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "TEMP": str(tmp_path / "tmp"), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "tsfleet", "--manifest", str(manifest), "--config", str(config), "--model-store",
            str(model_store), "up", "--no-build", *options]
    if ports != CompanionPorts():
        argv += ports.options()
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # As from a terminal: a test run under nohup would otherwise pass on its ignored SIGHUP.
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    try:
        up = Up(proc, ep, _lines(proc), [], argv, env, tmp_path, ports)
        up.wait_for("Ctrl-C stops the fleet", 240)
        yield up
    finally:
        if proc.poll() is None:
            proc.kill()
        for name in ("route", "recycle"):  # what a failed test's `up` left running
            companions.stop(tmp_path, name)
        subprocess.run([str(Path(sys.executable).with_name("torchserve")), "--stop"], env=env,
                       capture_output=True, timeout=60)
