"""k8s/monitoring/ held to what the fleet really exports and to docs/operations.md.

Every metric name that the Grafana dashboard, the PrometheusRule and the prometheus-adapter
rule query is checked against one of these lists:

- the real scrape (integration): /metrics of a running TorchServe, router and recycler,
  read without a key as the ServiceMonitor reads them, after REST and gRPC requests through
  the router and direct, a workflow call, a bad request, a canary rolled back, a worker
  recycled, and a routes file taken and a bad one refused (the router follows one, as in a pod);
- EVENT_ONLY: names that need what this machine cannot cause (a GPU, a TorchServe 5xx).
  Each is checked, in the unit tier, against the code that writes it;
- PROMETHEUS_MADE: series Prometheus writes itself (``up``).

The unit tier also checks every name against what the code writes when it is run here
(router, recycler and handler /metrics text, TorchServe's metrics.yaml), so a misspelled
name fails CI without a fleet.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import requests
import torch
import yaml

from tests.integration.conftest import ROOT, fleet, free_ports, model_store  # noqa: F401 (fixtures)
from tests.polling import wait_for

MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARD = MONITORING / "dashboards" / "tsfleet.json"
RULES = MONITORING / "prometheusrule.yaml"
SERVICE_MONITOR = MONITORING / "servicemonitor.yaml"
ADAPTER = MONITORING / "prometheus-adapter-rules.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# name -> (what it takes to appear, which code writes it: a key of written_by_code())
EVENT_ONLY = {
    "HandlerCudaAllocatedMB": ("a worker on a GPU", "handlers"),
    "HandlerCudaReservedMB": ("a worker on a GPU", "handlers"),
    "GPUMemoryUsed": ("a TorchServe host with a GPU", "torchserve"),
    "Requests5XX": ("a 5xx answer from TorchServe", "torchserve"),
}
PROMETHEUS_MADE = {"up": "Prometheus writes it for every target it scrapes"}


# --- a crude PromQL reader: metric names, not functions, keywords or labels ---------------

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "offset", "inf", "nan", "atan2"}
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBERS = re.compile(r"(?<![\w:])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"\s*label_values\((.*),\s*\w+\s*\)\s*", re.S)


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (or Grafana's label_values(query, label)):
    strings, label matchers, ranges, label lists, offsets, numbers and variables are cut
    out first; an identifier followed by "(" is a function or an aggregation."""
    if m := _LABEL_VALUES.fullmatch(expr):
        expr = m.group(1)
    s = _STRINGS.sub(" ", expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _LABEL_LISTS.sub(" ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    s = _NUMBERS.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        if m.group().lower() in KEYWORDS or re.match(r"\s*\(", s[m.end():]):
            continue
        names.add(m.group())
    return names


# --- the queries k8s/monitoring makes -----------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def alerts() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def adapter_rules() -> list[dict]:
    return yaml.safe_load(yaml.safe_load(ADAPTER.read_text())["data"]["config.yaml"])["rules"]


def adapter_query(rule: dict) -> str:
    """The query prometheus-adapter runs for one series its seriesQuery found."""
    series = " or ".join(sorted(metric_names(rule["seriesQuery"])))
    return (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'pod="p"')
            .replace("<<.GroupBy>>", "pod"))


def queries(dash: dict | None = None, rules: list[dict] | None = None) -> dict[str, str]:
    """Where -> PromQL, for every query of the dashboard, the alerts and the adapter rule."""
    out = {}
    dash = dashboard() if dash is None else dash
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out[f"dashboard variable {var['name']}"] = var["query"]["query"]
    for p in all_panels(dash["panels"]):
        for t in p.get("targets", []):
            out[f"dashboard panel {p['id']} ({p['title']}) {t['refId']}"] = t["expr"]
    for rule in alerts() if rules is None else rules:
        out[f"alert {rule['alert']}"] = rule["expr"]
    for i, rule in enumerate(adapter_rules()):
        out[f"adapter rule {i} seriesQuery"] = rule["seriesQuery"]
        out[f"adapter rule {i} metricsQuery"] = adapter_query(rule)
    return out


def unknown_names(where_exprs: dict[str, str], known: set[str]) -> dict[str, set[str]]:
    """For each query, the metric names it uses that ``known`` lacks (none: left out)."""
    out = {}
    for where, expr in where_exprs.items():
        if missing := metric_names(expr) - known - set(PROMETHEUS_MADE):
            out[where] = missing
    return out


def queried_names() -> set[str]:
    return set().union(*map(metric_names, queries().values()))


# --- what the code writes -----------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?=[{\s])", re.M)
_TYPE = re.compile(r"^# TYPE ([A-Za-z_:][A-Za-z0-9_:]*) (\w+)", re.M)
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def sampled(text: str) -> set[str]:
    """Names with at least one sample in Prometheus text (a histogram's are its _bucket, _sum, _count)."""
    return set(_SAMPLE.findall(text))


def declared(text: str) -> set[str]:
    """Names the # TYPE lines promise, samples or not, histograms and summaries as queried."""
    return {name + suffix for name, kind in _TYPE.findall(text) for suffix in SUFFIXES.get(kind, ("",))}


class RecordingMetrics:
    """Stands in for TorchServe's metrics cache in a handler: keeps each name added."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def add_metric(self, name: str, value: float, unit: str, dimensions: list, metric_type: object) -> None:
        self.names.add(name)


def written_by_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """The names each part of the fleet writes, by running the code that writes them (with
    every event that adds a series: a rollback, a failed recycle, a rejected request, a GPU)."""
    from handlers.runtime import HandlerMetrics
    from tsfleet.manifest import Fleet
    from tsfleet.control.recycle import Event, Recycler
    from tsfleet.router import selfstats
    from tsfleet.router.keys import InferenceKeys
    from tsfleet.router.rollback_record import RollbackRecorder
    from tsfleet.router.routes_file import RoutesFile
    from tsfleet.router.policy.routing import Route, RoutingTable
    from tsfleet.router.wire import limits
    import ts

    table = RoutingTable({"m": Route("m", "1.0", {"1.0": 50.0, "1.1": 50.0})})
    table.record("m", "1.0", True, 0.01)
    table.record("m", "1.1", False, 0.01)
    table.roll_back("m", "1.1", "by a test")
    # A router following a routes file (as in a pod): the content it took, and its rollbacks'
    # records in the routes ConfigMap.
    table.routes_file_sha256 = "0" * 64
    versions = lambda: {"m": ["1.0", "1.1"]}  # noqa: E731
    routes_file = RoutesFile(tmp_path / "routes.json", table, versions)
    recorder = RollbackRecorder(table, None, "routes.json", None, versions, pod="p")
    key_file = tmp_path / "key_file.json"
    expires = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    key_file.write_text(json.dumps({"inference": {"key": "k", "expiration time": expires}, "API": {"key": "a"}}))
    router = "".join([table.prometheus(), routes_file.prometheus(), recorder.prometheus(),
                      limits.prometheus({"rest": limits.LimitCounters(), "grpc": limits.LimitCounters()}),
                      selfstats.process_metrics({"leader": os.getpid()}),
                      InferenceKeys("router-key", key_file, "http://127.0.0.1:9").prometheus()])

    recycler = Recycler(Fleet(tmp_path, {}), client=None, report_dir=tmp_path / "reports", progress=lambda line: None)
    recycler._record(Event("m", "1.0", 1, "max_rss: 900 MB, limit 800 MB", False, "did not load"))
    recycler._record(Event("m", "1.0", 2, "max_requests: served 10, limit 10", True))
    recycler.workers = {("m", "1.0"): (0, 1)}

    recording = RecordingMetrics()
    handler = HandlerMetrics(recording, "1.0")
    handler.batch(4, 1.0, 2.0, 3.0, errors=1)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    handler.memory(torch.device("cuda", 0))
    handler.cleanup()

    # TorchServe's own names: what its metrics config declares (config.properties sets no
    # metrics_config of its own, so TorchServe uses the one it ships).
    config = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    torchserve = {m["name"] for section in ("ts_metrics", "model_metrics")
                  for kind in config.get(section, {}).values() for m in kind}
    return {"router": sampled(router) | declared(router),
            "recycler": sampled(recycler.metrics()) | declared(recycler.metrics()),
            "handlers": recording.names, "torchserve": torchserve}


# --- unit tier ----------------------------------------------------------------------------

def test_the_promql_reader_finds_metric_names_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(foo_seconds_bucket{model=~"$model", le!="+Inf"}'
            '[$__rate_interval]))) / on (pod) group_left (node) bar:recorded offset 10m > bool 1e3 '
            'unless absent(baz_total{job="x"} @ 5) or label_replace(qux, "dst", "$1", "src", "(.*)") '
            'and max_over_time(ratio[1h:5m]) * -Inf')
    assert metric_names(expr) == {"foo_seconds_bucket", "bar:recorded", "baz_total", "qux", "ratio"}
    assert metric_names('label_values(tsfleet_router_requests_total{job="$job"}, model)') == \
        {"tsfleet_router_requests_total"}
    assert metric_names("sum(rate(a_total[5m])) by (model) / sum without (le) (b_total)") == {"a_total", "b_total"}


def test_every_metric_queried_is_one_the_code_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    known = set().union(*written_by_code(tmp_path, monkeypatch).values())
    assert unknown_names(queries(), known) == {}
    assert {"tsfleet_router_latency_seconds_bucket", "ts_inference_latency_microseconds", "HandlerBatches",
            "tsfleet_workers_ready"} <= queried_names()  # the reader saw the queries at all


def test_a_misspelled_metric_name_fails_that_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    known = set().union(*written_by_code(tmp_path, monkeypatch).values())
    rules = alerts()
    errors = next(r for r in rules if r["alert"] == "TsfleetArmErrors")
    errors["expr"] = errors["expr"].replace("tsfleet_router_errors_total", "tsfleet_router_error_total")
    dash = dashboard()
    panel = next(p for p in all_panels(dash["panels"]) if p["title"] == "Inference requests / s")
    panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace("ts_inference_requests_total",
                                                                      "ts_inference_request_total")
    assert unknown_names(queries(dash, rules), known) == {
        "alert TsfleetArmErrors": {"tsfleet_router_error_total"},
        f"dashboard panel {panel['id']} (Inference requests / s) A": {"ts_inference_request_total"},
    }


def test_names_seen_only_after_an_event_are_written_by_the_code_named(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    written = written_by_code(tmp_path, monkeypatch)
    for name, (event, source) in EVENT_ONLY.items():
        assert name in written[source], f"{name} ({event}) is not written by {source}"
    assert set(EVENT_ONLY) <= queried_names(), "an EVENT_ONLY entry no query uses any more: drop it"


def exported_from_0(tmp_path: Path) -> set[str]:
    """Names a new pod exports at 0 before anything happened: its router (following a routes
    file, as in k8s/base) and its recycler, fresh."""
    from tsfleet.manifest import load_fleet
    from tsfleet.control.recycle import Recycler
    from tsfleet.router.policy.manifest_routes import routes_from_fleet
    from tsfleet.router.policy.routing import RoutingTable
    from tsfleet.router.rollback_record import RollbackRecorder
    from tsfleet.router.routes_file import RoutesFile

    fleet = load_fleet(ROOT / "fleet.yaml")
    table = RoutingTable(routes_from_fleet(fleet))
    versions = lambda: {name: list(model.versions) for name, model in fleet.models.items()}  # noqa: E731
    text = "".join([table.prometheus(), RoutesFile(tmp_path / "routes.json", table, versions).prometheus(),
                    RollbackRecorder(table, None, "routes.json", None, versions, pod="p").prometheus(),
                    Recycler(fleet, client=None, report_dir=tmp_path, progress=lambda line: None).metrics()])
    return set(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})? 0(?:\.0)?$", text, re.M))


# An alert's branch for a series new in the window: "(X unless X offset 10m)", or "(X > 0 unless ...)".
_NEW_SERIES = re.compile(r"\(\s*([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s*(>\s*0\s+)?unless\s+\1\b")


def test_counters_a_new_pod_exports_at_0_fire_no_alert(tmp_path: Path) -> None:
    """increase() misses a counter whose series starts above 0, hence the "new in the window"
    branches; for a counter exported from 0 that branch must ask for more than 0, or every
    new pod (a scale-up, a rollout) fires it for as long as its window."""
    zeros = exported_from_0(tmp_path)
    assert {"tsfleet_router_rollbacks_total", "tsfleet_router_routes_file_refused_total",
            "tsfleet_router_rollback_unrecorded_total"} <= zeros
    branches = [(rule["alert"], m) for rule in alerts() for m in _NEW_SERIES.finditer(rule["expr"])]
    assert len(branches) >= 3, "the reader found the branches at all"
    for alert, m in branches:
        if m.group(1) in zeros:
            assert m.group(3), f"{alert}: {m.group(1)} starts at 0 in every new pod; its new-series branch needs > 0"


def operations_alert_rows() -> list[tuple[str, str]]:
    """(alert, first look) for each row of docs/operations.md's "Alerts worth setting" table."""
    section = OPERATIONS.read_text().split("## Alerts worth setting", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    assert rows[0][0].strip() == "alert" and set(rows[1][0].strip()) <= set("-:"), rows[:2]
    return [(cells[0].strip(), cells[2].strip()) for cells in rows[2:]]


def test_the_alerts_are_the_operations_table() -> None:
    rows = operations_alert_rows()
    rules = alerts()
    assert len(rows) >= 9
    by_row: dict[str, list[dict]] = {}
    for rule in rules:
        by_row.setdefault(rule["annotations"]["operations_row"], []).append(rule)
    assert set(by_row) == {alert for alert, _ in rows}, "docs/operations.md's alert table and the PrometheusRule differ"
    for alert, first_look in rows:
        # Every tsfleet metric the row names is in its alerts' expressions.
        named = set(re.findall(r"\btsfleet_[a-z_]+", alert))
        assert named <= set().union(*(metric_names(r["expr"]) for r in by_row[alert])), alert
        for rule in by_row[alert]:
            assert rule["annotations"]["description"].endswith("First look: " + first_look.replace("`", "")), \
                rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning", "info"} and "for" in rule, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
    assert len({r["alert"] for r in rules}) == len(rules)


def test_the_dashboard_is_valid_json_with_unique_ids_and_a_datasource_variable_everywhere() -> None:
    dash = json.loads(DASHBOARD.read_text())  # valid JSON, or this raises
    panels = list(all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    for p in panels:
        assert p["datasource"] == DATASOURCE, p["title"]
        if p["type"] != "row":
            assert p["targets"], p["title"]
        for t in p.get("targets", []):
            assert t["datasource"] == DATASOURCE, (p["title"], t["refId"])

    def sources(node: object) -> Iterator[object]:  # every "datasource" anywhere, variables included
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield value
                yield from sources(value)
        elif isinstance(node, list):
            for item in node:
                yield from sources(item)

    assert all(s == DATASOURCE for s in sources(dash))


def test_kustomize_ships_the_dashboard_under_a_stable_name_for_the_grafana_sidecar() -> None:
    # The kubectl that scripts/install-k8s-tools.sh pins, where it is installed; else the one on PATH.
    pinned = ROOT / os.environ.get("K8S_VENV", ".venv-k8s") / "bin" / "kubectl"
    kubectl = str(pinned) if pinned.exists() else shutil.which("kubectl")
    assert kubectl, f"no kubectl: neither {pinned} (sh scripts/install-k8s-tools.sh) nor one on PATH"
    built = subprocess.run([kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout)}
    assert set(docs) == {("ConfigMap", "tsfleet-grafana-dashboard"), ("ServiceMonitor", "tsfleet"),
                         ("PrometheusRule", "tsfleet")}
    config_map = docs["ConfigMap", "tsfleet-grafana-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {"tsfleet.json": DASHBOARD.read_text()}
    assert yaml.safe_load(RULES.read_text()) == docs["PrometheusRule", "tsfleet"]


def test_the_adapter_rules_expose_the_routers_load_per_pod() -> None:
    exposed = {}
    for rule in adapter_rules():
        (series,) = metric_names(rule["seriesQuery"])
        assert re.search(rule["name"]["matches"], series), rule
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        # Per pod: the adapter groups by the resource asked for, over that pod's series alone.
        assert "sum by (<<.GroupBy>>) (rate(<<.Series>>{<<.LabelMatchers>>}[" in rule["metricsQuery"], rule
        exposed[rule["name"]["as"]] = series
    # Requests under way (Little's law: the rate of the seconds spent answering), and answers per second.
    assert exposed == {"tsfleet_router_in_flight": "tsfleet_router_latency_seconds_sum",
                       "tsfleet_router_requests_per_second": "tsfleet_router_requests_total"}


# --- integration tier: a real fleet, scraped as the ServiceMonitor scrapes it --------------

def recycled_manifest(workdir: Path) -> Path:
    """fleet.yaml with the image classifier recycled every few requests (handlers by full path)."""
    doc = copy.deepcopy(yaml.safe_load((ROOT / "fleet.yaml").read_text()))
    for model in doc["models"].values():
        model["handler"] = str(ROOT / model["handler"])
    doc["models"]["image-classifier"]["recycle"] = {"max_requests": 3}
    path = workdir / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def live(fleet, model_store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # noqa: F811
    """Scrapes of a real TorchServe, router and recycler after traffic and events, with the
    status each scrape got without a key, and the router admin port's answer to /metrics.
    The router follows a routes file laid out as the kubelet mounts the routes ConfigMap."""
    from tests.configmap_mount import MountedConfigMap
    from tests.integration.router_harness import served
    from tsfleet.router.proto import inference_pb2 as pb
    from tsfleet.router.proto import inference_pb2_grpc as pb_grpc

    workdir = tmp_path_factory.mktemp("monitoring")
    routes = MountedConfigMap(workdir / "routes")
    routes.publish(json.dumps({"routes": {"intent-classifier": {"baseline": "1.0", "weights": {"1.0": 100}}}}))
    with served(fleet, model_store, workdir, keyed=True, routes_file=routes.path, routes_poll_s=0.2) as (ts, router):
        ts.register_workflows(fleet)
        (port,) = free_ports(1)
        log = (workdir / "recycle.log").open("w")
        recycler = subprocess.Popen(
            [sys.executable, "-m", "tsfleet", "--manifest", str(recycled_manifest(workdir)), "--config", str(ts.config),
             "--key-file", str(ts.workdir / "key_file.json"), "--report-dir", str(ts.tmp_dir / "tsfleet-workers"),
             "recycle", "--metrics-port", str(port), "--interval", "0.5"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            key = ts.keys.header("inference")
            text, png = {**key, "Content-Type": "application/json"}, {**key, "Content-Type": "image/png"}
            shape = (ROOT / "docs" / "shape.png").read_bytes()
            answers = [router.post("/predictions/text-embedder", b'{"text": "a cat on a mat"}', text),
                       router.post("/predictions/intent-classifier", b'{"text": "book a flight"}', text),
                       router.post("/predictions/intent-classifier/1.1", b'{"text": "refund me"}', text),
                       router.post("/predictions/image-classifier", shape, png),
                       requests.post(ts.ep.url("inference") + "/wfpredict/intent-pipeline",
                                     data=b'{"text": "weather tomorrow"}', headers=text, timeout=60)]
            assert [a.status_code for a in answers] == [200] * len(answers), [a.text[:200] for a in answers]
            assert router.post("/predictions/text-embedder", b'{"txt": "hi"}', text).status_code == 400
            for target in (router.grpc_target, f"127.0.0.1:{ts.ep.grpc_inference}"):
                with grpc.insecure_channel(target) as channel:
                    reply = pb_grpc.InferenceAPIsServiceStub(channel).Predictions(
                        pb.PredictionsRequest(model_name="intent-classifier", input={"data": b'{"text": "hello"}'}),
                        metadata=[("authorization", key["Authorization"])], timeout=60)
                    assert b"intent" in reply.prediction
            assert router.admin("PUT", "/routes/intent-classifier", json={"weights": {"1.0": 50, "1.1": 50}}).ok
            assert router.admin("POST", "/routes/intent-classifier/rollback").ok

            def scrape(url: str) -> requests.Response:
                return requests.get(url + "/metrics", timeout=10)  # no Authorization, as the ServiceMonitor

            def recycled() -> str | None:
                # Requests go on until the recycler has replaced a worker and counted it.
                router.post("/predictions/image-classifier", shape, png)
                assert recycler.poll() is None, (workdir / "recycle.log").read_text()[-2000:]
                try:
                    got = scrape(f"http://127.0.0.1:{port}").text
                except requests.ConnectionError:
                    return None  # its metrics port is not open yet
                return got if 'outcome="ok"' in got else None

            wait_for("the recycler's first recycle in its /metrics", recycled, timeout=180, interval=0.2)
            # A version the manifest does not list: refused, and counted.
            routes.publish(json.dumps({"routes": {"intent-classifier": {"baseline": "9.9", "weights": {"9.9": 100}}}}))
            wait_for("the refused routes file in the router's /metrics",
                     lambda: re.search(r"^tsfleet_router_routes_file_refused_total 1(\.0)?$", scrape(router.url).text, re.M),
                     timeout=30)
            # The workers' metrics reach TorchServe's frontend through their logs: wait for the rejection.
            wait_for("HandlerRejected in TorchServe's /metrics",
                     lambda: "HandlerRejected{" in scrape(ts.ep.url("metrics")).text, timeout=60)
            got = {"torchserve": scrape(ts.ep.url("metrics")), "router": scrape(router.url),
                   "recycler": scrape(f"http://127.0.0.1:{port}")}
            yield {"status": {k: r.status_code for k, r in got.items()}, "text": {k: r.text for k, r in got.items()},
                   "admin_metrics": requests.get(router.admin_url + "/metrics", timeout=10).status_code}
        finally:
            recycler.terminate()  # it stops on SIGTERM
            try:
                recycler.wait(30)
            except subprocess.TimeoutExpired:
                recycler.kill()
                recycler.wait(10)
            log.close()


@pytest.mark.integration
@pytest.mark.slow
def test_every_metric_queried_is_in_a_real_scrape(live: dict) -> None:
    scraped = set().union(*map(sampled, live["text"].values()))
    missing = unknown_names(queries(), scraped | set(EVENT_ONLY))
    assert missing == {}, f"not in a real scrape and not in EVENT_ONLY: {missing}"
    # TorchServe declares its own event-only names in every scrape, samples or not.
    from_torchserve = {name for name, (_, source) in EVENT_ONLY.items() if source == "torchserve"}
    assert from_torchserve <= declared(live["text"]["torchserve"])
    # TsfleetModelNotReady joins the recycler's gauges to the router's arms on model and version.
    arms = set(re.findall(r'^tsfleet_router_requests_total\{model="([^"]+)",version="([^"]+)"', live["text"]["router"], re.M))
    versions = set(re.findall(r'^tsfleet_workers_ready\{model="([^"]+)",version="([^"]+)"', live["text"]["recycler"], re.M))
    assert arms and arms <= versions


@pytest.mark.integration
@pytest.mark.slow
def test_the_scraped_endpoints_need_no_key_so_the_service_monitor_sends_none(live: dict) -> None:
    assert live["status"] == {"torchserve": 200, "router": 200, "recycler": 200}
    # The router's admin port wants its token for anything and serves no /metrics: not a target.
    assert live["admin_metrics"] == 401
    endpoints = yaml.safe_load(SERVICE_MONITOR.read_text())["spec"]["endpoints"]
    assert {e["port"] for e in endpoints} == {"metrics", "router", "recycler"}
    for e in endpoints:
        assert e["path"] == "/metrics"
        assert not {"authorization", "bearerTokenSecret", "bearerTokenFile", "basicAuth", "oauth2"} & set(e), e
