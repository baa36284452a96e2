"""The fleet manifest: the repo's own loads, and each kind of mistake fails with its location."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tsfleet.build.archive import check_settings
from tsfleet.errors import ManifestError
from tsfleet.manifest import load_fleet, parse_fleet
from tsfleet.build.properties import render_properties

ROOT = Path(__file__).resolve().parents[2]
DOC = yaml.safe_load((ROOT / "fleet.yaml").read_text())


def test_repo_manifest_loads_with_two_intent_versions() -> None:
    fleet = load_fleet(ROOT / "fleet.yaml")
    assert set(fleet.models) == {"text-embedder", "intent-classifier", "image-classifier"}
    assert set(fleet.models["intent-classifier"].versions) == {"1.0", "1.1"}
    seeds = {v.params["seed"] for v in fleet.models["intent-classifier"].versions.values()}
    assert len(seeds) == 2
    assert [s.model for s in fleet.workflows["intent-pipeline"].steps] == ["text-embedder", "intent-classifier"]
    check_settings(fleet)


def test_version_values_override_model_and_defaults() -> None:
    doc = copy.deepcopy(DOC)
    doc["models"]["intent-classifier"]["versions"]["1.1"]["serving"] = {"batch_size": 16}
    doc["models"]["intent-classifier"]["settings"] = {"amp_cpu": "bf16"}
    fleet = parse_fleet(doc, ROOT)
    v10, v11 = (fleet.models["intent-classifier"].versions[v] for v in ("1.0", "1.1"))
    assert (v10.serving.batch_size, v11.serving.batch_size) == (8, 16)
    assert v11.serving.max_batch_delay_ms == 5 and v11.settings["amp_cpu"] == "bf16"
    assert v11.settings["warmup_batch_sizes"] == [1, 8]


def test_committed_config_properties_matches_the_manifest() -> None:
    rendered = render_properties(load_fleet(ROOT / "fleet.yaml"))
    assert (ROOT / "config.properties").read_text() == rendered, "run `tsfleet config`"
    assert "disable_token_authorization=false" in rendered
    assert "allowed_urls=^$" in rendered and "127.0.0.1" in rendered
    # A plain `torchserve --start --ts-config config.properties` from the repo finds the
    # fleet's logging config, as it finds model_store, relative to where it starts.
    vmargs = next(line for line in rendered.splitlines() if line.startswith("vmargs="))
    assert (ROOT / vmargs.split("-Dlog4j.configurationFile=", 1)[1].split()[0]).is_file()


def _edit(path: list, value) -> dict:
    doc = copy.deepcopy(DOC)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


BAD = [
    (["models", "text-embedder", "versions", "1.0", "sead"], 1, "models.text-embedder.versions.1.0: unknown key(s) sead"),
    (["defaults", "serving", "batch_size"], "8", "defaults.serving.batch_size: expected a positive integer, got '8'"),
    (["models", "image-classifier", "serving"], {"workers": 3, "max_workers": 2}, "workers (3) is more than max_workers (2)"),
    (["models", "text-embedder", "handler"], "handlers/nope.py", "file handlers/nope.py does not exist"),
    (["models", "text-embedder", "versions"], {"v1": {}}, "version 'v1' must look like"),
    (["models", "text-embedder", "default_version"], "2.0", "default_version: 2.0 is not one of 1.0"),
    (["models", "Bad_Name"], {"handler": "handlers/text_embedder.py"}, "models.Bad_Name: name must be"),
    (["workflows", "intent-pipeline", "steps"], ["text-embedder", "ghost"], "unknown model 'ghost'"),
    (["workflows", "intent-pipeline", "steps"], ["text-embedder@3.0", "intent-classifier"], "text-embedder has no version 3.0"),
    (["models"], {}, "at least one model"),
    (["models", "text-embedder", "streaming"], "yes", "models.text-embedder.streaming: expected true or false"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[m.split(":")[0][:40] for _, _, m in BAD])
def test_bad_manifest_names_the_problem(path, value, message) -> None:
    with pytest.raises(ManifestError) as err:
        parse_fleet(_edit(path, value), ROOT)
    assert message in str(err.value)


@pytest.mark.parametrize("path,value,message", [
    (["models", "intent-classifier", "versions", "1.0", "params"], {}, "params: recipe intent-head takes seed; missing seed"),
    (["models", "text-embedder", "recipe"], "magic", "unknown recipe 'magic'"),
    (["models", "text-embedder", "settings"], {"max_txts": 3}, "unknown handler setting(s) max_txts"),
    (["defaults", "settings", "amp_cpu"], "fp16", "'amp_cpu' must be one of off, bf16"),
    (["defaults", "settings", "compile"], "yes", "'compile' must be true or false"),
])
def test_bad_recipe_params_and_handler_settings_fail_before_building(path, value, message) -> None:
    with pytest.raises(ManifestError) as err:
        check_settings(parse_fleet(_edit(path, value), ROOT))
    assert message in str(err.value)


def test_cli_reports_a_bad_manifest_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text(yaml.safe_dump(_edit(["defaults", "serving", "workers"], -1)))
    proc = subprocess.run([sys.executable, "-m", "tsfleet", "--manifest", str(bad), "build"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "defaults.serving.workers: expected a non-negative integer" in proc.stderr and "Traceback" not in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "tsfleet", "--manifest", str(tmp_path / "none.yaml"), "build"],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "no such manifest" in missing.stderr


def test_rollback_rule_comes_from_the_manifest_and_is_validated() -> None:
    from tsfleet.router.policy.manifest_routes import routes_from_fleet

    doc = _edit(["models", "intent-classifier", "rollback"], {"min_samples": 100, "max_p99_ratio": 0})
    route = routes_from_fleet(parse_fleet(doc, ROOT))["intent-classifier"]
    assert (route.rollback.min_samples, route.rollback.max_p99_ratio, route.rollback.window_s) == (100, 0, 60)
    with pytest.raises(ManifestError, match="rollback: unknown key"):
        parse_fleet(_edit(["defaults", "rollback", "windw_s"], 5), ROOT)
    with pytest.raises(ManifestError, match="max_p99_ratio: expected a non-negative number"):
        parse_fleet(_edit(["defaults", "rollback", "max_p99_ratio"], "2x"), ROOT)


def test_a_fleet_without_a_version_falls_back_to_another_default_and_drops_what_used_it() -> None:
    fleet = load_fleet(ROOT / "fleet.yaml")
    less = fleet.without("intent-classifier", "1.0")  # the default, and a workflow step
    assert set(less.models["intent-classifier"].versions) == {"1.1"}
    assert less.models["intent-classifier"].default_version == "1.1"
    assert less.workflows == {}
    assert set(fleet.models["intent-classifier"].versions) == {"1.0", "1.1"}  # the original is unchanged
    assert "text-embedder" not in less.without("text-embedder", "1.0").models


def test_each_typed_section_merges_into_its_runtime_dataclass_key_for_key() -> None:
    from dataclasses import fields

    from tsfleet.manifest import RecyclePolicy
    from tsfleet.manifest.document import RecycleDoc, RollbackDoc, RouterLimitsDoc, ServingDoc
    from tsfleet.manifest.fleet import Serving
    from tsfleet.router.policy.routing import RollbackRule
    from tsfleet.router.wire.limits import RouterLimits

    for typed, runtime in [(ServingDoc, Serving), (RecycleDoc, RecyclePolicy), (RollbackDoc, RollbackRule),
                           (RouterLimitsDoc, RouterLimits)]:
        assert {name: f.default for name, f in typed.model_fields.items()} == \
            {f.name: f.default for f in fields(runtime)}, typed.__name__


def test_a_problem_reads_as_the_file_the_place_and_what_was_wrong(tmp_path: Path) -> None:
    doc = _edit(["models", "text-embedder", "versions", "1.0"], {"serving": {"batch_size": 0}})
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc).replace("handlers/", str(ROOT / "handlers") + "/"))
    with pytest.raises(ManifestError) as err:
        load_fleet(path)
    assert str(err.value) == f"{path}: models.text-embedder.versions.1.0.serving.batch_size: " \
                             "expected a positive integer, got 0"


def test_a_broken_yaml_file_shows_the_line_and_where_in_it(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("models:\n  a: [\n  b: 1\n")
    with pytest.raises(ManifestError, match=r"(?s)not valid YAML: .*line 2, column 6:\n +a: \[\n +\^"):
        load_fleet(path)
