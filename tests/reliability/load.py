"""Closed-loop clients of the router (REST and gRPC) that record every answer by kind, for
the fault tests of a real `tsfleet up` (test_faults_under_load.py); test_fault_models.py runs
its own clients of TorchServe and the router on ``Load``.

Each client sends its next request as soon as its last one is answered, with the router's
own inference key, read once: a client that needs a new key after a fault would show up
as a refused request, not be hidden by a re-read.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import grpc
import requests

from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc

OK = "ok"
TS_DOWN = "503 naming TorchServe"  # REST 503 / gRPC UNAVAILABLE "TorchServe is not reachable at <address>"
NO_ROUTER = "no router"  # the connection to the router refused or dropped
HANG = "no answer within the deadline"
# The router's 503 for a workflow the fleet declares and TorchServe has not registered (yet): a
# restarted TorchServe serves before `up` has registered the workflows again.
WORKFLOW_NOT_YET = "503 workflow not registered yet"
# Under the router's own timeout (130 s, then 504). A request that reaches a restarted
# TorchServe before its workers are ready waits in its queue for them: seconds on an idle
# box, over 30 s on a busy one; the fault tests bound that wait by the restart itself.
DEADLINE_S = 120.0
BACKOFF_S = 0.1  # a client's pause after an error: keeps 503s from taking the CPU a restart needs


@dataclass(frozen=True)
class Record:
    client: str
    start: float  # time.monotonic()
    end: float
    kind: str  # OK, TS_DOWN, NO_ROUTER, HANG, or "<status> <what it said>" for anything else


Call = Callable[[], str]  # one request; its kind


def rest_call(session: requests.Session, url: str, body: bytes, content_type: str, ts_address: str,
              check: Callable[[bytes], bool]) -> Call:
    """A POST to the router's ``url``; ok only with an answer ``check`` accepts."""
    def call() -> str:
        try:
            resp = session.post(url, data=body, headers={"Content-Type": content_type}, timeout=DEADLINE_S)
        except requests.Timeout:
            return HANG
        except requests.ConnectionError:
            return NO_ROUTER
        if resp.status_code == 200 and check(resp.content):
            return OK
        if resp.status_code == 503 and f"TorchServe is not reachable at {ts_address}" in resp.text:
            return TS_DOWN
        if resp.status_code == 503 and f"is not registered in TorchServe at {ts_address} yet" in resp.text:
            return WORKFLOW_NOT_YET
        return f"{resp.status_code} {resp.text[:300]}"
    return call


def grpc_call(stub: pb_grpc.InferenceAPIsServiceStub, key: str, model: str, data: bytes, ts_address: str,
              check: Callable[[bytes], bool]) -> Call:
    """A Predictions call through the router; ok only with an answer ``check`` accepts."""
    def call() -> str:
        try:
            reply = stub.Predictions(pb.PredictionsRequest(model_name=model, input={"data": data}),
                                     metadata=(("authorization", f"Bearer {key}"),), timeout=DEADLINE_S)
        except grpc.RpcError as err:
            details = err.details() or ""
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return HANG
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                # The router's own words, or the channel's when the router is not there.
                return TS_DOWN if f"TorchServe is not reachable at {ts_address}" in details else NO_ROUTER
            return f"{err.code().name} {details[:300]}"
        return OK if check(reply.prediction) else f"OK but {reply.prediction[:300]!r}"
    return call


def intent_is(expected: str) -> Callable[[bytes], bool]:
    return lambda body: json.loads(body).get("intent") == expected


def json_answer(body: bytes) -> bool:
    json.loads(body)
    return True


@dataclass
class Load:
    """Clients (name: call), each in a thread of its own from ``start`` to ``stop``."""

    calls: dict[str, Call]
    records: list[Record] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> "Load":
        for name, call in self.calls.items():
            thread = threading.Thread(target=self._run, args=(name, call), daemon=True, name=f"load-{name}")
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, name: str, call: Call) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                kind = call()
            except Exception as exc:  # noqa: BLE001 - a client's own failure is counted, not lost
                kind = f"client error {exc!r}"
            self.records.append(Record(name, start, time.monotonic(), kind))  # list.append: thread-safe
            if kind != OK:
                self._stop.wait(BACKOFF_S)

    def stop(self) -> list[Record]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=DEADLINE_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a client still waits past its deadline"
        return list(self.records)

    def served_since(self, since: float, at_least: int = 3) -> bool:
        """Whether every client has had ``at_least`` answers ok, each sent after ``since``."""
        done = Counter(r.client for r in list(self.records) if r.kind == OK and r.start >= since)
        return all(done[name] >= at_least for name in self.calls)


def outside(records: list[Record], allowed: dict[str, tuple[float, float]]) -> list[Record]:
    """The records that are neither ok nor of a kind ``allowed`` in a window (start, end)
    that the request overlapped."""
    return [r for r in records if r.kind != OK and not (
        r.kind in allowed and r.end >= allowed[r.kind][0] and r.start <= allowed[r.kind][1])]


def tally(records: list[Record]) -> dict[str, Counter]:
    """Kinds of answer per client, for assertion messages and exact checks."""
    out: dict[str, Counter] = {}
    for r in records:
        out.setdefault(r.client, Counter())[r.kind] += 1
    return out
