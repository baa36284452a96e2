"""h2load (h2load.py) as a target of the speed suite, with the checks that make its figures
mean something.

h2load counts an HTTP 200 as a success, and a gRPC error is an HTTP 200 with grpc-status in
its trailers, which h2load never reads. So its "succeeded" is checked, not trusted:

- before the first run, the project's gRPC client (grpcio) sends the very message of the body
  file and must get grpc-status 0 and a real answer (JSON without TorchServe's error ``code``);
  then h2load itself sends that body once and must get the answer's bytes back (a gRPC error
  answer carries no message). When either fails, the target measures nothing and says why
  (nghttp, from the same package, reads the grpc-status h2load could not);
- after each run, the server's own counters: the router's /metrics (answers and errors per
  arm, policy/routing.py prometheus()) or TorchServe's (ts_inference_requests_total) must
  have counted at least every call h2load counted, and the router no error; and the DATA
  bytes h2load received must add up to about one answer per success. Any shortfall is added
  to the row's failures and written beside it.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import requests

from benchmarks.speed import h2load
from benchmarks.speed.h2load import H2loadOutput, H2loadSample
from benchmarks.speed.workload import Workload

DATA_SHARE = 0.9  # answers to one body differ by a few bytes of float text, not by 10%


def counted(metrics_text: str, model: str, kind: str) -> tuple[float, float]:
    """(answers, errors) a server counted for ``model``, all versions: the router's
    tsfleet_router_requests_total / tsfleet_router_errors_total, or TorchServe's
    ts_inference_requests_total (it counts no errors apart: errors stay 0)."""
    names = ("tsfleet_router_requests_total", "tsfleet_router_errors_total") if kind == "router" \
        else ("ts_inference_requests_total",)
    label = "model" if kind == "router" else "model_name"
    totals = [0.0, 0.0]
    for m in re.finditer(r"^(\w+)\{([^}]*)\} (\S+)$", metrics_text, re.M):
        if m.group(1) in names and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))).get(label) == model:
            totals[names.index(m.group(1))] += float(m.group(3))
    return totals[0], totals[1]


def _grpc_status(address: str, body_file: Path, key: str) -> str:
    """What nghttp (same package) reads in the trailers h2load ignores."""
    if not shutil.which("nghttp"):
        return "the answer carried no message: a gRPC error (nghttp is missing to read its grpc-status)"
    proc = subprocess.run(["nghttp", "-v", "-H", "content-type: application/grpc", "-H", "te: trailers", "-H",
                           f"authorization: Bearer {key}", "-d", str(body_file),
                           f"http://{address}{h2load.PREDICTIONS_PATH}"], capture_output=True, timeout=30)
    text = proc.stdout.decode(errors="replace")
    found = re.findall(r"(grpc-(?:status|message): .*)", text)
    return "; ".join(found) or f"no grpc-status in the answer: {text[-500:]}"


class H2loadTarget:
    """``(clients, seconds) -> Sample`` for one gRPC address, loaded by h2load with the
    workload's first item (h2load sends one body; the project's client cycles the set)."""

    def __init__(self, address: str, w: Workload, key: str, metrics_url: str, kind: str, work: Path):
        """``metrics_url``: the Prometheus text of the server behind ``address``; ``kind``:
        ``router`` or ``torchserve``, which counters it has."""
        self.address, self.model, self.key, self.metrics_url, self.kind = address, w.model, key, metrics_url, kind
        self.body_file = work / f"h2load-{w.model}-{address.replace(':', '-')}.bin"
        self.body_file.parent.mkdir(parents=True, exist_ok=True)
        self.body_file.write_bytes(h2load.grpc_body(w.model, w.bodies[0]))
        self.log_file = self.body_file.with_suffix(".log")
        self.answer_bytes = 0
        self.error: str | None = None
        self.checked = False

    def counters(self) -> tuple[float, float]:
        text = requests.get(self.metrics_url + "/metrics", timeout=10).text
        return counted(text, self.model, self.kind)

    def precheck(self) -> str | None:
        """None when the body is answered well, by grpcio and by h2load; else what is wrong."""
        import grpc

        from tsfleet.router.proto import inference_pb2_grpc

        message = h2load.read_body(self.body_file.read_bytes())
        with grpc.insecure_channel(self.address) as channel:
            try:
                answer = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
                    message, metadata=(("authorization", f"Bearer {self.key}"),), timeout=60)
            except grpc.RpcError as exc:
                return f"the project's gRPC client got {exc.code().name}: {exc.details()}"
        try:
            prediction = json.loads(answer.prediction)
        except ValueError:
            prediction = None
        if not isinstance(prediction, dict) or "code" in prediction:
            return f"the project's gRPC client got no prediction: {answer.prediction[:300]!r}"
        expected = 5 + len(answer.SerializeToString())
        out, _ = h2load.run(h2load.command(self.address, self.body_file, self.key, 1, requests=1), 60)
        if out.succeeded != 1 or out.data_bytes < DATA_SHARE * expected:
            got = "HTTP 200" if out.succeeded else ", ".join(f"{n} {k}" for k, n in out.status.items() if n) or "no answer"
            return (f"h2load's one call got {got} with {out.data_bytes} bytes of message, not the "
                    f"~{expected}-byte answer (a gRPC error, which h2load counts as a success): "
                    + _grpc_status(self.address, self.body_file, self.key))
        self.answer_bytes = out.data_bytes  # one answer as it comes on the wire
        return None

    def __call__(self, clients: int, seconds: float, think_s: float = 0.0) -> H2loadSample:
        if think_s > 0:
            raise ValueError("h2load runs closed loops only: it has no think time")
        try:
            if not self.checked:
                self.error, self.checked = self.precheck(), True
            if self.error:  # measured nothing: no load, one failed check, and why
                return H2loadSample(0, 1, 0.0, math.nan, math.nan, detail={"error": self.error})
            self.log_file.unlink(missing_ok=True)  # h2load appends to it
            before = self.counters()
            cmd = h2load.command(self.address, self.body_file, self.key, clients, seconds, log_file=self.log_file)
            out, _ = h2load.run(cmd, seconds + 120)
        except (RuntimeError, subprocess.TimeoutExpired, requests.RequestException) as exc:
            return H2loadSample(0, 1, 0.0, math.nan, math.nan, detail={"error": f"{type(exc).__name__}: {exc}"})
        latencies, _ = h2load.log_latencies(self.log_file)
        after = self.settled(before, out)
        detail = self.verify(out, before, after)
        lat = sorted(latencies)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else math.nan

        failed = min(out.done, out.failed + detail["grpc_errors"])
        detail["command"] = shlex.join(cmd).replace(self.key, "<key>")
        detail["connections"], detail["streams_per_connection"] = h2load.layout(clients)
        return H2loadSample(out.done, failed, out.rps, pct(0.5), pct(0.99), detail=detail)

    def settled(self, before: tuple[float, float], out: H2loadOutput, wait_s: float = 5.0) -> tuple[float, float]:
        """The counters once the server has answered what h2load started (calls still in
        flight when -D ended are answered after h2load stopped counting)."""
        deadline, last = time.monotonic() + wait_s, self.counters()
        while time.monotonic() < deadline and last[0] - before[0] < out.started:
            time.sleep(0.2)
            now = self.counters()
            if now == last and last[0] - before[0] >= out.done:
                break
            last = now
        return last

    def verify(self, out: H2loadOutput, before: tuple[float, float], after: tuple[float, float]) -> dict:
        """h2load's figures against the server's counters and the bytes it received."""
        answers, errors = after[0] - before[0], after[1] - before[1]
        # Calls h2load counted that the server did not count as answered, or counted as errors.
        uncounted = max(0, out.succeeded - int(answers))
        without_message = 0
        if out.data_bytes < DATA_SHARE * out.succeeded * self.answer_bytes:
            without_message = out.succeeded - round(out.data_bytes / self.answer_bytes)
        grpc_errors = max(uncounted + int(errors), without_message)
        return {"h2load": {k: getattr(out, k) for k in ("started", "done", "succeeded", "failed", "errored",
                                                          "timeout", "status", "data_bytes", "min_ms", "max_ms",
                                                          "mean_ms", "sd_ms", "rps", "seconds")},
                "checked_by": "router /metrics" if self.kind == "router" else "TorchServe /metrics",
                "server_answers": int(answers), "server_errors": int(errors), "answer_bytes": self.answer_bytes,
                "without_message": without_message, "grpc_errors": min(out.done, grpc_errors)}
