"""Batch isolation under hostile clients: ``python -m benchmarks.isolation``.

For each hostile body of benchmarks/isolation/bodies.py and each path to the model (direct
REST, router REST, direct gRPC, router gRPC), well-behaved clients send well-formed requests
to the body's model in a closed loop while hostile clients send the body. TorchServe batches
them together (batch 8, 5 ms, as fleet.yaml says); every well-behaved answer is checked, the
hostile ones' statuses counted, and worker pids compared before and after each cell. Writes
docs/isolation.md and benchmarks/results/isolation.json (under --out DIR); exits non-zero if a
well-behaved request failed, a worker restarted or a hostile body got a server error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import grpc
import requests

from benchmarks.harness import RouterProcessRunner, start_torchserve
from benchmarks.isolation.bodies import HOSTILE, IMAGE, INTENT, TEXT, Hostile, good_requests
from tsfleet.manifest import load_fleet
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tsfleet.control.server import TorchServe

ROOT = Path(__file__).resolve().parents[2]
PATHS = ("direct-rest", "router-rest", "direct-grpc", "router-grpc")
SMOKE_BODIES = ("deep-list", "form-to-image")
FIELD = {INTENT: "intent", IMAGE: "label", TEXT: "embedding"}  # the answer field each model's check reads
MIN_COSINE = 0.999
BAD_PAUSE_S = 0.05
TIMEOUT_S = 60.0

# One request: (model, content type, body) -> (status label, answer bytes or error text, the
# size of the batch it was answered in: the handler's X-Batch-Size header, 0 when unknown).
Send = Callable[[str, str, bytes], tuple[str, bytes, int]]


@dataclass
class Cell:
    """What one (body, path) run saw."""

    good: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # what failed good requests were told
    bad: Counter = field(default_factory=Counter)  # hostile answers by status label
    bad_text: dict[str, str] = field(default_factory=dict)  # the first answer of each status
    bad_batched: int = 0  # hostile requests answered in a batch of more than one (REST only)
    lock: threading.Lock = field(default_factory=threading.Lock)


def rest_sender(base: str, key: str) -> Send:
    """REST on one ``requests`` session (one per thread: sessions are not thread-safe)."""
    session = requests.Session()

    def send(model: str, content_type: str, body: bytes) -> tuple[str, bytes, int]:
        headers = {"Authorization": f"Bearer {key}", **({"Content-Type": content_type} if content_type else {})}
        try:
            resp = session.post(f"{base}/predictions/{model}", data=body, headers=headers, timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            return "client error", str(exc).encode(), 0
        return str(resp.status_code), resp.content, int(resp.headers.get("X-Batch-Size", 0))
    return send


def grpc_sender(target: str, key: str) -> Send:
    """gRPC on a channel of this thread's own. It carries no content type: the model reads
    the bytes as sent with none. A handler's 4xx comes back as an OK reply whose prediction
    is TorchServe's JSON error body, so its "code" is part of the status (``OK/400``)."""
    stub = pb_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(target))
    auth = (("authorization", f"Bearer {key}"),)

    def send(model: str, content_type: str, body: bytes) -> tuple[str, bytes, int]:
        try:
            reply = stub.Predictions(pb.PredictionsRequest(model_name=model, input={"data": body}),
                                     metadata=auth, timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            return err.code().name, (err.details() or "").encode(), 0
        code = error_code(reply.prediction)
        return ("OK" if code is None else f"OK/{code}"), reply.prediction, 0  # gRPC carries no batch header
    return send


def error_code(answer: bytes) -> int | None:
    """The "code" of a TorchServe JSON error body; None for anything else."""
    try:
        doc = json.loads(answer)
    except ValueError:
        return None
    return doc.get("code") if isinstance(doc, dict) and isinstance(doc.get("code"), int) else None


def server_error(status: str) -> bool:
    """Whether a hostile body's status blames the server (5xx, INTERNAL...) rather than the body."""
    return status.split("/")[-1].startswith("5") or status in ("INTERNAL", "UNAVAILABLE", "UNKNOWN",
                                                                "DEADLINE_EXCEEDED", "client error")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)


def wrong(model: str, expected: str, status: str, answer: bytes, refs: dict[str, list[float]]) -> str | None:
    """Why a well-behaved request's answer is not the right one; None when it is."""
    if status not in ("200", "OK"):
        return f"{status} {answer[:300].decode(errors='replace')}"
    try:
        got = json.loads(answer)[FIELD[model]]
    except (ValueError, KeyError, TypeError):
        return f"{status} but no {FIELD[model]!r}: {answer[:300].decode(errors='replace')}"
    if model == TEXT:
        if not isinstance(got, list) or len(got) != 384:
            return f"{status} but an embedding of {len(got) if isinstance(got, list) else got!r} values"
        sim = cosine(got, refs[expected])
        return None if sim >= MIN_COSINE else f"{status} but cosine {sim:.4f} to {expected!r} taken alone"
    return None if got == expected else f"{status} but {got!r}, expected {expected!r}"


