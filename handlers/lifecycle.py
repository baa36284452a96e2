"""The worker's side of recycling: it reports its own counters, and is replaced when asked.

TorchServe exposes no per-worker request count and cannot retire a chosen worker, so each
worker writes ``<report_dir>/<model>/<version>/<pid>.json`` (requests served, when this
process started, RSS, CUDA memory) for the recycler to read, ``pid`` being the one TorchServe
shows for the worker. When the recycler drops a ``<pid>.retire`` file beside it, the worker
starts a fresh process that takes over its connection once it has loaded the model
(handlers/handover.py): nothing it accepted is lost and the worker count never drops.

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
import threading
import time
from pathlib import Path

import torch

from handlers import handover
from handlers.contract import DRAIN_FLAG, pid_alive, default_report_dir, report_path, retire_path, state_path, version_folder
from handlers.runtime import process_rss_mb

log = logging.getLogger(__name__)
REPORT_EVERY_S = 0.5
DRAIN_POLL_S = 0.2
STATE_EVERY_S = 0.02


def _idle_in_main_thread() -> bool:
    """True while TorchServe's worker loop waits for the first byte of the next message."""
    if handover.GATE is not None:
        return handover.GATE.idle
    frame = sys._current_frames().get(threading.main_thread().ident)
    # Without the gate (a worker loop we do not know): it blocks in _retrieve_buffer(conn, 1).
    return bool(frame and frame.f_code.co_name == "_retrieve_buffer"
                and frame.f_locals.get("length") == 1 and not frame.f_locals.get("data"))


class WorkerLifecycle:
    """Writes this worker's report now and then; hands over to a fresh process when asked."""

    def __init__(self, report_dir: str, model: str, version: str, device: torch.device):
        base = Path(report_dir) if report_dir else default_report_dir()
        self.dir = version_folder(base, model, version)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pid = handover.slot_pid()  # the pid TorchServe shows, which names the files
        self.path = report_path(self.dir, self.pid)
        self.retire_flag = retire_path(self.dir, self.pid)
        self.state_path = state_path(self.dir, self.pid)
        self.device = device
        self.started = time.time()
        self.requests = 0
        self._last_report = 0.0
        self._reported = 0  # the request count the report on disk holds
        self._report_lock = threading.Lock()  # the main thread and the watch thread both report
        self._retiring = False
        self._handover_error = ""
        if handover.is_successor():
            # The old process still serves and reports: start once the connection is ours.
            handover.TAKE_OVER.append(self._start)
        else:
            self._sweep_dead()
            handover.install()
            self._start()

    def _sweep_dead(self) -> None:
        """Remove the files of this version's killed workers (an exiting one removes its own):
        readers skip them, but a pid used again by an unrelated process would revive one."""
        for path in self.dir.iterdir():
            pid = path.name.split(".", 1)[0]
            if pid.isdigit() and int(pid) != self.pid and not pid_alive(int(pid)):
                path.unlink(missing_ok=True)

    def _start(self) -> None:
        self.started = time.time()
        self.report()
        # A worker TorchServe stops (scale-down, shutdown) exits through sys.exit: leave no
        # stale report behind. A killed one leaves its file; readers skip dead pids.
        atexit.register(self.path.unlink, missing_ok=True)
        atexit.register(self.state_path.unlink, missing_ok=True)
        threading.Thread(target=self._watch, name="lifecycle-watch", daemon=True).start()

    def report(self) -> None:
        doc = {"pid": self.pid, "process": os.getpid(), "requests": self.requests, "started": self.started,
               "rss_mb": process_rss_mb(), "updated": time.time(),
               "cuda_mb": torch.cuda.memory_reserved(self.device) / 2**20 if self.device.type == "cuda" else 0.0}
        if self._handover_error:
            doc["handover_error"] = self._handover_error
        with self._report_lock:
            # Per thread, not only per process: two handlers in one process (as in the unit
            # tests) each hold their own lock, and a shared temp file made one's rename fail.
            tmp = self.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.path)
            self._last_report, self._reported = time.monotonic(), doc["requests"]

    def after_batch(self, n_requests: int) -> None:
        """Count the batch; report at most every REPORT_EVERY_S."""
        self.requests += n_requests
        if time.monotonic() - self._last_report >= REPORT_EVERY_S:
            self.report()

    def _watch(self) -> None:
        """Bring a stale report up to date and look for the retire flag, even while no request
        comes; while the version drains, report idleness often."""
        flag, tmp = self.dir / DRAIN_FLAG, self.state_path.with_suffix(".state-tmp")
        while True:
            if self.requests != self._reported and time.monotonic() - self._last_report >= REPORT_EVERY_S:
                self.report()  # the last requests before a quiet spell, which no batch will report
            if not self._retiring and self.retire_flag.exists():
                self._retiring = True
                threading.Thread(target=self._replace, name="retire", daemon=True).start()
            if flag.exists():
                tmp.write_text(json.dumps({"idle": _idle_in_main_thread(), "requests": self.requests,
                                           "at": time.time()}))
                os.replace(tmp, self.state_path)
                time.sleep(STATE_EVERY_S)
            else:
                time.sleep(DRAIN_POLL_S)

    def _replace(self) -> None:
        self._handover_error = ""  # a new try: the last one's reason no longer holds
        gate, load = handover.GATE, handover.LOAD
        if gate is None or load is None:
            self._give_up("this worker was not started by TorchServe's worker loop")
            return
        log.info("worker %d: starting its successor, as the recycler asked", self.pid)
        try:
            successor = handover.Successor(gate, load)
        except (OSError, RuntimeError) as exc:
            self._give_up(f"its successor could not be started: {exc}")
            return
        why = successor.wait_ready(give_up=lambda: not self.retire_flag.exists())
        if why:
            self._give_up(why)
            return
        # The old process stops reporting at the handover: the successor's first report
        # (a later start time) tells the recycler the replacement is done.
        self.retire_flag.unlink(missing_ok=True)
        gate.on_handover = successor.hand_over
        gate.wake()

    def _give_up(self, why: str) -> None:
        log.warning("worker %d was not replaced: %s", self.pid, why)
        self._handover_error = why
        self.report()
        self.retire_flag.unlink(missing_ok=True)
        self._retiring = False
