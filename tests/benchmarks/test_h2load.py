"""h2load, the outside gRPC load tool of the speed suite (benchmarks/speed/h2load.py,
h2load_target.py): its output read back from a recorded real run, the body file it sends, and,
where h2load is installed, short real runs against a real TorchServe and the router, checked
against the servers' own counters (h2load alone counts gRPC errors as successes)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import pytest

from benchmarks.speed import h2load
from benchmarks.speed.h2load_report import what_h2load_is
from benchmarks.speed.h2load_target import H2loadTarget, counted
from benchmarks.speed.workload import workload
from tsfleet.router.proto import inference_pb2

HERE = Path(__file__).resolve().parent
# `h2load -t 1 -c 4 -m 4 -D 2000ms ... -d body.bin http://127.0.0.1:PORT/...Predictions`, h2load
# nghttp2/1.52.0 against a real TorchServe 0.12 gRPC port (image-classifier, batch 8 / 5 ms).
RECORDED = HERE / "h2load_output.txt"


def test_parser_reads_a_recorded_real_run() -> None:
    out = h2load.parse_output(RECORDED.read_text())
    assert (out.total, out.started, out.done, out.succeeded, out.failed, out.errored, out.timeout) == (
        509, 525, 509, 509, 0, 0, 0)
    assert out.status == {"2xx": 509, "3xx": 0, "4xx": 0, "5xx": 0}
    assert out.seconds == 2.0 and out.rps == 254.5
    assert out.data_bytes == 105360  # about 207 bytes of answer per call: none of them a trailers-only error
    assert (out.min_ms, out.max_ms, out.mean_ms, out.sd_ms) == (18.32, 321.46, 62.19, 48.48)


def test_parser_refuses_output_without_a_summary() -> None:
    with pytest.raises(ValueError, match="no summary"):
        h2load.parse_output("starting benchmark...\nconnect: Connection refused\n")
    assert h2load.parse_output(RECORDED.read_text().replace("321.46ms", "1.5s")).max_ms == 1500.0


def test_body_file_round_trips_to_the_clients_request() -> None:
    w = workload("image-classifier")
    body = h2load.grpc_body(w.model, w.bodies[0])
    message = inference_pb2.PredictionsRequest(model_name=w.model, input={"data": w.bodies[0]})
    assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5
    assert h2load.read_body(body) == message
    assert body[5:] == message.SerializeToString()
    for broken in (body[:-1], b"\x01" + body[1:], body[:3]):
        with pytest.raises(ValueError):
            h2load.read_body(broken)


def test_command_loads_like_the_projects_client(tmp_path: Path) -> None:
    cmd = h2load.command("127.0.0.1:7070", tmp_path / "b.bin", "k3y", 16, seconds=1.5, log_file=tmp_path / "l")
    assert cmd[:7] == ["h2load", "-t", "1", "-c", "4", "-m", "4"]  # 4 connections, 16 calls in flight
    assert cmd[cmd.index("-D") + 1] == "1500ms" and "authorization: Bearer k3y" in cmd
    assert cmd[-1] == "http://127.0.0.1:7070/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
    assert h2load.layout(6) == (6, 1) and h2load.layout(64) == (4, 16)


def test_counters_are_read_per_model_over_versions() -> None:
    router = ('tsfleet_router_requests_total{model="image-classifier",version="1.0"} 405\n'
              'tsfleet_router_requests_total{model="image-classifier",version="2.0"} 5\n'
              'tsfleet_router_requests_total{model="text-embedder",version="1.0"} 7\n'
              'tsfleet_router_errors_total{model="image-classifier",version="1.0"} 3\n')
    assert counted(router, "image-classifier", "router") == (410.0, 3.0)
    torchserve = ('ts_inference_requests_total{model_name="image-classifier",model_version="default",hostname="vm",} 201.0\n'
                  'ts_inference_requests_total{model_name="image-classifier",model_version="1.0",hostname="vm",} 1.0\n'
                  'ts_inference_requests_total{model_name="minimal-image-classifier",model_version="1.0",hostname="vm",} 9.0\n')
    assert counted(torchserve, "image-classifier", "torchserve") == (202.0, 0.0)


def test_the_report_says_when_h2load_is_missing() -> None:
    text = " ".join(what_h2load_is({"h2load": {"version": None, "missing": h2load.missing_reason() or "h2load is not installed"}}))
    assert "h2load rows are missing" in text and "not installed" in text
    assert what_h2load_is({}) == []


# ----------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, object, Path]]:
    """A real TorchServe (image-classifier) and the router in front, as the speed suite serves them."""
    missing = h2load.missing_reason()
    if missing:
        pytest.skip(f"{missing} (Debian package nghttp2-client)")
    from benchmarks.harness import RouterProcessRunner
    from benchmarks.speed import fleets
    from benchmarks.speed.fleets import Serve, Variant

    work = tmp_path_factory.mktemp("h2load")
    fleets.ensure_artifacts(["image-classifier"])
    fleet, store, manifest = fleets.build([Variant("image-classifier", "1.0", Serve(8, 5, 2, 1))], work)
    with fleets.serving(fleet, store, work / "ts") as (ts, _):
        router = RouterProcessRunner(manifest, ts.config, work, 1)
        try:
            yield ts, router, work
        finally:
            router.stop()


def _check_clean_run(target: H2loadTarget) -> None:
    assert target.precheck() is None
    sample = target(8, 1.5)
    detail = sample.detail
    assert "error" not in detail, detail
    tool = detail["h2load"]
    assert sample.requests == tool["done"] == tool["succeeded"] > 0
    assert sample.failed == 0 and detail["grpc_errors"] == 0 and detail["server_errors"] == 0
    assert tool["status"] == {"2xx": sample.requests, "3xx": 0, "4xx": 0, "5xx": 0}
    assert detail["server_answers"] >= sample.requests  # the server counted every call h2load counted
    assert tool["data_bytes"] >= 0.9 * sample.requests * detail["answer_bytes"]
    assert 0 < sample.p50_ms <= sample.p99_ms and math.isfinite(sample.p99_ms) and sample.rps > 0


@pytest.mark.slow
@pytest.mark.integration
def test_h2load_against_torchserve_grpc(served: tuple) -> None:
    ts, _, work = served
    w = workload("image-classifier")
    _check_clean_run(H2loadTarget(f"127.0.0.1:{ts.ep.grpc_inference}", w, ts.keys.inference, ts.ep.url("metrics"),
                                  "torchserve", work / "direct"))


@pytest.mark.slow
@pytest.mark.integration
def test_h2load_through_the_router_grpc(served: tuple) -> None:
    ts, router, work = served
    w = workload("image-classifier")
    _check_clean_run(H2loadTarget(router.grpc, w, ts.keys.inference, router.url, "router", work / "routed"))


@pytest.mark.slow
@pytest.mark.integration
def test_the_checks_catch_grpc_errors_h2load_counts_as_successes(served: tuple) -> None:
    ts, _, work = served
    w = workload("image-classifier")
    address = f"127.0.0.1:{ts.ep.grpc_inference}"
    target = H2loadTarget(address, w, ts.keys.inference, ts.ep.url("metrics"), "torchserve", work / "wrong-key")
    assert target.precheck() is None
    before = target.counters()
    # A wrong key: TorchServe answers PERMISSION_DENIED, as HTTP 200 trailers.
    out, _ = h2load.run(h2load.command(address, target.body_file, "not-the-key", 4, requests=20), 60)
    assert out.succeeded == 20 and out.data_bytes == 0  # h2load alone: 20 successes
    detail = target.verify(out, before, target.settled(before, out, wait_s=1.0))
    assert detail["grpc_errors"] == 20 and detail["server_answers"] == 0 and detail["without_message"] == 20
    wrong = H2loadTarget(address, w, "not-the-key", ts.ep.url("metrics"), "torchserve", work / "wrong-key")
    sample = wrong(4, 1.0)
    assert sample.failed == 1 and "PERMISSION_DENIED" in sample.detail["error"]
