"""gRPC load from h2load (nghttp2's HTTP/2 benchmark, Debian package nghttp2-client), an
outside tool beside the project's own asyncio client (loadgen.run_grpc), so that gRPC figures
do not rest on the project's client alone.

h2load knows nothing of gRPC: it POSTs one fixed body over h2c and counts every HTTP 200 as a
success. A gRPC call is exactly that (a POST of a 5-byte prefix and the serialized
PredictionsRequest), but a gRPC *error* is an HTTP 200 too, with the grpc-status in its
trailers, which h2load never reads. h2load's "succeeded" is therefore not a proof of anything:
h2load_target.py checks the same body with a real gRPC client first and the servers' own
counters after each run.

This module is the tool: is it installed, the body file, the command line, its output read.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.speed.loadgen import GRPC_CONNECTIONS, Sample

if TYPE_CHECKING:
    from tsfleet.router.proto.inference_pb2 import PredictionsRequest

PREDICTIONS_PATH = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
INSTALL = "`make bench-tools` (or `apt-get install nghttp2-client`)"


def missing_reason() -> str | None:
    """Why the h2load rows cannot be measured here (None: h2load is on PATH)."""
    if shutil.which("h2load"):
        return None
    return f"h2load is not installed (not on PATH); install it with {INSTALL}"


def version() -> str | None:
    """``nghttp2/1.52.0`` or the like; None when h2load is missing."""
    if missing_reason():
        return None
    out = subprocess.run(["h2load", "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"nghttp2/[\w.+~-]+", out)
    return m.group(0) if m else out.strip() or None


def grpc_body(model: str, data: bytes) -> bytes:
    """What the project's client sends for one item (loadgen._grpc_loop: ``input={"data": body}``),
    as it goes on the wire: the gRPC prefix (uncompressed flag, big-endian length) and the message."""
    from tsfleet.router.proto import inference_pb2

    message = inference_pb2.PredictionsRequest(model_name=model, input={"data": data}).SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


def read_body(body: bytes) -> PredictionsRequest:
    """The PredictionsRequest a body file carries (its prefix checked)."""
    from tsfleet.router.proto import inference_pb2

    if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        raise ValueError("not one uncompressed, length-prefixed gRPC message")
    return inference_pb2.PredictionsRequest.FromString(body[5:])


def layout(clients: int) -> tuple[int, int]:
    """(connections, streams per connection) for ``clients`` calls in flight: the project's
    client's shape (GRPC_CONNECTIONS connections sharing the calls) when it divides evenly,
    else one connection per call."""
    if clients >= GRPC_CONNECTIONS and clients % GRPC_CONNECTIONS == 0:
        return GRPC_CONNECTIONS, clients // GRPC_CONNECTIONS
    return clients, 1


def command(address: str, body_file: Path, key: str, clients: int, seconds: float | None = None,
            requests: int | None = None, log_file: Path | None = None) -> list[str]:
    """The h2load command line: one thread (as little CPU as it can take), a closed loop of
    ``clients`` calls in flight for ``seconds`` (-D), or ``requests`` calls in all (-n)."""
    conns, streams = layout(clients)
    cmd = ["h2load", "-t", "1", "-c", str(conns), "-m", str(streams)]
    cmd += ["-D", f"{max(1, round(seconds * 1000))}ms"] if seconds is not None else ["-n", str(requests or 1)]
    cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers", "-H", f"authorization: Bearer {key}",
            "-d", str(body_file)]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    return cmd + [f"http://{address}{PREDICTIONS_PATH}"]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if not m:
        raise ValueError(f"not a duration: {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class H2loadOutput:
    """What h2load printed: totals, status classes, DATA bytes received and request times."""

    seconds: float
    rps: float
    total: int
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status: dict[str, int]
    data_bytes: int
    min_ms: float
    max_ms: float
    mean_ms: float
    sd_ms: float


def parse_output(text: str) -> H2loadOutput:
    """Read h2load's summary (the text it prints to stdout); ValueError when it has none."""
    fin = re.search(r"^finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", text, re.M)
    req = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", text, re.M)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    traffic = re.search(r"^traffic: .*, [\d.]+\w+ \((\d+)\) data$", text, re.M)
    times = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    if not (fin and req and codes and traffic and times):
        raise ValueError(f"h2load printed no summary:\n{text[-2000:]}")
    n = [int(g) for g in req.groups()]
    return H2loadOutput(
        seconds=_ms(fin.group(1) + fin.group(2)) / 1000, rps=float(fin.group(3)), total=n[0], started=n[1],
        done=n[2], succeeded=n[3], failed=n[4], errored=n[5], timeout=n[6],
        status=dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, codes.groups()))),
        data_bytes=int(traffic.group(1)), min_ms=_ms(times.group(1)), max_ms=_ms(times.group(2)),
        mean_ms=_ms(times.group(3)), sd_ms=_ms(times.group(4)))


def log_latencies(log_file: Path) -> tuple[list[float], int]:
    """(seconds of each answered request, streams that failed) from h2load's --log-file
    (start us, HTTP status or -1 for a failed stream, us to the end of the answer)."""
    latencies, broken = [], 0
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            if parts[1] == "-1":
                broken += 1
            else:
                latencies.append(int(parts[2]) / 1e6)
    return latencies, broken


@dataclass
class H2loadSample(Sample):
    """A Sample (loadgen's shape) with what h2load and the checks after it said."""

    detail: dict = field(default_factory=dict)


def run(cmd: list[str], timeout: float) -> tuple[H2loadOutput, str]:
    """Run an h2load command line; its summary and raw stdout (RuntimeError when it has none)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    try:
        return parse_output(proc.stdout), proc.stdout
    except ValueError:
        raise RuntimeError(f"h2load failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}") from None
