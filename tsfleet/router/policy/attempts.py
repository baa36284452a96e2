"""One routed call's policy, the same for the REST and the gRPC front, with no I/O.

A front reads the client's request, asks ``begin`` for the version to try, sends it, and
maps TorchServe's answer to an ``Outcome`` (REST from its status and body, gRPC from its
status code and message: that mapping is all a front decides). ``after`` then says whether
to answer, retry once (a request a dying worker dropped: inference has no side effects) or
renew the router's own key once (keys.py), and ``answered`` records the outcome on its arm
and says whether to mirror the request to a shadow. Every step is a plain call: a front
carries a call on callbacks, with no task of its own (upstream.py says why).
"""
from __future__ import annotations

import logging
import time

from tsfleet.router.policy.compare import answers_agree
from tsfleet.router.policy.routing import Choice, RoutingTable

log = logging.getLogger(__name__)

# What an answer says about the arm that gave it (ints, not an Enum: this runs on every call).
OK = 0            # answered: the arm did its job
CLIENT_FAULT = 1  # the client's fault (4xx, INVALID_ARGUMENT...): the arm did its job too
SERVER_FAULT = 2  # the arm failed (5xx, INTERNAL...)
DROPPED = 3       # lost before a worker answered (worker died, TorchServe unreachable): retryable
NOT_FOUND = 4     # no such model or version: no arm (recorded, it would add a /metrics series per made-up name)
KEY_REFUSED = 5   # TorchServe refused the key the router swapped in for its own: renewable
OUTCOMES = ("ok", "client_fault", "server_fault", "dropped", "not_found", "key_refused")
# What a front does next.
ANSWER, RETRY, RENEW = 0, 1, 2
SHADOW_BACKLOG = 256  # mirrors in flight beyond this are skipped: a shadow must never pile up


class Routed:
    """One client call as the policy sees it: its model, the version tried now, what happened."""

    __slots__ = ("model", "choice", "version", "started", "retried", "renewed")

    def __init__(self, model: str, choice: Choice):
        self.model, self.choice, self.version = model, choice, choice.version
        self.started, self.retried, self.renewed = time.perf_counter(), False, False


class RoutingPolicy:
    """Arm choice, retry, key renewal, outcome recording and shadow copies, for both fronts."""

    def __init__(self, table: RoutingTable, timeout_s: float = 130, min_attempt_s: float = 2.0,
                 latency_factor: float = 10.0, shadow_backlog: int = SHADOW_BACKLOG):
        self.table, self.timeout_s = table, timeout_s
        self.min_attempt_s, self.latency_factor = min_attempt_s, latency_factor
        self.shadow_backlog, self.shadows = shadow_backlog, 0

    def begin(self, model: str, asked: str | None, sticky: str | None) -> Routed:
        """The call's first arm: the version the client named, else the route's choice."""
        return Routed(model, self.table.choose(model, asked or None, sticky or None))

    def upstream(self, call: Routed) -> str | None:
        """The TorchServe version to send the call to now (an alias while apply swaps it)."""
        return self.table.upstream(call.model, call.version)

    def attempt_timeout(self, call: Routed) -> float:
        """How long this attempt may take before it is presumed lost (the first one: far past
        its arm's p99, see RoutingTable.attempt_timeout; a retry: the whole timeout)."""
        if call.retried:
            return self.timeout_s
        return self.table.attempt_timeout(call.model, call.version, self.timeout_s, self.min_attempt_s,
                                          self.latency_factor)

    def after(self, call: Routed, outcome: int) -> int:
        """ANSWER, RETRY (``call.version`` is where to) or RENEW the key, after an attempt."""
        if outcome == KEY_REFUSED and not call.renewed:
            call.renewed = True  # once: a second refusal is the client's answer
            return RENEW
        if outcome == DROPPED and not call.retried:
            # The client will not see this failure, but the arm's record must.
            self.table.record(call.model, call.version, False, time.perf_counter() - call.started)
            # The baseline, unless the client named the version itself.
            call.version = call.version if call.choice.explicit else self.table.alternate(call.model, call.version)
            call.retried = True
            return RETRY
        return ANSWER

    def answered(self, call: Routed, outcome: int, mirror: bool = True) -> str | None:
        """Record the answer the client gets on its arm; the shadow version to mirror the
        request to (the front then calls ``shadow_done`` once), or None."""
        if outcome != NOT_FOUND:
            ok = outcome != SERVER_FAULT and outcome != DROPPED
            event = self.table.record(call.model, call.version, ok, time.perf_counter() - call.started, call.retried)
            if event:
                log.warning("rolled back %s %s: %s", call.model, event["version"], event["reason"])
        shadow = call.choice.shadow
        # A shadow is compared on what the baseline answered, a client's bad request included
        # (a candidate that fails on it is worth knowing); never on a failure of the baseline.
        if not mirror or shadow is None or outcome not in (OK, CLIENT_FAULT) or self.shadows >= self.shadow_backlog:
            return None
        self.shadows += 1
        return shadow

    def shadow_done(self, model: str, version: str, outcome: int, primary: bytes | None, answer: bytes | None) -> None:
        """Count a shadow's answer: ``primary`` and ``answer`` are the two predictions when
        both were OK (compared), else None."""
        self.shadows -= 1
        ok = outcome != SERVER_FAULT and outcome != DROPPED
        agree = answers_agree(primary, answer) if outcome == OK and primary is not None and answer is not None else None
        self.table.record_shadow(model, version, ok, agree)
