"""The TorchServe fleets the benchmark serves: manifests written from the repo's fleet.yaml
with the serving and handler settings of each scenario, archives built by the toolkit's own
Builder, servers on free ports, peak RSS of their processes, and the cold start of the
repo's real fleet."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import requests
import yaml

from tsfleet.build.archive import Builder
from tsfleet.manifest import Fleet, load_fleet, parse_fleet
from tsfleet.build.recipes import RECIPES, ensure
from tsfleet.control.server import TorchServe

from benchmarks.speed.limit import peak_rss_mb
from benchmarks.speed.workload import ARTIFACTS, ROOT, deviation

MINIMAL = {"text-embedder": "benchmarks/speed/minimal_text.py",
           "image-classifier": "benchmarks/speed/minimal_image.py"}


@dataclass(frozen=True)
class Serve:
    """TorchServe batching and the worker layout of one configuration."""

    batch_size: int
    delay_ms: int
    workers: int
    threads: int

    def label(self) -> str:
        return f"batch {self.batch_size} / {self.delay_ms} ms, {self.workers} x {self.threads} thread"

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "max_batch_delay_ms": self.delay_ms,
                "workers": self.workers, "torch_threads": self.threads}


@dataclass(frozen=True)
class Variant:
    """One served version: model, version, config, extra handler settings, handler file."""

    model: str
    version: str
    serve: Serve
    settings: tuple[tuple[str, object], ...] = ()
    minimal: bool = False

    @property
    def name(self) -> str:
        return f"minimal-{self.model}" if self.minimal else self.model

    def path(self) -> str:
        return f"/predictions/{self.name}/{self.version}"


def ensure_artifacts(models: list[str]) -> None:
    """Make sure the repo's recipe outputs for ``models`` exist (``make build`` leaves them in build/)."""
    real = load_fleet(ROOT / "fleet.yaml")
    for model in models:
        spec = real.models[model].versions["1.0"]
        ensure(RECIPES[spec.recipe], spec.params, ARTIFACTS / f"{model}-1.0", lambda line: None, ARTIFACTS)


def manifest(variants: list[Variant]) -> dict:
    """fleet.yaml for ``variants``: each model's entry from the repo's manifest, new versions."""
    real = yaml.safe_load((ROOT / "fleet.yaml").read_text())
    doc = {"defaults": copy.deepcopy(real["defaults"]), "models": {}, "workflows": {}}
    for v in variants:
        base = real["models"][v.model]
        entry = doc["models"].setdefault(v.name, {
            # A minimal handler takes none of the toolkit handler's options (top_k...).
            **{k: copy.deepcopy(base[k]) for k in base
               if k not in ("versions", "default_version") and not (v.minimal and k == "settings")},
            "default_version": v.version, "versions": {}})
        # Absolute: the router reads this manifest from the work dir, not the repo.
        entry["handler"] = str(ROOT / (MINIMAL[v.model] if v.minimal else base["handler"]))
        # fp32 eager unless the variant says otherwise: the tuned rows are the matched-precision
        # ones, whatever precision the repo's fleet.yaml ships a model with.
        settings = {"torch_threads": v.serve.threads, "warmup_batch_sizes": sorted({1, v.serve.batch_size}),
                    "amp_cpu": "off", "compile": False, **dict(v.settings)}
        entry["versions"][v.version] = {
            **copy.deepcopy(base["versions"]["1.0"]),
            "serving": {"batch_size": v.serve.batch_size, "max_batch_delay_ms": v.serve.delay_ms,
                        "workers": v.serve.workers},
            "settings": {} if v.minimal else settings,
        }
    return doc


def build(variants: list[Variant], work: Path) -> tuple[Fleet, Path, Path]:
    """Archives for ``variants`` in ``work/store``; recipe outputs are the repo's, linked."""
    cache = work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for v in variants:
        link = cache / f"{v.name}-{v.version}"
        if not link.exists():
            # The recipe's stamp travels with the link, so no model is exported or trained again.
            link.symlink_to(ARTIFACTS / f"{v.model}-1.0", target_is_directory=True)
    doc = manifest(variants)
    path = work / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    fleet = parse_fleet(doc, ROOT)
    Builder(fleet, work / "store", cache, progress=lambda line: None).build_all()
    return fleet, work / "store", path


