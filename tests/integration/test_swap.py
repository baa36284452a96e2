"""Changing batch settings in the manifest under steady load: `tsfleet apply` swaps the
version through a stand-in, and no client (direct or through the router) sees a failure."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml

from tests.integration.conftest import ROOT
from tests.integration.router_harness import SENTENCES, RunningRouter, SteadyLoad
from tests.integration.router_harness import served as served_with_router
from tests.polling import wait_for
from tsfleet.control.apply import apply, current_plan
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.control.router_admin import RouterAdmin
from tsfleet.control.server import TorchServe
from tsfleet.control.swap import Swapper, RouterLink, derive_archive, stand_in, stand_in_archive

pytestmark = pytest.mark.slow
MODEL = "intent-classifier"


def intent_fleet(**serving: int) -> Fleet:
    """Only the intent classifier, version 1.0 (the default), with these batch settings."""
    doc = copy.deepcopy(yaml.safe_load((ROOT / "fleet.yaml").read_text()))
    doc["models"] = {MODEL: doc["models"][MODEL]}
    doc["models"][MODEL]["versions"] = {"1.0": doc["models"][MODEL]["versions"]["1.0"]}
    doc["models"][MODEL]["default_version"] = "1.0"
    doc["models"][MODEL]["rollback"] = {"max_p99_ratio": 0, "max_error_rate_increase": 1.0}
    doc["models"][MODEL]["serving"] = {**doc["models"][MODEL].get("serving", {}), **serving}
    doc["workflows"] = {}
    return parse_fleet(doc, ROOT)


@pytest.fixture(scope="module")
def served(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TorchServe, RunningRouter]]:
    with served_with_router(intent_fleet(batch_size=8, max_batch_delay_ms=5), model_store,
                            tmp_path_factory.mktemp("swap-ts")) as pair:
        yield pair


def settings_of(ts: TorchServe) -> dict[str, tuple[bool, int, int]]:
    return {v.version: (v.is_default, v.batch_size, v.max_batch_delay_ms) for v in ts.client.describe(MODEL)}


def test_batch_settings_change_under_load_fails_no_request(served, model_store: Path) -> None:
    ts, router = served
    key = ts.keys.header("inference")
    changed = intent_fleet(batch_size=4, max_batch_delay_ms=20)
    assert [(s.action, s.version) for s in current_plan(changed, ts.client)] == [("replace", "1.0")]
    admin = RouterAdmin(router.admin_url, ts.workdir / "router_key.json")
    lines: list[str] = []
    with SteadyLoad(ts.ep.url("inference") + f"/predictions/{MODEL}", key, 8) as direct, \
            SteadyLoad(router.url + f"/predictions/{MODEL}", key, 8) as routed:
        deadline = time.monotonic() + 30
        while direct.ok < 50 or routed.ok < 50:  # steady before the change
            assert time.monotonic() < deadline, (direct.failures, routed.failures)
            time.sleep(0.05)
        before = direct.ok + routed.ok
        apply(changed, ts.client, lines.append, store=model_store, report_dir=ts.report_dir, router=admin)
        during = direct.ok + routed.ok - before
        settled = direct.ok + routed.ok
        while direct.ok + routed.ok < settled + 50:  # and steady after it
            assert time.monotonic() < deadline + 120
            time.sleep(0.05)
    assert direct.failures == [] and routed.failures == [], "\n".join(lines)
    assert during > 50, f"the load must run through the swap ({during} answers)"
    assert any("stand-in" in line for line in lines)
    assert settings_of(ts) == {"1.0": (True, 4, 20)}
    assert not (model_store / stand_in_archive(changed.models[MODEL].versions["1.0"])).exists()
    assert router.admin("GET", "/routes").json()[MODEL]["aliases"] == {}
    assert current_plan(changed, ts.client) == []


def test_an_interrupted_swap_is_finished_by_the_next_apply(served, model_store: Path) -> None:
    ts, router = served
    fleet = intent_fleet(batch_size=2, max_batch_delay_ms=10)
    spec = fleet.models[MODEL].versions["1.0"]
    # Stop where a crash would hurt most: the version gone, its stand-in the default.
    swapper = Swapper(ts.client, model_store, ts.report_dir, RouterLink(None, print))
    swapper.register(spec, derive_archive(model_store, spec), stand_in("1.0"))
    ts.client.set_default(MODEL, stand_in("1.0"))
    ts.client.unregister(MODEL, "1.0")
    resp = requests.post(ts.ep.url("inference") + f"/predictions/{MODEL}", json={"text": SENTENCES[0][0]},
                         headers=ts.keys.header("inference"), timeout=30)
    assert resp.status_code == 200 and resp.json()["intent"] == "cancel"  # the stand-in serves meanwhile

    # ...and the router sending 1.0's traffic to the stand-in, as the swap had told it to.
    admin = RouterAdmin(router.admin_url, ts.workdir / "router_key.json")
    admin.call("PUT", f"/routes/{MODEL}", {"aliases": {"1.0": stand_in("1.0")}})

    steps = [(s.action, s.version, s.detail) for s in current_plan(fleet, ts.client)]
    assert [(a, v) for a, v, _ in steps] == [("register", "1.0"), ("set-default", "1.0"), ("unregister", "1.0~swap")]
    assert "interrupted swap" in steps[-1][2]
    lines: list[str] = []
    with SteadyLoad(router.url + f"/predictions/{MODEL}", ts.keys.header("inference"), 4) as routed:
        wait_for("answers through the router before apply", lambda: routed.ok >= 20 or routed.failures, 30)
        apply(fleet, ts.client, lines.append, store=model_store, report_dir=ts.report_dir, router=admin)
        settled = routed.ok
        wait_for("answers through the router after it", lambda: routed.ok >= settled + 20 or routed.failures, 30)
    assert routed.failures == [], "\n".join(lines)
    assert not any("not drained" in line for line in lines), lines  # the router no longer fed the stand-in
    assert admin.routes()[MODEL]["aliases"] == {}
    assert settings_of(ts) == {"1.0": (True, 2, 10)}
    assert not (model_store / stand_in_archive(spec)).exists()
    assert current_plan(fleet, ts.client) == []
