"""The peers of the speed comparison: the servers a user choosing one would also try, each
started as its own docs start it, serving the same model code (models.py) on a free port.

=========  ===============================================  ======================
peer       how it batches                                   sweep (same as ours)
=========  ===============================================  ======================
fastapi    none: one request per forward pass               workers x threads
litserve   LitAPI max_batch_size / batch_timeout             batch, delay, layout
mosec      append_worker max_batch_size / max_wait_time     batch, delay, layout
ray        @serve.batch max_batch_size / batch_wait_timeout batch, delay, layout
=========  ===============================================  ======================
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from benchmarks.speed.peers.models import PeerConfig

ROOT = Path(__file__).resolve().parents[3]
KINDS = ("fastapi-default", "fastapi", "litserve", "mosec", "ray")
LABELS = {"fastapi-default": "FastAPI + uvicorn, sync def, 1 worker (the tutorial's default)",
          "fastapi": "FastAPI + uvicorn, async def, uvicorn workers",
          "litserve": "LitServe, batching", "mosec": "mosec, batching", "ray": "Ray Serve, @serve.batch"}


def command(kind: str, cfg: PeerConfig, port: int, work: Path) -> list[str]:
    """The command line that starts ``kind`` with ``cfg`` on ``port``."""
    py = sys.executable
    if kind in ("fastapi", "fastapi-default"):
        return [py, "-m", "uvicorn", "benchmarks.speed.peers.fastapi_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(cfg.workers), "--log-level", "warning", "--no-access-log"]
    if kind == "litserve":
        return [py, "-m", "benchmarks.speed.peers.litserve_app", str(port)]
    if kind == "mosec":
        sockets = work / f"mosec-{port}"
        sockets.mkdir(parents=True, exist_ok=True)
        return [py, "-m", "benchmarks.speed.peers.mosec_app", "--address", "127.0.0.1", "--port", str(port),
                "--path", str(sockets), "--log-level", "warning", "--timeout", "30000"]
    if kind == "ray":
        return [py, "-m", "benchmarks.speed.peers.ray_app", str(port)]
    raise ValueError(f"no peer {kind!r}; peers: {', '.join(KINDS)}")


class PeerServer:
    """One peer process group, serving ``POST /predict``, up until ``stop``."""

    def __init__(self, kind: str, cfg: PeerConfig, port: int, work: Path, probe: tuple[bytes, str],
                 timeout: float = 180):
        self.kind, self.cfg = kind, cfg
        self.url = f"http://127.0.0.1:{port}/predict"
        self.log_path = work / f"{kind}-{cfg.model}-{port}.log"
        env = {**os.environ, **cfg.env(), "BENCH_PEER_STYLE": "sync" if kind == "fastapi-default" else "async",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
        self._log = open(self.log_path, "ab")
        # Its own session: stop() ends every process it started (workers, Ray's daemons).
        self.proc = subprocess.Popen(command(kind, cfg, port, work), cwd=work, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_answering(probe, timeout)

    def _wait_answering(self, probe: tuple[bytes, str], timeout: float) -> None:
        body, ctype = probe
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if requests.post(self.url, data=body, headers={"Content-Type": ctype}, timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)  # poll interval inside the deadline above
        exited = self.proc.poll()
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        why = f"exited with {exited}" if exited is not None else f"did not answer within {timeout:.0f} s"
        raise RuntimeError(f"peer {self.kind} ({self.cfg.model}) {why}; {self.log_path}:\n{tail}")

    def pids(self) -> list[int]:
        """Every live process of the peer's session (front, workers, daemons)."""
        import psutil

        out = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.proc.pid:
                    out.append(p.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return out

    def stop(self) -> None:
        """SIGTERM to the session; once the server (the session leader) has exited, or after
        20 s, SIGKILL to what is left after a short grace.

        LitServe's spawned inference workers ignore SIGTERM and wait on their queue for ever
        (20 s lost per stop, 3-4 minutes per full run): once the server they served is gone,
        nothing of theirs is worth waiting for."""
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.2)  # poll interval inside the deadline above
        deadline = min(deadline, time.monotonic() + 2.0)
        # poll() first: it reaps the session leader, which pids() would list as a zombie.
        while time.monotonic() < deadline and (self.proc.poll() is None or self.pids()):
            time.sleep(0.2)  # poll interval inside the deadline above
        self._signal(signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and (self.proc.poll() is None or self.pids()):
            time.sleep(0.2)  # poll interval inside the deadline above
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._log.close()

    def _signal(self, sig: signal.Signals) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
