"""What happens to the fleet on the way, at fixed shares of the run: workers recycled (their
max_age_s falls due), one worker's serving process killed with SIGKILL, and a canary through
the router, put on and taken off with `tsfleet rollout` as an operator would.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import requests

from benchmarks.soak.fleet import SoakFleet

WARMUP = 0.20  # the share of the run before memory is fitted
# When each version's worker is due for replacement (max_age_s), staggered so that the
# replacements, each loading a model while the old process serves, do not pile up on the cores.
RECYCLE_DUE = {("text-embedder", "1.0"): 0.25, ("intent-classifier", "1.0"): 0.35,
               ("image-classifier", "1.0"): 0.50, ("intent-classifier", "1.1"): 0.85}
KILL_AT, KILL = 0.40, ("text-embedder", "1.0")  # the serving process: a fresh one after its recycle
CANARY_FROM, CANARY_TO, CANARY, CANARY_WEIGHT = 0.60, 0.75, ("intent-classifier", "1.1"), 25
RESTART_WAIT_S = 180.0  # for TorchServe to have the killed worker's slot ready again


@dataclass
class Timeline:
    """Runs the kill and the canary at their times; ``events`` says what was done and when."""

    fleet: SoakFleet
    seconds: float
    t0: float  # time.monotonic() at the start of the load
    say: Callable[[str], None]
    events: list[dict] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="soak-timeline", daemon=True)

    def plan(self) -> list[tuple[float, str]]:
        """(seconds into the run, what) for the report, the recycles as planned included."""
        versions = {(v.model, v.version) for v in self.fleet.fleet.versions()}
        out = [(share * self.seconds, f"{m} {v} due for recycling (max_age_s)")
               for (m, v), share in RECYCLE_DUE.items() if (m, v) in versions]
        if KILL in versions:
            out.append((KILL_AT * self.seconds, f"kill -9 the serving process of {KILL[0]} {KILL[1]}"))
        if CANARY in versions:
            out.append((CANARY_FROM * self.seconds, f"canary {CANARY[0]} {CANARY[1]} at {CANARY_WEIGHT}%"))
            out.append((CANARY_TO * self.seconds, f"canary {CANARY[0]} {CANARY[1]} rolled back"))
        return sorted(out)

    def recycle_due(self) -> dict[tuple[str, str], float]:
        versions = {(v.model, v.version) for v in self.fleet.fleet.versions()}
        return {key: share * self.seconds for key, share in RECYCLE_DUE.items() if key in versions}

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        """No further step starts; one under way finishes (a kill waits for the restart)."""
        self.stop.set()
        self._thread.join()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _run(self) -> None:
        versions = {(v.model, v.version) for v in self.fleet.fleet.versions()}
        steps = []
        if KILL in versions:
            steps.append((KILL_AT, self.kill))
        if CANARY in versions:
            steps += [(CANARY_FROM, self.canary_on), (CANARY_TO, self.canary_off)]
        for share, action in steps:
            if self.stop.wait(max(0.0, self.t0 + share * self.seconds - time.monotonic())):
                return
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - a step that fails is a finding, not a crash
                self._event("error", f"{action.__name__} failed: {exc!r}")

    def _event(self, what: str, detail: str, **extra: object) -> dict:
        event = {"t": round(self.now(), 1), "what": what, "detail": detail, **extra}
        self.events.append(event)
        self.say(f"  [{event['t']:6.1f} s] {what}: {detail}")
        return event

    # ------------------------------------------------------------------ kill
    def _ready_slot(self, model: str, version: str) -> int | None:
        states = {v.version: v for v in self.fleet.ts.client.describe(model)}
        state = states.get(version)
        return next((w.pid for w in state.workers if w.status == "READY" and w.pid), None) if state else None

    def kill(self) -> None:
        model, version = KILL
        deadline = time.monotonic() + 60
        # Not in the middle of a replacement: a kill then is another scenario than the one reported.
        while time.monotonic() < deadline and not self.stop.is_set():
            slot = self._ready_slot(model, version)
            busy = any(p.role == "successor" and p.label.startswith(f"{model} {version} ")
                       for p in self.fleet.processes())
            if slot is not None and not busy:
                break
            time.sleep(0.5)
        else:
            self._event("kill -9", f"skipped: {model} {version} had no ready worker outside a replacement for 60 s")
            return
        serving = self.fleet.worker_slots().get(slot, (model, version, slot))[2]
        os.kill(serving, signal.SIGKILL)
        event = self._event("kill -9", f"{model} {version}: serving process {serving} (worker slot {slot})",
                            pid=serving, slot=slot, model=model, version=version)
        # Waited for even once the load has ended: whether the worker came back is part of the result.
        deadline = time.monotonic() + RESTART_WAIT_S
        while time.monotonic() < deadline:
            fresh = self._ready_slot(model, version)
            if fresh is not None and fresh != slot:
                event["back_after_s"] = round(self.now() - event["t"], 1)
                event["new_slot"] = fresh
                self.say(f"  [{self.now():6.1f} s] {model} {version}: TorchServe restarted the worker as "
                         f"{fresh}, ready {event['back_after_s']} s after the kill")
                return
            time.sleep(0.5)

    # ---------------------------------------------------------------- canary
    def _cli(self, what: str, *args: str) -> dict:
        proc = self.fleet.tsfleet(*args)
        out = (proc.stdout + proc.stderr).strip()
        return self._event(what, f"`tsfleet {' '.join(args)}`: {out or '(no output)'}", rc=proc.returncode,
                           command="tsfleet " + " ".join(args))

    def canary_on(self) -> None:
        model, version = CANARY
        self._cli("weight change", "rollout", "start", model, version, "--weight", str(CANARY_WEIGHT))

    def canary_off(self) -> None:
        model, version = CANARY
        route = self.routes().get(model, {})
        if route.get("rolled_back"):  # the router's own rollback came first: say so, then back as planned
            self._event("automatic rollback", f"{model}: {route['rolled_back']}")
        self._cli("weight change", "rollout", "rollback", model)

    def routes(self) -> dict:
        resp = requests.get(f"http://127.0.0.1:{self.fleet.admin_port}/routes", timeout=30,
                            headers={"Authorization": f"Bearer {self.fleet.router_key('admin')}"})
        resp.raise_for_status()
        return resp.json()
