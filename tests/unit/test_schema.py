"""fleet.schema.json: what `tsfleet schema` writes from the typed models, committed so that an
editor checks fleet.yaml as it is typed; it cannot drift from the models, the shipped fleet.yaml
passes it, and a mistake fails it as it fails load_fleet."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tsfleet import cli
from tsfleet.errors import ManifestError
from tsfleet.manifest import json_schema, load_fleet

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "fleet.schema.json").read_text())
DOC = yaml.safe_load((ROOT / "fleet.yaml").read_text())


def test_the_committed_schema_is_the_one_the_models_give(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (ROOT / "fleet.schema.json").read_text() == json_schema(), "run `tsfleet schema`"
    assert cli.main(["schema", "-o", str(tmp_path / "out.json")]) == 0
    assert (tmp_path / "out.json").read_text() == json_schema()
    capsys.readouterr()
    assert cli.main(["schema", "-o", "-"]) == 0
    assert capsys.readouterr().out == json_schema()


def test_fleet_yaml_names_its_schema_for_editors() -> None:
    first = (ROOT / "fleet.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=./fleet.schema.json"


def test_every_key_has_help_an_editor_can_show() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    for name, definition in SCHEMA["$defs"].items():
        for key, prop in definition["properties"].items():
            assert prop.get("description"), f"{name}.{key} has no description"
    assert all(prop.get("description") for prop in SCHEMA["properties"].values())


def test_the_shipped_fleet_yaml_passes_the_schema() -> None:
    jsonschema.validate(DOC, SCHEMA, cls=jsonschema.Draft202012Validator)


def _edit(path: list[str], value: object) -> dict:
    doc = copy.deepcopy(DOC)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


WRONG = [
    (["models", "text-embedder", "versions", "1.0", "sead"], 1,
     "models.text-embedder.versions.1.0: unknown key(s) sead (allowed: params, serving, settings, recycle)"),
    (["defaults", "serving", "batch_size"], "8", "defaults.serving.batch_size: expected a positive integer, got '8'"),
    (["models", "text-embedder", "serving"], {"batch_size": 0},
     "models.text-embedder.serving.batch_size: expected a positive integer, got 0"),
    (["models", "text-embedder", "streaming"], "yes", "models.text-embedder.streaming: expected true or false, got 'yes'"),
    (["models", "Bad_Name"], {"handler": "handlers/text_embedder.py", "recipe": "minilm", "versions": {"1.0": {}}},
     "models.Bad_Name: name must be lowercase letters"),
    (["models", "text-embedder", "versions"], {"v1": {}}, "models.text-embedder.versions.v1: version 'v1' must look like"),
    (["workflows", "intent-pipeline", "steps"], ["text-embedder"],
     "workflows.intent-pipeline.steps: at least two steps needed, got 1"),
    (["router"], {"limits": {"conections": 10}}, "router.limits: unknown key(s) conections (allowed: connections, "),
    (["router"], {"limits": {"head_timeout_s": 0}}, "router.limits.head_timeout_s: expected a positive number, got 0"),
]


@pytest.mark.parametrize("path,value,message", WRONG, ids=[m.split(":")[0] for _, _, m in WRONG])
def test_a_mistake_fails_the_schema_and_load_fleet_alike(tmp_path: Path, path: list[str], value: object,
                                                          message: str) -> None:
    doc = _edit(path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)
    manifest = tmp_path / "fleet.yaml"
    manifest.write_text(yaml.safe_dump(doc).replace("handlers/", str(ROOT / "handlers") + "/"))
    with pytest.raises(ManifestError) as err:
        load_fleet(manifest)
    assert str(err.value).startswith(f"{manifest}: ") and message in str(err.value)
    assert "pydantic" not in str(err.value) and "Traceback" not in str(err.value)


def test_several_mistakes_are_reported_together_each_naming_the_file(tmp_path: Path) -> None:
    doc = _edit(["defaults", "serving", "workers"], -1)
    doc["models"]["image-classifier"]["streaming"] = "no"
    manifest = tmp_path / "fleet.yaml"
    manifest.write_text(yaml.safe_dump(doc).replace("handlers/", str(ROOT / "handlers") + "/"))
    with pytest.raises(ManifestError) as err:
        load_fleet(manifest)
    assert str(err.value).splitlines() == [
        f"{manifest}: defaults.serving.workers: expected a non-negative integer, got -1",
        f"{manifest}: models.image-classifier.streaming: expected true or false, got 'no'",
    ]


def test_an_unquoted_version_is_refused_with_the_reason(tmp_path: Path) -> None:
    # Unquoted, YAML reads 2.10 as the number 2.1: the version would silently change.
    manifest = tmp_path / "fleet.yaml"
    text = (ROOT / "fleet.yaml").read_text().replace('"1.1":', "1.1:").replace("handlers/", str(ROOT / "handlers") + "/")
    manifest.write_text(text)
    with pytest.raises(ManifestError, match=r'versions\.1\.1: expected a string key, got 1\.1 .*quote it, as "1\.0"'):
        load_fleet(manifest)
