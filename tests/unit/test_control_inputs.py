"""What the control surfaces take, checked before anything is sent or changed (no TorchServe).

The hostile cases tests/reliability/test_hostile_admin.py found, pinned in the fast tier:
the management client's names, the router's PUT /fleet and PUT /routes bodies, and the
recycler's /metrics methods.
"""
from __future__ import annotations

import http.client
import math
from pathlib import Path
from typing import Any

import pytest

from tsfleet import cli
from tsfleet.control.client import ManagementClient
from tsfleet.errors import BadRequest
from tsfleet.build.properties import Endpoints
from tsfleet.router.fronts.admin import _checked_change
from tsfleet.router.policy.manifest_routes import check_fleet_routes

SPEC = {"default_version": "1.0", "versions": ["1.0", "1.1"]}


@pytest.mark.parametrize("model, version", [
    ("x/../intent-classifier", "1.1"),  # urllib3 resolves it to /models/intent-classifier/1.1
    ("intent-classifier%2F1.1", "x"),  # TorchServe decodes %2F before it splits the path
    ("intent-classifier", ".."), (".", "1.0"), ("a\x00b", "1.0"), ("", "1.0"), ("ü", "1.0"), ("a?b", "1.0"),
])
def test_the_management_client_refuses_a_name_a_path_would_resolve_without_sending_it(
        tmp_path: Path, model: str, version: str) -> None:
    # Nothing listens on port 1: a request sent would be Unreachable, not BadRequest.
    client = ManagementClient(Endpoints(management=1), tmp_path / "no-key-file.json")
    calls = [lambda: client.unregister(model, version), lambda: client.scale(model, version, 1),
             lambda: client.set_default(model, version)]
    if model != "intent-classifier":  # describe takes the model alone
        calls.append(lambda: client.describe(model))
    for call in calls:
        with pytest.raises(BadRequest, match="is not a name TorchServe takes") as refused:
            call()
        assert refused.value.status == 400


def test_the_management_client_takes_every_name_torchserve_gives() -> None:
    from tsfleet.control.client import PATH_NAME

    for name in ("intent-classifier", "1.0", "1.0~swap", "intent-pipeline__text-embedder", "a.b_c-d"):
        assert PATH_NAME.fullmatch(name)


@pytest.mark.parametrize("doc", [
    {"text-embedder": {**SPEC, "versions": [[1]]}},  # unhashable: take_fleet failed after removing routes
    {"text-embedder": {**SPEC, "rollback": {"window_s": "x"}}},
    {"text-embedder": {**SPEC, "rollback": {"min_samples": None}}},
    {"text-embedder": {**SPEC, "rollback": {"max_p99_ratio": math.nan}}},
    {"text-embedder": {**SPEC, "rollback": [1]}},
    {"text-embedder": {**SPEC, "streaming": "yes"}},
    {"text-embedder": {**SPEC, "default_version": ""}},
])
def test_put_fleet_refuses_what_take_fleet_cannot_take_whole(doc: Any) -> None:
    with pytest.raises(ValueError):
        check_fleet_routes(doc)


def test_put_fleet_takes_what_apply_sends() -> None:
    doc = {"text-embedder": {**SPEC, "rollback": {"window_s": 60, "max_error_rate_increase": 0.05},
                             "streaming": False}}
    assert check_fleet_routes(doc) is doc


@pytest.mark.parametrize("doc", [
    {"shadow": "1.1"}, {"shadow": [1]}, {"shadow": {"version": ["x"], "share": 0.5}}, {"shadow": {"share": "x"}},
    {"shadow": {"version": "1.1", "share": 2}}, {"baseline": ["x"]}, {"baseline": ""},
    {"weights": {"1.0": math.nan, "1.1": 50}}, {"weights": {"1.0": math.inf}}, {"weights": {"1.0": True}},
    {"weights": [100]}, {"aliases": {"1.0": 5}}, {"aliases": ["1.0"]},
])
def test_put_routes_refuses_a_body_the_routes_cannot_hold(doc: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _checked_change(doc, {"1.0": 100.0})


def test_put_routes_takes_what_the_rollout_cli_and_readme_send() -> None:
    assert _checked_change({"weights": {"1.0": 95, "1.1": 5}}, {"1.0": 100.0})[0] == {"1.0": 95.0, "1.1": 5.0}
    assert _checked_change({"shadow": {"version": "1.1", "share": 0.1}}, {"1.0": 100.0})[2] == ("1.1", 0.1)
    assert _checked_change({"shadow": None, "aliases": {}}, {"1.0": 100.0})[2:] == ((None, 0.0), {})
    assert _checked_change({"weights": {"1.1": 100}, "baseline": "1.1"}, {"1.0": 100.0})[1] == "1.1"


def test_recycler_metrics_answer_head_and_refuse_other_methods_with_405() -> None:
    httpd = cli._metrics_server("127.0.0.1", 0, lambda: "up_total 1\n")
    try:
        port = httpd.server_address[1]
        answers = {}
        for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(method, "/metrics")
            resp = conn.getresponse()
            answers[method] = (resp.status, resp.getheader("Allow"), resp.read())
            conn.close()
        assert answers == {"GET": (200, None, b"up_total 1\n"), "HEAD": (200, None, b""),
                           **{m: (405, "GET, HEAD", b"") for m in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS")}}
    finally:
        httpd.shutdown()
        httpd.server_close()
