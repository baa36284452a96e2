"""The worker's side of recycling: it reports its own counters, and retires when asked.

TorchServe exposes no per-worker request count and cannot retire a chosen worker, so each
worker writes ``<report_dir>/<model>/<version>/<pid>.json`` (requests served, start time,
RSS, CUDA memory) for the recycler to read. When the recycler drops a ``<pid>.retire``
file beside it, the worker exits at its next idle moment: after its last answer was sent
and while it waits for the next batch, so no request it accepted is lost. TorchServe then
starts a fresh process in the same slot.

While a ``drain`` file exists in the version's folder (``tsfleet apply`` is about to
unregister this version), each worker also writes ``<pid>.state``: whether it is idle right
now and how many requests it has served, so apply unregisters it only once it has no work.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from handlers.runtime import process_rss_mb

log = logging.getLogger(__name__)
REPORT_EVERY_S = 0.5
DRAIN_FLAG = "drain"
DRAIN_POLL_S = 0.2
STATE_EVERY_S = 0.02


def default_report_dir() -> Path:
    return Path(tempfile.gettempdir()) / "tsfleet-workers"


def _idle_in_main_thread() -> bool:
    """True while TorchServe's worker loop waits for the first byte of the next message."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    # The worker loop blocks in otf_message_handler._retrieve_buffer(conn, 1) between jobs.
    return bool(frame and frame.f_code.co_name == "_retrieve_buffer"
                and frame.f_locals.get("length") == 1 and not frame.f_locals.get("data"))


class WorkerLifecycle:
    """Writes this worker's report now and then; exits when idle once asked to retire."""

    def __init__(self, report_dir: str, model: str, version: str, device: torch.device):
        base = Path(report_dir) if report_dir else default_report_dir()
        self.dir = base / model / version
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid()
        self.path = self.dir / f"{self.pid}.json"
        self.retire_flag = self.dir / f"{self.pid}.retire"
        self.device = device
        self.started = time.time()
        self.requests = 0
        self._last_report = 0.0
        self._retiring = False
        self.report()
        # A worker TorchServe stops (scale-down, shutdown) exits through sys.exit: leave no
        # stale report behind. A killed one leaves its file; readers skip dead pids.
        atexit.register(self.path.unlink, missing_ok=True)
        self.state_path = self.dir / f"{self.pid}.state"
        atexit.register(self.state_path.unlink, missing_ok=True)
        threading.Thread(target=self._watch_drain, name="drain-watch", daemon=True).start()

    def report(self) -> None:
        doc = {"pid": self.pid, "requests": self.requests, "started": self.started,
               "rss_mb": process_rss_mb(), "updated": time.time(),
               "cuda_mb": torch.cuda.memory_reserved(self.device) / 2**20 if self.device.type == "cuda" else 0.0}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)
        self._last_report = time.monotonic()

    def after_batch(self, n_requests: int) -> None:
        """Count the batch; report at most every REPORT_EVERY_S; start retiring if asked."""
        self.requests += n_requests
        if time.monotonic() - self._last_report >= REPORT_EVERY_S:
            self.report()
        if not self._retiring and self.retire_flag.exists():
            self._retiring = True
            self.report()
            threading.Thread(target=self._exit_when_idle, name="retire", daemon=True).start()

    def _watch_drain(self) -> None:
        """Report idleness often while the version drains; otherwise a cheap stat now and then."""
        flag, tmp = self.dir / DRAIN_FLAG, self.state_path.with_suffix(".state-tmp")
        while True:
            if flag.exists():
                tmp.write_text(json.dumps({"idle": _idle_in_main_thread(), "requests": self.requests,
                                           "at": time.time()}))
                os.replace(tmp, self.state_path)
                time.sleep(STATE_EVERY_S)
            else:
                time.sleep(DRAIN_POLL_S)

    def _exit_when_idle(self) -> None:
        while True:
            if _idle_in_main_thread():
                log.info("worker %d retiring after %d requests, as the recycler asked", self.pid, self.requests)
                for path in (self.path, self.retire_flag):
                    path.unlink(missing_ok=True)
                logging.shutdown()
                os._exit(0)
            time.sleep(0.001)
