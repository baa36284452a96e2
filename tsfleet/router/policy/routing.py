"""Routing decisions, and each arm's statistics (stats.py): protocol-free, so REST and gRPC share them.

Weighted split: smooth weighted round robin (exact shares, no randomness). Sticky users: a
hash of the key picks a point in [0, 1); arms own consecutive ranges with candidates first
and the baseline last, so raising a candidate from 10 to 20 moves only the users in
[0.1, 0.2). An explicit version in the request always wins.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from prometheus_client.exposition import generate_latest

from tsfleet.errors import FleetError
from tsfleet.files import write_atomically
from tsfleet.router.policy.arm_metrics import ArmMetrics
from tsfleet.router.policy.stats import ArmStats

log = logging.getLogger(__name__)
# What the manifest sets in a route; the rest is live (the admin API, rollbacks), saved and taken back.
MANIFEST_PARTS = ("model", "rollback", "streaming", "versions")


@dataclass
class RollbackRule:
    """Candidate worse than baseline over ``window_s`` (both with ``min_samples``) -> weight 0."""

    window_s: float = 60.0
    min_samples: int = 30
    max_error_rate_increase: float = 0.05
    max_p99_ratio: float = 2.0  # 0 turns the latency check off
    # ...and by at least this much: a 4 ms p99 next to a 2 ms one is a blip, not a regression.
    min_p99_increase_ms: float = 50.0


@dataclass
class Route:
    """How one model's traffic is split. ``baseline`` is the version rollbacks return to."""

    model: str
    baseline: str
    weights: dict[str, float]
    shadow: str | None = None
    shadow_share: float = 0.0
    rollback: RollbackRule = field(default_factory=RollbackRule)
    rolled_back: dict[str, Any] | None = None
    # Manifest version -> the TorchServe version serving it for now: while apply swaps a
    # version's batch settings, its traffic goes to a stand-in registered under another name.
    aliases: dict[str, str] = field(default_factory=dict)
    streaming: bool = False  # from the manifest: does the handler answer StreamPredictions?
    versions: tuple[str, ...] = ()  # the manifest's: each has a rollback counter from 0 in /metrics

    def arms(self) -> list[tuple[str, float]]:
        """Arms with weight, candidates (by version) first, baseline last."""
        live = [(v, w) for v, w in sorted(self.weights.items()) if w > 0 and v != self.baseline]
        if self.weights.get(self.baseline, 0) > 0:
            live.append((self.baseline, self.weights[self.baseline]))
        return live


class Choice(NamedTuple):  # a tuple: built on every request, and a frozen dataclass costs ~1 us
    version: str | None  # None: no route, let TorchServe pick its default
    shadow: str | None
    explicit: bool


NO_ROUTE = Choice(None, None, False)


