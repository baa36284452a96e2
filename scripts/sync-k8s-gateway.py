"""Writes the gateway overlay's manifests (k8s/overlays/gateway/{stable,canary}/files/) from the
base's copies in k8s/base/files/ (scripts/sync-k8s-config.sh refreshes those).

    .venv/bin/python scripts/sync-k8s-gateway.py intent-classifier 1.0 1.1   # MODEL STABLE CANARY
    .venv/bin/python scripts/sync-k8s-gateway.py                              # the same pair again
    .venv/bin/python scripts/sync-k8s-gateway.py --check                      # exit 1 if a file is stale

Each track serves one version of MODEL: the stable Deployment the fleet less CANARY, the canary
the fleet less STABLE (and less the workflows built on STABLE, which the canary cannot load).
Its config.properties is the base's with only load_models and models rendered for that fleet,
so every other setting (listeners, metrics on the pod's address) stays the base's. Without
arguments it takes the pair the overlay's files already hold: run it after sync-k8s-config.sh.
tests/k8s/test_gateway_overlay.py runs --check, and fails naming this script while a file differs.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsfleet.manifest import Fleet, parse_fleet  # noqa: E402
from tsfleet.build.properties import render_properties  # noqa: E402

BASE = ROOT / "k8s" / "base" / "files"
OVERLAY = ROOT / "k8s" / "overlays" / "gateway"
HEADER = """\
# Written by scripts/sync-k8s-gateway.py from k8s/base/files/fleet.yaml: the {track} Deployment's
# fleet, the base's less {model} {dropped}. Do not edit: change fleet.yaml, run
# scripts/sync-k8s-config.sh, then scripts/sync-k8s-gateway.py.
"""


def track_manifest(doc: dict, fleet: Fleet, model: str, keep: str, drop: str) -> dict:
    """The base manifest ``doc`` with ``model`` at ``keep`` only, and without the workflows
    whose steps use ``drop`` (the archives were built with those steps)."""
    out = copy.deepcopy(doc)
    spec = out["models"][model]
    spec["versions"] = {keep: spec["versions"][keep]}
    spec["default_version"] = keep
    remaining = fleet.without(model, drop).workflows
    flows = {name: raw for name, raw in (out.get("workflows") or {}).items() if name in remaining}
    if flows:
        out["workflows"] = flows
    else:
        out.pop("workflows", None)
    return out


def _property_lines(text: str, key: str) -> tuple[int, int]:
    """The [start, end) line range of ``key``'s value, continuation lines included."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{key}="))
    end = start
    while lines[end].rstrip("\n").endswith("\\"):
        end += 1
    return start, end + 1


def track_properties(base_text: str, fleet: Fleet) -> str:
    """The base's config.properties with load_models and models rendered for ``fleet``."""
    rendered = render_properties(fleet).splitlines(keepends=True)
    lines = base_text.splitlines(keepends=True)
    for key in ("load_models", "models"):
        start, end = _property_lines("".join(lines), key)
        r_start, r_end = _property_lines("".join(rendered), key)
        lines[start:end] = rendered[r_start:r_end]
    return "".join(lines)


def current_pair() -> tuple[str, str, str]:
    """The model and versions the overlay's two manifests hold now."""
    stable = yaml.safe_load((OVERLAY / "stable" / "files" / "fleet.yaml").read_text())["models"]
    canary = yaml.safe_load((OVERLAY / "canary" / "files" / "fleet.yaml").read_text())["models"]
    differ = [m for m in stable if m in canary and stable[m]["versions"].keys() != canary[m]["versions"].keys()]
    if len(differ) != 1:
        raise SystemExit("the overlay's manifests do not differ in one model's version: name MODEL STABLE CANARY")
    model = differ[0]
    return model, str(next(iter(stable[model]["versions"]))), str(next(iter(canary[model]["versions"])))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    argv = [a for a in argv if a != "--check"]
    if len(argv) not in (0, 3):
        print(__doc__, file=sys.stderr)
        return 2
    model, stable, canary = argv if argv else current_pair()
    doc = yaml.safe_load((BASE / "fleet.yaml").read_text())
    fleet = parse_fleet(doc, ROOT)  # handler paths as the pods resolve them: beside the image's handlers/
    versions = fleet.models[model].versions if model in fleet.models else {}
    if stable == canary or stable not in versions or canary not in versions:
        print(f"{model} {stable} and {canary} must be two versions of one model of {BASE / 'fleet.yaml'}",
              file=sys.stderr)
        return 2
    base_properties = (BASE / "config.properties").read_text()
    stale = []
    for track, keep, drop in (("stable", stable, canary), ("canary", canary, stable)):
        manifest = track_manifest(doc, fleet, model, keep, drop)
        text = HEADER.format(track=track, model=model, dropped=drop) + yaml.safe_dump(manifest, sort_keys=False)
        # Checked as the pods will read it: from the image's folder, where the handlers are.
        track_fleet = parse_fleet(yaml.safe_load(text), ROOT)
        folder = OVERLAY / track / "files"
        for path, content in ((folder / "fleet.yaml", text),
                              (folder / "config.properties", track_properties(base_properties, track_fleet))):
            if check:
                if not path.is_file() or path.read_text() != content:
                    stale.append(str(path.relative_to(ROOT)))
                continue
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        if not check:
            print(f"k8s: wrote {folder.relative_to(ROOT)}/fleet.yaml and config.properties ({model} {keep})")
    if stale:
        print(f"k8s: stale: {', '.join(stale)}; run .venv/bin/python scripts/sync-k8s-gateway.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
