"""Faulty models on a real TorchServe beside real fleet models: a handler that hangs past its
response_timeout, one whose postprocess miscounts its answers, a truncated and a corrupt
archive, and a worker's serving process killed under load, direct and through the router.

One TorchServe for the module, serving intent-classifier 1.0 and image-classifier 1.0 of
fleet.yaml from a tmp model store (their archives from the session's store), and a router
before it as ``up`` starts one. The fault archives are built into that store by
tsfleet.build.archive.Builder: the real image classifier (its recipe, weights and settings) with a
handler that subclasses it and overrides only the hook it breaks (tests/fixtures/
hang_handler.py, miscount_handler.py). Each test ends with the two checks Triton's and
TorchServe's own fault suites end with: every other model answers a healthy request, and
none was touched (the same workers: id, pid, start time, all READY).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml

from tests.fleet_fixtures import ROOT, free_ports, new_server
from tests.fleet_up import alive
from tests.integration.router_harness import RunningRouter
from tests.polling import wait_for
from tests.reliability.load import OK, Call, Load, tally
from tsfleet.control.apply import current_plan
from tsfleet.build.archive import Builder
from tsfleet.errors import ApiError, NotFound
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.control.server import TorchServe

pytestmark = pytest.mark.slow

INTENT, IMAGE = "intent-classifier", "image-classifier"
SHAPE = (ROOT / "docs" / "shape.png").read_bytes()  # a triangle
ROME = b'{"text": "book me a flight to Rome"}'
HANG, MISCOUNT = "hang-classifier", "miscount-classifier"
HANG_TIMEOUT_S = 4  # the hanging version's response_timeout
MISCOUNT_BATCH = 4
# Each fault model: its handler, and the serving settings it is registered with.
FAULTS = {
    HANG: ("tests/fixtures/hang_handler.py", {"batch_size": 1, "response_timeout_s": HANG_TIMEOUT_S}),
    MISCOUNT: ("tests/fixtures/miscount_handler.py", {"batch_size": MISCOUNT_BATCH, "max_batch_delay_ms": 500}),
}
DEADLINE_S = 120.0  # a client's own timeout: past any restart here


def manifest() -> dict:
    """fleet.yaml with intent-classifier 1.0 and image-classifier 1.0 alone, handler paths made
    absolute (the document is also written elsewhere, for `tsfleet apply`)."""
    doc = yaml.safe_load((ROOT / "fleet.yaml").read_text())
    intents = doc["models"][INTENT]
    intents["versions"] = {"1.0": intents["versions"]["1.0"]}
    doc["models"] = {INTENT: intents, IMAGE: doc["models"][IMAGE]}
    doc["workflows"] = {}
    for model in doc["models"].values():
        model["handler"] = str(ROOT / model["handler"])
    return doc


def image_like(doc: dict, name: str, handler: str, serving: dict | None = None) -> None:
    """Add model ``name`` 1.0 to ``doc``: the image classifier's recipe, weights and settings
    with ``handler``. No warm-up at load: it would run the broken hook and fail the load (so
    no compile either: a compiled model is warmed at load, every shape it serves)."""
    image = doc["models"][IMAGE]
    doc["models"][name] = {
        "handler": str(ROOT / handler), "recipe": image["recipe"], "default_version": "1.0",
        "settings": {**image.get("settings", {}), "warmup_batch_sizes": [], "compile": False},
        "versions": {"1.0": {"params": dict(image["versions"]["1.0"]["params"]), "serving": serving or {}}},
    }


@dataclass
class Bench:
    ts: TorchServe
    router: RunningRouter
    store: Path
    workdir: Path
    faults: Fleet

    def post(self, model: str, body: bytes, content_type: str, via_router: bool = False) -> requests.Response:
        url = (self.router.url if via_router else self.ts.ep.url("inference")) + f"/predictions/{model}"
        key = router_key(self.router) if via_router else self.ts.keys.inference
        return requests.post(url, data=body, timeout=DEADLINE_S,
                             headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})


def router_key(router: RunningRouter) -> str:
    return json.loads(router.process.config.key_file.read_text())["inference"]


@pytest.fixture(scope="module")
def bench(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    base = tmp_path_factory.mktemp("fault-models")
    store = base / "store"
    store.mkdir()
    fleet = parse_fleet(manifest(), ROOT)
    for spec in fleet.versions():  # the session's archives, linked (never written through)
        try:
            os.link(model_store / spec.archive_name, store / spec.archive_name)
        except OSError:
            shutil.copyfile(model_store / spec.archive_name, store / spec.archive_name)
    doc = manifest()
    for name, (handler, serving) in FAULTS.items():
        image_like(doc, name, handler, serving)
    doc["models"] = {name: doc["models"][name] for name in FAULTS}
    faults = parse_fleet(doc, ROOT)
    # The recipe's output is the image classifier's (same recipe, same seed): seeded from the
    # session's build cache, so no CNN is trained again.
    cache = base / "cache"
    for spec in faults.versions():
        shutil.copytree(ROOT / "build" / "artifacts" / f"{IMAGE}-1.0", cache / f"{spec.model}-{spec.version}")
    builder = Builder(faults, store, cache, progress=lambda line: None)
    for spec in faults.versions():
        builder.build_model(spec)
    ts = new_server(fleet, store, base / "ts")
    ts.start(snapshots=False)
    try:
        ts.wait_ready(fleet, timeout=300, progress=lambda line: None)
        (base / "router").mkdir()
        with RunningRouter.before(ts, fleet, base / "router") as router:
            yield Bench(ts, router, store, base, faults)
    finally:
        ts.stop()


# ------------------------------------------------------------------ the closing checks
Workers = dict[tuple[str, str], list[tuple[str, int | None, str, str]]]


def workers(ts: TorchServe, models: tuple[str, ...] = (INTENT, IMAGE)) -> Workers:
    """Each version's workers as (id, pid, status, start time): a restart changes the pid."""
    return {(v.model, v.version): [(w.id, w.pid, w.status, w.start_time) for w in v.workers]
            for model in models for v in ts.client.describe(model)}


