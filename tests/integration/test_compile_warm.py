"""`compile: true` through a real TorchServe: the first request after the worker is READY is
as fast as warm ones, for every shape the model serves, and answers as the eager model does.

The model is text-embedder (the real MiniLM): its input shapes vary with every request (the
number of texts, their padded length), which is where a compiled model compiles again on a
client's request if its load-time warm-up left a shape static. The image model's shapes
vary in the batch dimension only; tests/unit/test_handlers.py checks it in process.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml

from tests.fleet_fixtures import new_server
from tsfleet.build.archive import Builder
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.control.server import TorchServe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MODEL = "text-embedder"
WARM_REQUESTS = 30
# The bound on each first request: BOUND_FACTOR x the warm p99 of the same run, or FLOOR_S
# when that is more. Measured on the project's 2-core box with other test runs beside it
# (load average 10-16): first requests 128-1037 ms against a warm p50 of 44-71 ms and p99
# of 905-1043 ms (p99 of 30 is the slowest of them: a scheduling stall, the same size as the
# firsts' worst). So the firsts sit inside the warm spread, and 3 x p99 leaves room for one
# more stall than the warm requests met. The floor is for a quiet box, where the warm p99 is
# tens of ms and a single stall of a few hundred ms (or the JVM's first pass over the serving
# path, which `up`'s sample requests take and this test does not) would pass 3 x p99 with
# nothing left to compile. What the bound must catch, a
# compile on the request, took 11.8-16.7 s here against a bound of 4.5 s (the handlers
# before this test, which compiled a new length or an unpadded batch lazily).
BOUND_FACTOR = 3.0
FLOOR_S = 1.0
# Compiled against eager answers: per component of a unit-length 384-float embedding.
# Measured 1.2e-7 in process (the same maths, fused differently); 1e-4 is what
# test_models.py allows against sentence-transformers.
TOLERANCE = 1e-4

# The first request of each shape the model serves, none of them a shape the warm-up ran:
# one text of a new length (a batch of one), a list of equal lengths (several, unpadded) and
# a list of mixed lengths (several, padded), more texts than TorchServe's batch_size.
FIRSTS = {
    "one text": {"text": "The first request after the worker is ready must not compile anything at all, ever."},
    "several, same length": {"text": ["one two three", "four five six", "seven eight nine"]},
    "several, padded": {"text": ["short", "a noticeably longer sentence than the first one is"] * 6},
}


def compiled_fleet() -> Fleet:
    """Only text-embedder 1.0, with ``compile: true`` in its model-config.yaml, in fp32 (what is
    compared with eager here is compiling, not bf16: tests/precision.py has bf16's bound)."""
    doc = copy.deepcopy(yaml.safe_load((ROOT / "fleet.yaml").read_text()))
    doc["models"] = {MODEL: doc["models"][MODEL]}
    doc["models"][MODEL]["settings"] = {**doc["models"][MODEL].get("settings", {}), "compile": True, "amp_cpu": "off"}
    doc["workflows"] = {}
    return parse_fleet(doc, ROOT)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    fleet = compiled_fleet()
    base = tmp_path_factory.mktemp("compiled")
    # Its own store: the compiled archive has the same name as the fleet's eager one.
    Builder(fleet, base / "store", ROOT / "build" / "artifacts", progress=lambda line: None).build_all()
    # Inductor's on-disk cache lives in the server's private temp dir, so every run compiles
    # from nothing, as a fresh worker does: a cached compile on a request (4-5 s here under
    # load, against 12-17 s uncached) could hide inside the bound on a loaded box.
    ts = new_server(fleet, base / "store", base / "ts")
    ts.start(snapshots=False)
    try:
        ts.wait_ready(fleet, timeout=300, progress=lambda line: None)  # READY: initialize returned
        yield ts
    finally:
        ts.stop()


def timed_post(session: requests.Session, ts: TorchServe, body: dict) -> tuple[float, Any]:
    started = time.perf_counter()
    resp = session.post(ts.ep.url("inference") + f"/predictions/{MODEL}", json=body,
                        headers=ts.keys.header("inference"), timeout=120)
    elapsed = time.perf_counter() - started
    assert resp.status_code == 200, resp.text
    return elapsed, resp.json()


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def test_first_requests_after_ready_are_warm_and_match_eager(compiled: TorchServe) -> None:
    session = requests.Session()
    firsts = {name: timed_post(session, compiled, body) for name, body in FIRSTS.items()}
    warm = [timed_post(session, compiled, body)[0]
            for _ in range(WARM_REQUESTS // len(FIRSTS)) for body in FIRSTS.values()]
    bound = max(BOUND_FACTOR * p99(warm), FLOOR_S)
    report = ", ".join(f"{name} {s * 1000:.0f} ms" for name, (s, _) in firsts.items())
    print(f"\nfirst requests: {report}; warm p50 {sorted(warm)[len(warm) // 2] * 1000:.0f} ms, "
          f"p99 {p99(warm) * 1000:.0f} ms; bound {bound * 1000:.0f} ms")
    slow = {name: s for name, (s, _) in firsts.items() if s > bound}
    assert not slow, f"first requests slower than {bound:.2f} s (a compile on the request?): {slow}; {report}"

    from handlers.minilm import MiniLM

    eager = MiniLM.load(ROOT / "build" / "artifacts" / f"{MODEL}-1.0", "cpu")
    for name, (_, answer) in firsts.items():
        texts = FIRSTS[name]["text"]
        got = [answer["embedding"]] if isinstance(texts, str) else answer["embeddings"]
        want = eager.embed([texts] if isinstance(texts, str) else texts).tolist()
        worst = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
        print(f"{name}: compiled against eager, worst component {worst:.1e}")
        assert len(got) == len(want) and worst < TOLERANCE, f"{name}: compiled differs from eager by {worst:.2e}"