def worker_pids(ts: TorchServe) -> dict[tuple[str, str, str], int | None]:
    """Every model version's workers: (model, version, worker id) -> pid."""
    return {(v.model, v.version, w.id): w.pid for vs in ts.client.state().values() for v in vs for w in v.workers}


def run_cell(hostile: Hostile, sender: Callable[[], Send], args: argparse.Namespace,
             refs: dict[str, list[float]]) -> Cell:
    """``args.good_clients`` well-behaved and ``args.bad_clients`` hostile threads for ``args.seconds``."""
    cell, goods = Cell(), good_requests(hostile.model, 3)
    started = time.monotonic()
    deadline = started + args.seconds

    def good(offset: int) -> None:
        send, i = sender(), offset
        while time.monotonic() < deadline:
            content_type, body, expected = goods[i % len(goods)]
            i += 1
            status, answer, _ = send(hostile.model, content_type, body)
            why = wrong(hostile.model, expected, status, answer, refs)
            with cell.lock:
                cell.good += 1
                if why:
                    cell.failed += 1
                    cell.errors.append(f"{time.monotonic() - started:.1f} s: {why}")

    def bad() -> None:
        send = sender()
        while time.monotonic() < deadline:
            status, answer, batch = send(hostile.model, hostile.content_type, hostile.body)
            with cell.lock:
                cell.bad[status] += 1
                cell.bad_batched += batch > 1
                cell.bad_text.setdefault(status, answer[:300].decode(errors="replace"))
            time.sleep(BAD_PAUSE_S)  # hostile, not a flood: the point is sharing batches

    threads = [threading.Thread(target=good, args=(n,)) for n in range(args.good_clients)]
    threads += [threading.Thread(target=bad) for _ in range(args.bad_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return cell


def senders(ts: TorchServe, router: RouterProcessRunner) -> dict[str, Callable[[], Send]]:
    """A maker of one thread's client, per path. Clients send TorchServe's inference key:
    the router passes it on untouched."""
    key = ts.keys.inference
    return {"direct-rest": lambda: rest_sender(ts.ep.url("inference"), key),
            "router-rest": lambda: rest_sender(router.url, key),
            "direct-grpc": lambda: grpc_sender(f"127.0.0.1:{ts.ep.grpc_inference}", key),
            "router-grpc": lambda: grpc_sender(router.grpc, key)}


def references(send: Send) -> dict[str, list[float]]:
    """Each good sentence's embedding taken alone, with nothing else in its batch."""
    refs = {}
    for content_type, body, sentence in good_requests(TEXT, 3):
        status, answer, _ = send(TEXT, content_type, body)
        if status != "200":
            raise RuntimeError(f"reference embedding of {sentence!r}: {status} {answer[:300]!r}")
        refs[sentence] = json.loads(answer)["embedding"]
    return refs


def statuses(bad: dict[str, int]) -> str:
    return ", ".join(f"{s} x {n:,}" for s, n in sorted(bad.items(), key=lambda kv: -kv[1])) or "none"


def table(rows: list[dict]) -> list[str]:
    lines = ["| bad body | path | bad requests answered | of them in a shared batch | "
             "well-behaved requests that failed | worker restarts |", "|---|---|---|---|---|---|"]
    for r in rows:
        pct = 100 * r["good_failed"] / r["good_requests"] if r["good_requests"] else 0.0
        share = f"{pct:.0f}%" if pct >= 10 or pct == 0 else f"{pct:.2g}%"
        shared = f"{r['bad_batched']:,}" if r["path"].endswith("rest") else "(not shown over gRPC)"
        lines.append(f"| {r['body']} | {r['path']} | {statuses(r['bad_statuses'])} | {shared} | "
                     f"{r['good_failed']:,} of {r['good_requests']:,} ({share}) | {r['restarts']} |")
    return lines


def write(rows: list[dict], meta: dict, bodies: list[Hostile], out: Path) -> list[Path]:
    data, doc = out / "benchmarks" / "results" / "isolation.json", out / "docs" / "isolation.md"
    for path in (data, doc):
        path.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    notes = [f"- `{b.name}` ({b.model}, {b.content_type or 'no content type'}): {b.note}" for b in bodies]
    doc.write_text("\n".join([
        "# Batch isolation under hostile clients", "",
        f"Written by `{meta['command']}` on {meta['date']}: {meta['cpu_count']} cores, one TorchServe "
        f"(batch {meta['batch_size']}, {meta['max_batch_delay_ms']} ms) on the repo's model_store and one router "
        f"process in front of it. Per cell, {meta['seconds']:g} s of {meta['good_clients']} well-behaved clients "
        f"in a closed loop (every answer checked: status, label, or an embedding within cosine {MIN_COSINE} of "
        f"the sentence's own taken alone) beside {meta['bad_clients']} hostile client(s) sending the bad body "
        f"every {BAD_PAUSE_S * 1000:.0f} ms. \"In a shared batch\": the hostile request's answer said (X-Batch-Size) "
        f"that its batch held other requests too. A worker restart is a worker pid that changed during the cell. "
        f"gRPC statuses: `OK/400` is an OK reply carrying TorchServe's JSON error body with code 400. "
        f"Data: `benchmarks/results/{data.name}`.", "",
        "What this checks, and how the handlers make it hold: [input-limits.md](input-limits.md). Before them, "
        "the first row's body failed 1,411 of 4,106 well-behaved requests (34%, all 503) on the same load.", "",
        "The bad bodies (`benchmarks/isolation/bodies.py`):", "",
        *notes, "", *table(rows), ""]))
    return [data, doc]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.isolation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each (body, path) cell")
    parser.add_argument("--good-clients", type=int, default=12)
    parser.add_argument("--bad-clients", type=int, default=2)
    parser.add_argument("--bodies", nargs="+", choices=[h.name for h in HOSTILE], help="a subset of the bodies")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--out", type=Path, default=ROOT, help="write docs/ and benchmarks/results/ under here")
    parser.add_argument("--smoke", action="store_true",
                        help=f"2 s cells, 4 good and 1 bad client, bodies {' and '.join(SMOKE_BODIES)}: for the test")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.good_clients, args.bad_clients, args.bodies = 2.0, 4, 1, list(SMOKE_BODIES)
    bodies = [h for h in HOSTILE if not args.bodies or h.name in args.bodies]
    fleet = load_fleet(ROOT / "fleet.yaml")
    serving = next(iter(fleet.versions())).serving
    meta = {"command": " ".join(["python -m benchmarks.isolation", *argv]), "cpu_count": os.cpu_count(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": args.seconds,
            "good_clients": args.good_clients, "bad_clients": args.bad_clients,
            "batch_size": serving.batch_size, "max_batch_delay_ms": serving.max_batch_delay_ms}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tsfleet-bench-isolation-") as tmp:
        ts = start_torchserve(fleet, ROOT / "model_store", Path(tmp) / "ts")
        router = None
        try:
            # In TorchServe's workdir: the router reads its key_file.json from where it starts.
            router = RouterProcessRunner(ROOT / "fleet.yaml", ts.config, ts.workdir)
            make = senders(ts, router)
            refs = references(make["direct-rest"]())
            for path in args.paths:  # a path that does not work at all is no finding about batches
                for model in (TEXT, INTENT, IMAGE):
                    content_type, body, expected = good_requests(model, 1)[0]
                    status, answer, _ = make[path]()(model, content_type, body)
                    why = wrong(model, expected, status, answer, refs)
                    if why:
                        raise RuntimeError(f"{path} fails a lone well-formed {model} request: {why}")
            for hostile in bodies:
                for path in [p for p in args.paths if hostile.over_grpc or not p.endswith("grpc")]:
                    # Workers a restart in an earlier cell left starting would fail this one.
                    ts.wait_ready(fleet, timeout=180, progress=lambda line: None)
                    before = worker_pids(ts)
                    cell = run_cell(hostile, make[path], args, refs)
                    after = worker_pids(ts)
                    restarted = sorted(f"{m} {v} worker {w}: pid {pid} -> {after.get((m, v, w))}"
                                       for (m, v, w), pid in before.items() if after.get((m, v, w)) != pid)
                    rows.append({"body": hostile.name, "model": hostile.model, "path": path,
                                 "good_requests": cell.good, "good_failed": cell.failed, "errors": cell.errors[:20],
                                 "bad_requests": sum(cell.bad.values()), "bad_statuses": dict(cell.bad),
                                 "bad_batched": cell.bad_batched,
                                 "bad_answers": cell.bad_text, "restarts": len(restarted), "restarted": restarted,
                                 "workers_watched": sum(pid is not None for pid in before.values())})
                    print(table(rows)[-1], flush=True)
        finally:
            if router is not None:
                router.stop()
            ts.stop()
    print("\n" + "\n".join(table(rows)))
    for path in write(rows, meta, bodies, args.out):
        print(f"wrote {path}")
    return report(rows)


def report(rows: list[dict]) -> int:
    """Print what failed; 1 if a well-behaved request failed, a worker restarted, or a hostile
    body got a server error (5xx, INTERNAL...) instead of a 4xx."""
    failed = False
    for r in rows:
        where = f"{r['body']} over {r['path']}"
        for status, text in r["bad_answers"].items():
            if server_error(status):
                failed = True
                print(f"FAILED {where}: the hostile body got {status} (a server error, not the client's): {text}")
        if r["good_failed"] or r["restarts"]:
            failed = True
            print(f"FAILED {where}: {r['good_failed']} well-behaved request(s) failed, {r['restarts']} restart(s)")
            for line in r["errors"][:5] + r["restarted"]:
                print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
