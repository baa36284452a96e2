"""`tsfleet apply` brings a running router to the manifest, as it brings TorchServe: a
default moved by hand and the old version retired under load through the router (during a
canary) fails no request, and models that join or leave the manifest join or leave the
router's routes (rollout, readiness) without restarting it."""
from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml

from tests.integration.conftest import ROOT
from tests.integration.router_harness import RunningRouter, SteadyLoad
from tests.integration.router_harness import served as served_with_router
from tests.polling import wait_for
from tsfleet.control.apply import apply
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.control.router_admin import RouterAdmin
from tsfleet.control.server import TorchServe

pytestmark = pytest.mark.slow
INTENT, IMAGE, TEXT = "intent-classifier", "image-classifier", "text-embedder"
BASE = yaml.safe_load((ROOT / "fleet.yaml").read_text())


def manifest_of(edit=None) -> dict:
    """Intent classifier 1.0 (default) and 1.1, the image classifier; no workflow."""
    doc = copy.deepcopy(BASE)
    doc["models"].pop(TEXT)
    doc["workflows"] = {}
    doc["models"][INTENT]["rollback"] = {"max_p99_ratio": 0, "max_error_rate_increase": 1.0}  # no rollback mid-test
    if edit:
        edit(doc)
    return doc


def fleet_of(edit=None) -> Fleet:
    return parse_fleet(manifest_of(edit), ROOT)


@pytest.fixture(scope="module")
def served(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TorchServe, RunningRouter]]:
    with served_with_router(fleet_of(), model_store, tmp_path_factory.mktemp("apply-router"), keyed=True) as pair:
        yield pair


def test_a_default_moved_in_the_manifest_reaches_the_router_before_the_old_version_goes(served, model_store,
                                                                                       tmp_path: Path) -> None:
    ts, router = served
    key = ts.keys.header("inference")
    admin = RouterAdmin(router.admin_url, ts.workdir / "router_key.json")
    admin.call("PUT", f"/routes/{INTENT}", {"weights": {"1.0": 90, "1.1": 10}})  # a canary under way

    def moved(doc: dict) -> None:  # by hand: 1.1 is the default, 1.0 leaves
        doc["models"][INTENT]["default_version"] = "1.1"
        del doc["models"][INTENT]["versions"]["1.0"]

    # `tsfleet plan` shows what apply will do to the router's traffic, and changes nothing.
    (tmp_path / "handlers").symlink_to(ROOT / "handlers")
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(manifest_of(moved)))
    planned = subprocess.run(
        [sys.executable, "-m", "tsfleet", "--manifest", str(tmp_path / "fleet.yaml"), "--config", str(ts.config),
         "--key-file", str(ts.workdir / "key_file.json"), "--router-admin", router.admin_url,
         "--router-key-file", str(ts.workdir / "router_key.json"), "plan"], capture_output=True, text=True, cwd=ROOT,
        timeout=120)
    assert [line.split()[:2] for line in planned.stdout.splitlines()[:2]] == [["set-default", INTENT],
                                                                             ["unregister", INTENT]], planned
    assert planned.stdout.splitlines()[2:] == [
        f"router: {INTENT}: all traffic to 1.1, the manifest's default (was 1.0 90, 1.1 10)"], planned
    assert admin.routes()[INTENT]["weights"] == {"1.0": 90.0, "1.1": 10.0}

    lines: list[str] = []
    with SteadyLoad(router.url + f"/predictions/{INTENT}", key, 6) as routed:
        wait_for("50 answers before the change", lambda: routed.ok >= 50 or routed.failures, 30)
        started = time.monotonic()
        apply(fleet_of(moved), ts.client, lines.append, store=model_store, report_dir=ts.report_dir, router=admin)
        took = time.monotonic() - started
        settled = routed.ok
        wait_for("50 answers after it", lambda: routed.ok >= settled + 50 or routed.failures, 60)
    assert routed.failures == [], "\n".join(lines)
    assert f"  router: {INTENT}: all traffic to 1.1, the manifest's default (was 1.0 90, 1.1 10)" in lines
    # The router moved before the retirement, so 1.0 drained at once instead of waiting out its timeout.
    assert lines.index(f"  router: {INTENT}: all traffic to 1.1, the manifest's default (was 1.0 90, 1.1 10)") < \
        next(i for i, line in enumerate(lines) if "unregister" in line), lines
    assert took < 30 and not any("not drained" in line for line in lines), lines
    assert [v.version for v in ts.client.describe(INTENT)] == ["1.1"]
    route = admin.routes()[INTENT]
    assert (route["baseline"], route["weights"]) == ("1.1", {"1.1": 100.0})
    resp = router.post(f"/predictions/{INTENT}", b'{"text": "book a train to Vienna"}',
                       {**key, "Content-Type": "application/json"})
    assert (resp.status_code, resp.headers["X-Model-Version"], resp.json()["intent"]) == (200, "1.1", "travel")


def test_models_that_join_or_leave_the_manifest_join_or_leave_the_routes(served, model_store) -> None:
    ts, router = served
    key = ts.keys.header("inference")
    admin = RouterAdmin(router.admin_url, ts.workdir / "router_key.json")

    def swapped(doc: dict) -> None:  # the image model leaves, the text embedder joins
        doc["models"][INTENT]["default_version"] = "1.1"
        del doc["models"][INTENT]["versions"]["1.0"]
        doc["models"].pop(IMAGE)
        doc["models"][TEXT] = copy.deepcopy(BASE["models"][TEXT])

    lines: list[str] = []
    apply(fleet_of(swapped), ts.client, lines.append, store=model_store, report_dir=ts.report_dir, router=admin)
    assert f"  router: {IMAGE}: route removed (the model left the manifest)" in lines
    assert f"  router: {TEXT}: new route, all traffic to 1.0" in lines
    routes = admin.routes()
    assert set(routes) == {INTENT, TEXT} and routes[TEXT]["weights"] == {"1.0": 100.0}
    # The new model is routed (its answer names the version) and counts in readiness by model.
    resp = router.post(f"/predictions/{TEXT}", b'{"text": "hello"}', {**key, "Content-Type": "application/json"})
    assert resp.status_code == 200 and resp.headers["X-Model-Version"] == "1.0", resp.text
    ready = requests.get(router.url + "/readyz?models=all", timeout=10)
    assert ready.status_code == 200 and set(ready.json()["models"]) == {INTENT, TEXT}, ready.text
    # The one that left gets TorchServe's own answer for a model it does not have.
    gone = router.post(f"/predictions/{IMAGE}", b"x", {**key, "Content-Type": "image/png"})
    assert gone.status_code == 404 and "Model not found" in gone.text, gone.text
    assert apply(fleet_of(swapped), ts.client, lines.append, store=model_store, report_dir=ts.report_dir,
                 router=admin) == []
