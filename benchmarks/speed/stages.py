"""Where a worker's time goes, by stage: py-spy samples every Python process of a system
while one extra window of load runs (after the timed windows, so sampling never touches a
reported figure), and each sampled stack is filed under the first stage whose marker it
holds. Multiplied by the workers' CPU per request (CpuMeter), the shares give milliseconds
per request per stage: JSON decode, tokenization, image decode, the model (torch), answer
encoding, the serving framework's own loop (TorchServe's worker protocol, mosec's, ...).

A profile, not a guess: what the report says about the gap rests on it. Native time inside
a torch or tokenizers call is charged to the Python frame that made the call.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

# (stage, markers): a stack doing the work of one of the first WORK stages is filed under it
# (the first with a marker anywhere in the stack); any other under the code of its innermost
# frame that one of the rest names (a handler hook inside TorchServe's loop is the handler's). py-spy names a frame
# ``function (path:line)`` with the path relative to its sys.path entry: "(torch/" is torch's.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tokenize", ("tokeniz", "encode_batch", "encode_packed", "(tokenizers/")),
    ("image decode", ("(PIL/", "image_to_tensor", "_to_rgb")),
    ("JSON decode", ("json/decoder.py", "loads (json", "handlers/payload.py", "read_texts")),
    ("answer encode", ("json/encoder.py", "dumps (json", "(msgspec", "serialize (", "encode_response",
                       "postprocess (", "tolist")),
    # handlers/minilm.py: the encoder's own Python (its per-text attention loop) is the model's.
    ("model (torch)", ("(torch/", "(sentence_transformers/", "(transformers/", "(handlers/minilm.py")),
    ("framework: TorchServe worker", ("(ts/", "model_service_worker", "otf_message_handler")),
    ("framework: mosec worker", ("(mosec/",)),
    ("framework: LitServe", ("(litserve/",)),
    ("framework: Ray", ("(ray/",)),
    ("event loop, web framework (asyncio, uvicorn, FastAPI)", ("(fastapi/", "(starlette/", "(uvicorn/", "(anyio/", "(asyncio/", "(h11/",
                                      "(httptools/", "(uvloop/", "(zmq/")),
    ("router: HTTP/1.1 and HTTP/2 wire", ("tsfleet/router/wire/",)),
    ("router: fronts, policy, upstream", ("tsfleet/router/",)),
    ("toolkit handler", ("handlers/",)),
)


def py_spy() -> str | None:
    """py-spy's path (benchmarks/requirements-peers.txt pins it), or None."""
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


WORK = 5  # STAGES[:WORK] are the work itself; the rest are the code around it


def classify(stack: str) -> str:
    """The work a stack is doing (anywhere in it, in STAGES' order); else the innermost
    frame's framework, handler or router code; else "other"."""
    for stage, markers in STAGES[:WORK]:
        if any(m in stack for m in markers):
            return stage
    for frame in reversed(stack.split(";")):
        for stage, markers in STAGES[WORK:]:
            if any(m in frame for m in markers):
                return stage
    return "other"


def parse_raw(text: str) -> Counter:
    """Samples per stage from py-spy's raw (folded) output: ``frame;frame;... count``."""
    out: Counter = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out[classify(stack)] += int(count)
    return out


def sample_each(pids: list[int], seconds: float, load: Callable[[], object], rate: int = 100) -> dict[int, Counter]:
    """Run ``load`` while py-spy samples every pid for ``seconds``; samples per stage, per pid."""
    tool = py_spy()
    if not tool or not pids:
        return {}
    with tempfile.TemporaryDirectory(prefix="bench-pyspy-") as tmp:
        procs = [(subprocess.Popen([tool, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                                    "--rate", str(rate), "--format", "raw", "--nonblocking",
                                    "-o", f"{tmp}/{pid}.txt"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL), Path(f"{tmp}/{pid}.txt")) for pid in pids]
        try:
            load()
        finally:
            for proc, _ in procs:
                try:
                    proc.wait(seconds + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        return {pid: parse_raw(path.read_text(errors="replace")) if path.exists() else Counter()
                for pid, (_, path) in zip(pids, procs)}


def profile(pid_groups: dict[str, list[int]], seconds: float, load: Callable[[], object],
            cpu: dict[str, float]) -> dict[str, dict]:
    """One sampled window of ``load`` over every group's pids at once; per group, its samples
    and its CPU ms per request (``cpu``: CpuMeter.per_request of the timed windows) by stage."""
    counts: dict[str, Counter] = {group: Counter() for group in pid_groups}
    merged = sample_each([pid for pids in pid_groups.values() for pid in pids], seconds, load)
    for group, pids in pid_groups.items():
        for pid in pids:
            counts[group] += merged.get(pid, Counter())
    out = {}
    for group, samples in counts.items():
        cpu_ms = cpu.get(f"{group}_user_ms", 0.0) + cpu.get(f"{group}_sys_ms", 0.0)
        out[group] = {"samples": sum(samples.values()), "cpu_ms": round(cpu_ms, 3),
                      "ms_per_request": per_request(samples, cpu_ms)}
    return out


def per_request(samples: Counter, cpu_ms: float) -> dict[str, float]:
    """Each stage's share of ``cpu_ms`` (the sampled processes' CPU per request)."""
    n = sum(samples.values())
    return {stage: round(cpu_ms * count / n, 3) for stage, count in samples.most_common()} if n else {}