def sticky_point(model: str, key: str) -> float:
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class RoutingTable:
    """Every model's route, its statistics, and the state file that survives restarts."""

    def __init__(self, routes: dict[str, Route], state_path: Path | None = None):
        self.routes = routes
        self.state_path = state_path
        self.stats: dict[tuple[str, str], ArmStats] = {}
        self.rollbacks_total: dict[tuple[str, str], int] = {}
        self._swrr: dict[str, dict[str, float]] = {}
        self._arms: dict[str, tuple[tuple, list[tuple[str, float]], float]] = {}
        self._shadow_acc: dict[str, float] = {}
        self._lock = threading.Lock()
        # Set for a router of several processes (tsfleet/router/processes.py): the leader
        # hears of every change, a front collects what it saw for the leader and never
        # decides a rollback itself.
        self.on_change: Callable[[], None] | None = None
        self.sink: list[tuple] | None = None
        self.shadow_sink: list[tuple] | None = None
        self.decides = True
        # Called after each automatic rollback, with (model, version, event): the router
        # records it where its replicas see it (router/rollback_record.py).
        self.on_rollback: Callable[[str, str, dict[str, Any]], None] | None = None
        # The routes file's content (sha256) these routes last took, kept in the state file:
        # on a restart, a file unchanged since then yields to what the router did after it.
        self.routes_file_sha256: str | None = None
        self._load_state()

    # --------------------------------------------------------------- state
    def _load_state(self) -> None:
        if not self.state_path or not self.state_path.is_file():
            return
        try:
            doc = json.loads(self.state_path.read_text())
            self.apply_state(doc)
            self.routes_file_sha256 = (doc.get("routes_file") or {}).get("sha256")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FleetError(f"{self.state_path} is not a routing state the router can read ({exc!r}); fix it, "
                             "or move it away to start from the manifest's routes") from None

    def apply_state(self, doc: dict[str, Any]) -> None:
        """Take the live parts of each route (weights, baseline, shadow...) from a saved state."""
        for model, saved in doc.get("routes", {}).items():
            if model in self.routes:
                route = self.routes[model]
                route.baseline = saved.get("baseline", route.baseline)
                route.weights = {str(k): float(v) for k, v in saved.get("weights", route.weights).items()}
                route.shadow = saved.get("shadow")
                route.shadow_share = float(saved.get("shadow_share", 0.0))
                route.rolled_back = saved.get("rolled_back")
                route.aliases = {str(k): str(v) for k, v in saved.get("aliases", {}).items()}

    def save(self, quiet: bool = False) -> None:
        """Write the live routes atomically (rename), so a crash never leaves half a file.
        ``quiet``: a write that fails (a full disk) is logged, not raised; for the changes
        the router makes itself in a request's path, which must still be answered."""
        if self.on_change is not None:
            self.on_change()
        if not self.state_path:
            return
        doc = self.state()
        if self.routes_file_sha256:
            doc["routes_file"] = {"sha256": self.routes_file_sha256}
        try:
            write_atomically(self.state_path, json.dumps(doc, indent=2, sort_keys=True))
        except OSError as exc:  # StorageError: it names the file and the cause (a full disk, a read-only mount)
            if not quiet:
                raise
            log.error("router: cannot save the routes: %s. They hold until the router restarts, which starts "
                      "from the saved ones", exc)

    def state(self) -> dict[str, Any]:
        """The live parts of every route, as saved and as apply_state takes them."""
        return {"routes": {m: {k: v for k, v in asdict(r).items() if k not in MANIFEST_PARTS}
                           for m, r in self.routes.items()}}

    # ------------------------------------------------------------ choosing
    def choose(self, model: str, explicit: str | None = None, sticky_key: str | None = None) -> Choice:
        if explicit:
            return Choice(explicit, None, True)
        route = self.routes.get(model)
        if route is None:
            return NO_ROUTE
        arms, total = self._live_arms(route)
        if not arms:
            return Choice(route.baseline, None, False)
        if len(arms) == 1:
            version = arms[0][0]
        elif sticky_key:
            point, acc = sticky_point(model, sticky_key), 0.0
            version = arms[-1][0]
            for v, w in arms:
                acc += w / total
                if point < acc:
                    version = v
                    break
        else:
            version = self._next_swrr(model, arms, total)
        shadow = None
        if route.shadow and route.shadow != version and route.shadow_share > 0:
            # An exact share without randomness: mirror each time the accumulator passes 1.
            with self._lock:
                acc = self._shadow_acc.get(model, 0.0) + route.shadow_share
                if acc >= 1.0:
                    acc -= 1.0
                    shadow = route.shadow
                self._shadow_acc[model] = acc
        return Choice(version, shadow, False)

    def _live_arms(self, route: Route) -> tuple[list[tuple[str, float]], float]:
        """``route.arms()`` and their total weight, worked out again only when the weights or
        the baseline change (however they were changed): this runs on every request."""
        key = (route.baseline, *route.weights.items())
        cached = self._arms.get(route.model)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        arms = route.arms()
        total = sum(w for _, w in arms)
        self._arms[route.model] = (key, arms, total)
        return arms, total

    def _next_swrr(self, model: str, arms: list[tuple[str, float]], total: float) -> str:
        with self._lock:
            current = self._swrr.setdefault(model, {})
            best, best_score = arms[0][0], float("-inf")
            for v, w in arms:
                score = current[v] = current.get(v, 0.0) + w
                if score > best_score or (score == best_score and v > best):
                    best, best_score = v, score
            current[best] -= total
            if len(current) > len(arms):
                live = {v for v, _ in arms}
                for v in [v for v in current if v not in live]:
                    del current[v]
            return best

    def alternate(self, model: str, version: str | None) -> str | None:
        """Where a retry goes: the baseline if this was a candidate, else the same version."""
        route = self.routes.get(model)
        if route and version and version != route.baseline and route.weights.get(route.baseline, 0) > 0:
            return route.baseline
        return version

    # ------------------------------------------------------------ recording
    def _stats(self, model: str, version: str) -> ArmStats:
        key = (model, version)
        if key not in self.stats:
            self.stats[key] = ArmStats()
        return self.stats[key]

    def record(self, model: str, version: str | None, ok: bool, latency: float, retried: bool = False,
               now: float | None = None) -> dict[str, Any] | None:
        """Count one answer; return the rollback event if this answer triggered one."""
        if version is None:
            return None
        now = time.monotonic() if now is None else now
        st = self.stats.get((model, version)) or self._stats(model, version)
        st.add(ok, latency, now)
        st.retries += retried
        if self.sink is not None:
            self.sink.append((model, version, ok, latency, retried))
        return self._check_rollback(model, version, now) if self.decides else None

    def record_shadow(self, model: str, version: str, ok: bool, agree: bool | None) -> None:
        st = self._stats(model, version)
        st.shadow_requests += 1
        st.shadow_errors += not ok
        st.shadow_disagreements += agree is False
        if self.shadow_sink is not None:
            self.shadow_sink.append((model, version, ok, agree))

    def _check_rollback(self, model: str, version: str, now: float) -> dict[str, Any] | None:
        route = self.routes.get(model)
        if route is None or version == route.baseline or route.weights.get(version, 0) <= 0:
            return None
        rule = route.rollback
        n_c, err_c, p99_c = self._stats(model, version).recent(rule.window_s, now)
        n_b, err_b, p99_b = self._stats(model, route.baseline).recent(rule.window_s, now)
        if n_c < rule.min_samples or n_b < rule.min_samples:
            return None
        reason = None
        if err_c - err_b > rule.max_error_rate_increase:
            reason = f"error rate {err_c:.1%} vs baseline {err_b:.1%} over {rule.window_s:.0f} s"
        elif (rule.max_p99_ratio and p99_b > 0 and p99_c > rule.max_p99_ratio * p99_b
              and (p99_c - p99_b) * 1000 >= rule.min_p99_increase_ms):
            reason = f"p99 {p99_c * 1000:.0f} ms vs baseline {p99_b * 1000:.0f} ms over {rule.window_s:.0f} s"
        if reason is None:
            return None
        event = self.roll_back(model, version, reason)
        if self.on_rollback is not None:
            self.on_rollback(model, version, event)
        return event

    # ------------------------------------------------------------- changes
    def roll_back(self, model: str, version: str, reason: str) -> dict[str, Any]:
        route = self.routes[model]
        with self._lock:
            route.weights[version] = 0.0
            if not any(w > 0 for w in route.weights.values()):
                route.weights[route.baseline] = 100.0
            route.rolled_back = {"version": version, "reason": reason, "at": time.time()}
            key = (model, version)
            self.rollbacks_total[key] = self.rollbacks_total.get(key, 0) + 1
        self.save(quiet=True)
        return route.rolled_back

    @contextmanager
    def taken_back_on_failure(self, model: str) -> Iterator[Route]:
        """A person's change to ``model``'s route, in one step or several (the admin API's
        PUT): if it raises (its save refused by a full or read-only disk), all of it is taken
        back and the fronts told again, so a refused change is not live either. Not for the
        router's own changes in a request's path (a rollback), which hold unsaved."""
        route = self.routes[model]
        before = {k: copy.deepcopy(v) for k, v in vars(route).items() if k not in MANIFEST_PARTS}
        try:
            yield route
        except BaseException:
            with self._lock:
                for key, value in before.items():
                    setattr(route, key, value)
                self._swrr.pop(model, None)
            self.save(quiet=True)  # the fronts and, if the disk takes it now, the file
            raise

    def set_weights(self, model: str, weights: dict[str, float], baseline: str | None = None) -> Route:
        route = self.routes[model]
        if any(w < 0 or w > 100 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError("weights must be between 0 and 100, and at least one above 0")
        with self.taken_back_on_failure(model):
            with self._lock:
                route.weights = {str(v): float(w) for v, w in weights.items()}
                if baseline:
                    route.baseline = baseline
                route.rolled_back = None  # a person decided the split; the old event is history
                self._swrr.pop(model, None)
            self.save()
        return route

    def set_aliases(self, model: str, aliases: dict[str, str]) -> Route:
        """Send traffic for a version to another TorchServe version; ``{}`` clears them."""
        if not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in aliases.items()):
            raise ValueError("aliases must map version strings to version strings")
        route = self.routes[model]
        with self.taken_back_on_failure(model):
            route.aliases = dict(aliases)
            self.save()
        return route

    def attempt_timeout(self, model: str | None, version: str | None, ceiling_s: float,
                        floor_s: float = 2.0, factor: float = 10.0) -> float:
        """How long a first attempt may take before it is presumed lost.

        TorchServe silently drops the jobs a worker had gathered for its next batch when the
        worker dies; their clients would wait for ever. So a first attempt that takes far
        longer than this arm's recent p99 is retried once (inference is idempotent).
        """
        st = self.stats.get((model, version)) if model and version else None
        if st is None:
            return ceiling_s
        samples, _, p99 = st.recent(60.0, time.monotonic())
        if samples < 20:
            return ceiling_s
        return min(ceiling_s, max(floor_s, factor * p99))

    def upstream(self, model: str | None, version: str | None) -> str | None:
        """The TorchServe version that serves ``version`` of ``model`` right now."""
        route = self.routes.get(model) if model and version else None
        return route.aliases.get(version, version) if route else version

    def set_shadow(self, model: str, version: str | None, share: float) -> Route:
        if not 0 <= share <= 1:
            raise ValueError("shadow share must be between 0 and 1")
        route = self.routes[model]
        with self.taken_back_on_failure(model):
            route.shadow, route.shadow_share = (version, share) if version and share > 0 else (None, 0.0)
            self.save()
        return route

    # ------------------------------------------------------------- reports
    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        out = {}
        for model, route in self.routes.items():
            arms = {}
            for (m, version), st in self.stats.items():
                if m != model:
                    continue
                arms[version] = {
                    "requests": st.requests, "errors": st.errors, "retries": st.retries,
                    "error_rate": st.errors / st.requests if st.requests else 0.0,
                    "window_requests": st.recent(route.rollback.window_s, now)[0],
                    "p50_ms": st.percentile(0.5, route.rollback.window_s, now) * 1000,
                    "p99_ms": st.percentile(0.99, route.rollback.window_s, now) * 1000,
                    "shadow_requests": st.shadow_requests, "shadow_errors": st.shadow_errors,
                    "shadow_disagreements": st.shadow_disagreements,
                }
            out[model] = {"baseline": route.baseline, "weights": route.weights, "shadow": route.shadow,
                          "shadow_share": route.shadow_share, "rolled_back": route.rolled_back, "aliases": route.aliases, "arms": arms}
        return out

    def prometheus(self) -> str:
        """This table's statistics as /metrics text (arm_metrics.py; the router's whole
        /metrics adds its other collectors, router/app.py)."""
        return generate_latest(ArmMetrics(self)).decode()
