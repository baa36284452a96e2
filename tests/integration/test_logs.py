"""TorchServe's logs grow with events, not with requests: one access line per request, the
per-request detail on the metrics port, so a busy box does not fill its disk with logs.

TorchServe's own logging wrote about 9 KB per request (3 KB of it to stdout, which nothing
rolls): 276 GB a day at 1,000 requests a second.
"""
from __future__ import annotations

import gzip
import time
from pathlib import Path

import grpc
import requests

from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import new_server
from tests.polling import wait_for
from tsfleet.control import server as server_module
from tsfleet.control.server import TorchServe

MODEL = "intent-classifier"
LOGS = ("torchserve.out", "ts_log.log", "model_log.log")


def sizes(server: TorchServe) -> dict[str, int]:
    return {name: (server.workdir / "logs" / name).stat().st_size for name in LOGS}


def access_lines(server: TorchServe) -> list[str]:
    return (server.workdir / "logs" / "access_log.log").read_text().splitlines()


def send_mix(client, stub: pb_grpc.InferenceAPIsServiceStub, metadata: tuple, rounds: int) -> dict[str, int]:
    """Good and bad requests over REST and gRPC, and the workflow; what came back."""
    seen: dict[str, int] = {}
    for _ in range(rounds):
        answers = [
            client.predict(MODEL, {"text": "book me a flight to Rome"}).status_code,
            client.predict(MODEL, b'{"text": ', content_type="application/json").status_code,  # malformed JSON
            client.predict(MODEL, {"txt": "x"}).status_code,
            client.post("/wfpredict/intent-pipeline", {"text": "hello there"}).status_code,
        ]
        reply = stub.Predictions(pb.PredictionsRequest(model_name=MODEL, input={"data": b'{"text": "hi"}'}),
                                 metadata=metadata, timeout=30)
        answers.append(200 if b"intent" in reply.prediction else 500)
        for code, kind in zip(answers, ("rest-ok", "rest-malformed", "rest-bad-field", "workflow", "grpc-ok")):
            key = f"{kind}:{code}"
            seen[key] = seen.get(key, 0) + 1
    return seen


def test_requests_add_an_access_line_each_and_nothing_else(server: TorchServe, client) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.ep.grpc_inference}")
    stub = pb_grpc.InferenceAPIsServiceStub(channel)
    metadata = (("authorization", f"Bearer {server.keys.inference}"),)
    send_mix(client, stub, metadata, 3)  # a model's first answers register its metrics (a line each, once)
    before, access_before = sizes(server), len(access_lines(server))

    seen = send_mix(client, stub, metadata, 60)
    channel.close()

    assert seen == {"rest-ok:200": 60, "rest-malformed:400": 60, "rest-bad-field:400": 60,
                    "workflow:200": 60, "grpc-ok:200": 60}
    grown = {name: size - before[name] for name, size in sizes(server).items()}
    # 300 requests, each of which wrote 9 KB with TorchServe's own settings (the malformed ones
    # a traceback besides): what is left is room for an event that happened meanwhile.
    assert all(g < 2048 for g in grown.values()), grown
    new = access_lines(server)[access_before:]
    assert sum(f'"POST /predictions/{MODEL} HTTP/1.1" 200' in line for line in new) == 60, new[:5]
    assert sum(f'"POST /predictions/{MODEL} HTTP/1.1" 400' in line for line in new) == 120
    assert sum('"POST /wfpredict/intent-pipeline HTTP/1.1" 200' in line for line in new) == 60


def answers(session: requests.Session, ts: TorchServe) -> bool:
    try:
        return session.get(ts.ep.url("inference") + "/ping", headers=ts.keys.header("inference"), timeout=5).ok
    except requests.ConnectionError:
        return False


def test_the_logs_roll_and_keep_the_newest_archives(fleet, model_store, tmp_path: Path, monkeypatch) -> None:
    ts = new_server(fleet, model_store, tmp_path, load_models=False)
    with ts.config.open("a") as config:  # the last vmargs wins; 16 KB is about 230 access lines
        config.write("vmargs=-Dtsfleet.logs.roll_size=16KB -Dtsfleet.logs.keep=2\n")
    # The JVM's stdout is appended to, and rolled only at a start: one start's worth kept back.
    monkeypatch.setattr(server_module, "OUT_ROLL_BYTES", 1024)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "torchserve.out").write_text("an earlier start\n" * 100)
    ts.start(snapshots=False)
    assert (tmp_path / "logs" / "torchserve.out.1").read_text() == "an earlier start\n" * 100
    assert "an earlier start" not in (tmp_path / "logs" / "torchserve.out").read_text()
    try:
        ts.wait_for_keys(time.monotonic() + 120)
        session = requests.Session()
        wait_for("TorchServe's inference API", lambda: answers(session, ts), timeout=60)
        for _ in range(1200):
            assert session.get(ts.ep.url("inference") + "/ping", headers=ts.keys.header("inference"),
                               timeout=30).status_code == 200
    finally:
        ts.stop()
    logs = ts.workdir / "logs"
    archives = sorted(logs.glob("access_log.*.log.gz"))
    assert len(archives) == 2, archives  # four rolls or more; only the newest two kept
    live = (logs / "access_log.log").stat().st_size
    assert live < 17 * 1024
    kept = (logs / "access_log.log").read_text().splitlines()
    for archive in archives:
        kept += gzip.decompress(archive.read_bytes()).decode().splitlines()
    assert 460 < sum('"GET /ping HTTP/1.1" 200' in line for line in kept) < 1000  # two archives and the live file