def answers_right(model: str, body: bytes) -> bool:
    doc = json.loads(body)
    return doc.get("intent") == "travel" if model == INTENT else doc.get("label") == "triangle"


REQUESTS = {INTENT: (ROME, "application/json"), IMAGE: (SHAPE, "image/png")}


def others_untouched(bench: Bench, before: Workers, models: tuple[str, ...] = (INTENT, IMAGE)) -> None:
    """A healthy request to each of ``models`` succeeds, directly and through the router, and
    their workers are the ones ``before`` saw (no restart), all READY."""
    for model in models:
        body, content_type = REQUESTS[model]
        for via_router in (False, True):
            resp = bench.post(model, body, content_type, via_router)
            assert resp.status_code == 200 and answers_right(model, resp.content), (model, via_router, resp.text)
    now = workers(bench.ts, models)
    assert now == {key: value for key, value in before.items() if key[0] in models}
    assert all(w[2] == "READY" for ws in now.values() for w in ws), now


def said(resp: requests.Response) -> str:
    """The message of TorchServe's (or the handler's, or the router's) JSON error body."""
    try:
        return str(resp.json()["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:300]


def call(url: str, key: str, model: str) -> Call:
    """A closed-loop client's request to ``model`` at ``url`` (TorchServe's inference port or
    the router's): ok with the right answer, else "<status> <message>"."""
    session = requests.Session()
    body, content_type = REQUESTS[model]
    session.headers.update({"Authorization": f"Bearer {key}", "Content-Type": content_type})

    def go() -> str:
        try:
            resp = session.post(f"{url}/predictions/{model}", data=body, timeout=DEADLINE_S)
        except requests.RequestException as exc:
            return f"no answer ({type(exc).__name__})"
        if resp.status_code == 200 and answers_right(model, resp.content):
            return OK
        return f"{resp.status_code} {said(resp)}"
    return go


@contextlib.contextmanager
def registered(bench: Bench, name: str) -> Iterator[tuple[str, int | None]]:
    """Fault model ``name`` registered through the management client with its manifest's
    serving settings, as apply registers a version; its worker (id, pid); unregistered after."""
    spec = bench.faults.models[name].versions["1.0"]
    s, client = spec.serving, bench.ts.client
    client.register(spec.archive_name, batch_size=s.batch_size, max_batch_delay_ms=s.max_batch_delay_ms,
                    response_timeout_s=s.response_timeout_s, initial_workers=s.workers)
    try:
        [state] = client.describe(name)
        assert (state.batch_size, state.max_batch_delay_ms, state.response_timeout_s) == \
            (s.batch_size, s.max_batch_delay_ms, s.response_timeout_s)
        [worker] = state.workers
        assert worker.status == "READY"
        yield worker.id, worker.pid
    finally:
        with contextlib.suppress(NotFound):
            client.unregister(name, "1.0")


def ready_worker(ts: TorchServe, model: str, not_pid: int | None) -> tuple[str, int | None] | None:
    """``model``'s one worker (id, pid) once it is READY in a process other than ``not_pid``."""
    [state] = ts.client.describe(model)
    return next(((w.id, w.pid) for w in state.workers if w.status == "READY" and w.pid not in (None, not_pid)), None)


# ------------------------------------------------------------------------- the faults
# TorchServe's answer to a request whose worker did not answer within response_timeout
# (ts_log.log: "Backend worker did not respond in given time"): "Worker died.", 500 since the
# process is still alive as it answers; then it kills the process and starts the slot again.
HUNG_ANSWER = (500, "Worker died.")
# A kill -9'd worker's requests. TorchServe answers 507 when it has already read the process's
# exit code (137) as it answers, else 500: a race, both seen on runs here.
WORKER_DIED = {"500 Worker died.", "507 Worker died."}


def test_a_handler_that_hangs_past_its_response_timeout_is_restarted_while_others_serve(bench: Bench) -> None:
    before = workers(bench.ts)
    direct, key = bench.ts.ep.url("inference"), bench.ts.keys.inference
    with registered(bench, HANG) as (slot, hung):
        load = Load({f"{model} {i}": call(direct, key, model) for model in (INTENT, IMAGE) for i in range(2)})
        load.start()
        try:
            started = time.monotonic()
            wait_for("every client served", lambda: load.served_since(started, 1), timeout=60, interval=0.1)
            sent = time.monotonic()
            resp = bench.post(HANG, SHAPE, "image/png")
            answered = time.monotonic()
            restarted = wait_for(f"{HANG}'s worker restarted", lambda: ready_worker(bench.ts, HANG, hung), timeout=90)
            wait_for("the hung process gone", lambda: not alive(hung), timeout=30)
            wait_for("every client served after", lambda: load.served_since(answered, 1), timeout=60, interval=0.1)
        finally:
            records = load.stop()
        # The client is answered once response_timeout has passed, not before, and soon after.
        assert HANG_TIMEOUT_S <= answered - sent < HANG_TIMEOUT_S + 15, answered - sent
        # TorchServe killed the hung process and started the slot again: same worker, new pid.
        assert restarted[0] == slot and restarted[1] != hung
        # The other models' clients were served throughout the hang, every answer right.
        counts = tally(records)
        assert all(set(c) == {OK} for c in counts.values()), counts
        during = {r.client for r in records if sent <= r.start and r.end <= answered}
        assert during == set(load.calls), counts
        assert (resp.status_code, said(resp)) == HUNG_ANSWER
        log = (bench.ts.workdir / "logs" / "ts_log.log").read_text(errors="replace")
        assert "Backend worker did not respond in given time" in log
    others_untouched(bench, before)


MISCOUNT_MESSAGE = (f"{MISCOUNT} 1.0: the handler's postprocess gave 0 answers for this one request; it must give "
                    "one per request (a fault of the handler, not of the request)")


def test_a_postprocess_that_miscounts_is_a_500_per_request_naming_the_version(bench: Bench) -> None:
    before = workers(bench.ts)
    with registered(bench, MISCOUNT) as worker:
        barrier = threading.Barrier(MISCOUNT_BATCH)

        def one(_: int) -> requests.Response:
            barrier.wait(10)
            return bench.post(MISCOUNT, SHAPE, "image/png")

        with ThreadPoolExecutor(MISCOUNT_BATCH) as pool:
            batch = list(pool.map(one, range(MISCOUNT_BATCH)))
        alone = bench.post(MISCOUNT, SHAPE, "image/png")
        expected = {"code": 500, "type": "InternalServerError", "message": MISCOUNT_MESSAGE}
        assert [(r.status_code, r.json()) for r in batch + [alone]] == [(500, expected)] * (MISCOUNT_BATCH + 1)
        # They came as a batch (each answer says its batch's size), and then one alone.
        assert max(int(r.headers["X-Batch-Size"]) for r in batch) > 1, [r.headers for r in batch]
        assert alone.headers["X-Batch-Size"] == "1"
        # The handler answered each request itself: its worker neither died nor was restarted.
        assert ready_worker(bench.ts, MISCOUNT, None) == worker
    others_untouched(bench, before)


def corrupted(good: bytes, how: str) -> bytes:
    half = len(good) // 2
    if how == "truncated":
        return good[:half]
    return good[:half] + random.Random(0).randbytes(len(good) - half)  # "garbage": its second half


def apply_says(name: str) -> str:
    """What `tsfleet apply` says when TorchServe cannot unpack ``name`` 1.0's archive."""
    archive = f"{name}-1.0.mar"
    return (f"tsfleet: step 1 of 2 failed (register {name} 1.0): {name} 1.0 was not registered: registering "
            f"{archive}: 500 Failed to save model: {archive}; TorchServe did not keep it, so the server is as it "
            f"was. TorchServe could not unpack {archive} (corrupt or truncated?): `tsfleet build` makes it again. "
            "Steps before it are done; fix the cause and run apply again to finish.\n")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_corrupt_archive_is_refused_naming_it_and_nothing_changes(bench: Bench, how: str) -> None:
    name = f"{how}-classifier"
    archive = f"{name}-1.0.mar"
    good = (bench.store / f"{IMAGE}-1.0.mar").read_bytes()
    (bench.store / archive).write_bytes(corrupted(good, how))
    client = bench.ts.client
    before, models = workers(bench.ts), sorted(client.list_models())
    doc = manifest()
    image_like(doc, name, "handlers/image_classifier.py")
    fleet = parse_fleet(doc, ROOT)
    path = bench.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        # The management client, as apply calls it.
        with pytest.raises(ApiError) as refused:
            client.register(archive, initial_workers=1)
        # TorchServe's answer: an I/O error reading or unpacking it, whichever the corruption.
        assert str(refused.value) == f"registering {archive}: 500 Failed to save model: {archive}"
        assert sorted(client.list_models()) == models
        # `tsfleet apply` with a manifest that adds it: the register step is the only change.
        assert [(s.action, s.model) for s in current_plan(fleet, client)] == [("register", name), ("set-default", name)]
        proc = subprocess.run(
            [sys.executable, "-m", "tsfleet", "--manifest", str(path), "--config", str(bench.ts.config),
             "--key-file", str(bench.ts.workdir / "key_file.json"), "--model-store", str(bench.store),
             "--report-dir", str(bench.ts.report_dir), "--router-admin", f"http://127.0.0.1:{free_ports(1)[0]}",
             "--router-key-file", str(bench.workdir / "no-router-key.json"), "apply"],
            capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 2 and proc.stderr == apply_says(name), proc.stdout + proc.stderr
        assert sorted(client.list_models()) == models
    finally:
        if name in client.list_models():
            client.unregister(name, "1.0")
        (bench.store / archive).unlink()
    others_untouched(bench, before)


DIRECT_CLIENTS, ROUTER_CLIENTS = 12, 4


def test_a_worker_killed_mid_batch_fails_only_its_batch_directly_and_nothing_through_the_router(bench: Bench) -> None:
    before = workers(bench.ts)
    [state] = bench.ts.client.describe(INTENT)
    [victim] = state.workers  # its pid is the serving process: no recycler replaced it here
    # Only the killed worker's batch is lost: a worker holds one batch at a time (at most
    # batch_size requests), TorchServe fails that batch alone, and every request still in
    # the version's queue waits for the restarted worker. So direct failures <= batch_size x
    # the workers killed (8 x 1 = batch_size x the version's one worker), a bound below the
    # 12 direct clients, so it is not met by the clients' count alone.
    killed = 1
    bound = state.batch_size * killed
    assert bound < DIRECT_CLIENTS
    calls = {f"direct {i}": call(bench.ts.ep.url("inference"), bench.ts.keys.inference, INTENT)
             for i in range(DIRECT_CLIENTS)}
    calls.update({f"router {i}": call(bench.router.url, router_key(bench.router), INTENT)
                  for i in range(ROUTER_CLIENTS)})
    arm = bench.router.table.stats.get((INTENT, "1.0"))
    retries_before = arm.retries if arm else 0
    load = Load(calls).start()
    try:
        started = time.monotonic()
        wait_for("every client served", lambda: load.served_since(started, 3), timeout=90, interval=0.1)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        restarted = wait_for(f"{INTENT}'s worker restarted", lambda: ready_worker(bench.ts, INTENT, victim.pid),
                             timeout=120)
        back = time.monotonic()
        wait_for("every client served by the restarted worker", lambda: load.served_since(back, 3), timeout=90,
                 interval=0.1)
    finally:
        records = load.stop()
    counts = tally(records)
    failed = [r for r in records if r.kind != OK]
    retried = bench.router.table.stats[(INTENT, "1.0")].retries - retries_before
    assert restarted[0] == victim.id and not alive(victim.pid)
    # Through the router: not one failed.
    assert not [r for r in failed if r.client.startswith("router")], counts
    # Direct: only requests in flight at the kill, each with TorchServe's "Worker died.".
    assert all(r.start < killed_at < r.end for r in failed), failed
    assert {r.kind for r in failed} <= WORKER_DIED, counts
    assert len(failed) <= bound, failed
    # Killed mid-batch (16 clients keep its queue full): the batch's requests failed directly
    # or were retried by the router (on runs here 4 + 4, or 7 + 1: one full batch of 8).
    assert len(failed) + retried >= 1
    others_untouched(bench, before, (IMAGE,))
    resp = bench.post(INTENT, ROME, "application/json")
    assert resp.status_code == 200 and answers_right(INTENT, resp.content)