@contextlib.contextmanager
def serving(fleet: Fleet, store: Path, workdir: Path, timeout: float = 600) -> Iterator[tuple[TorchServe, float]]:
    """A started, ready TorchServe for ``fleet`` (and seconds it took); always stopped after."""
    ts = TorchServe.isolated(fleet, store, workdir)
    started = time.monotonic()
    try:
        ts.start(snapshots=False)
        ts.wait_ready(fleet, timeout=timeout, progress=lambda line: None)
        yield ts, time.monotonic() - started
    finally:
        ts.stop()


def frontend_pid(ts: TorchServe) -> int | None:
    try:
        return int((ts.workdir / "tmp" / ".model_server.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def worker_pids(ts: TorchServe) -> list[int]:
    """The pids of every model worker TorchServe lists now."""
    return [w.pid for vs in ts.client.state().values() for v in vs for w in v.workers if w.pid]


def one_worker_per_cpu_of_half(tuned: dict[str, Serve]) -> dict[str, Serve]:
    """--split-cores: one worker per CPU of the workers' half; two on one core take turns
    and thrash its cache."""
    return {m: replace(s, workers=max(1, len(os.sched_getaffinity(0)) // 2)) for m, s in tuned.items()}


def worker_rss(ts: TorchServe, model: str, version: str) -> list[float]:
    """Peak RSS (MiB) of each worker process of one version."""
    states = [s for s in ts.client.describe(model) if s.version == version]
    return [round(peak_rss_mb(w.pid), 1) for s in states for w in s.workers if w.pid]


def frontend_rss(ts: TorchServe) -> float:
    pid = frontend_pid(ts)
    return round(peak_rss_mb(pid), 1) if pid else 0.0


def cold_start(work: Path, bodies: dict[str, tuple[bytes, str]], samples: int = 100) -> dict:
    """The repo's fleet from its built archives (model_store/) to ready, as ``make up`` does
    (workflow registered too), then each model's first request against its warm p99."""
    fleet = load_fleet(ROOT / "fleet.yaml")
    out: dict = {"fleet_workers": fleet.total_workers(), "models": {}}
    with serving(fleet, ROOT / "model_store", work / "cold") as (ts, ready_s):
        registering = time.monotonic()
        ts.register_workflows(fleet)
        ts.warm_up(fleet)  # as `make up` does before it says the fleet is ready
        out["ready_s"] = round(ready_s, 2)
        out["with_workflow_s"] = round(ready_s + time.monotonic() - registering, 2)
        session = requests.Session()
        for model, (body, ctype) in bodies.items():
            headers = {**ts.keys.header("inference"), "Content-Type": ctype}
            url = ts.ep.url("inference") + f"/predictions/{model}"
            lat = []
            for _ in range(samples + 1):
                t0 = time.perf_counter()
                resp = session.post(url, data=body, headers=headers, timeout=60)
                lat.append((time.perf_counter() - t0) * 1000)
                if resp.status_code != 200:
                    raise RuntimeError(f"{model} answered {resp.status_code} after start: {resp.text[:200]}")
            warm = sorted(lat[1:])
            out["models"][model] = {"first_ms": round(lat[0], 2), "p50_ms": round(warm[len(warm) // 2], 2),
                                    "p99_ms": round(warm[min(len(warm) - 1, int(0.99 * len(warm)))], 2)}
        out["frontend_rss_mb"] = frontend_rss(ts)
    return out


def answers_deviation(url_a: str, url_b: str, bodies: list[bytes], headers: dict[str, str]) -> float:
    """Largest difference between two servers' answers to the same requests (workload.deviation:
    embedding components, or class scores by label; another top label counts as 1.0)."""
    worst = 0.0
    session = requests.Session()
    for body in bodies:
        a, b = (session.post(u, data=body, headers=headers, timeout=60) for u in (url_a, url_b))
        if a.status_code != 200 or b.status_code != 200:
            raise RuntimeError(f"deviation check: {a.status_code} / {b.status_code}")
        worst = max(worst, deviation(json.loads(b.content), json.loads(a.content)))
    return worst
