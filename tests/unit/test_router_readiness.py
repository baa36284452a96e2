"""Readiness by model without a server: which versions count, and one look per second.
The real management API and probes are in tests/integration/test_router_readiness.py."""
from __future__ import annotations

import asyncio
from pathlib import Path

from tsfleet.control.client import VersionState, Worker
from tsfleet.router.keys import InferenceKeys
from tsfleet.router.readiness import Look, ModelReadiness
from tsfleet.router.policy.routing import Route, RoutingTable


def version(model: str, v: str, ready: int, default: bool = False) -> VersionState:
    workers = tuple(Worker(str(i), 100 + i, "READY", "", 0) for i in range(ready))
    return VersionState(model, v, f"{model}-{v}.mar", default, 1, 5, 120, 1, 1,
                        workers or (Worker("9", None, "UNLOADING", "", 0),))


class Described(ModelReadiness):
    """Answers from ``seen`` instead of TorchServe, counting the looks."""

    def __init__(self, table: RoutingTable, seen: dict, tmp: Path, workflows: tuple[str, ...] = (),
                 registered: list[str] | str = ()):
        super().__init__(table, InferenceKeys("k", tmp / "key_file.json", "http://127.0.0.1:1"), workflows)
        self.seen, self.looks, self.registered = seen, 0, registered

    def _describe_all(self, models: list[str]) -> Look:
        self.looks += 1
        return Look({m: self.seen[m] for m in models if m in self.seen},
                    self.registered if isinstance(self.registered, str) else list(self.registered))


def test_the_versions_that_count_are_where_the_traffic_goes(tmp_path: Path) -> None:
    table = RoutingTable({"a": Route("a", "1.0", {"1.0": 90, "2.0": 10}),
                          "b": Route("b", "1.0", {"1.0": 0}),  # no weight anywhere: TorchServe's default serves
                          "c": Route("c", "1.0", {"1.0": 100}, aliases={"1.0": "1.0-stand-in"}),
                          "d": Route("d", "1.0", {"1.0": 100})})
    seen = {"a": [version("a", "1.0", 0), version("a", "2.0", 2)],
            "b": [version("b", "1.0", 0), version("b", "3.0", 1, default=True)],
            "c": [version("c", "1.0", 0), version("c", "1.0-stand-in", 1)]}
    found = asyncio.run(Described(table, seen, tmp_path).check(["a", "b", "c"]))
    # A baseline without workers: its requests are retried on the candidate, which has some.
    assert found.ready and found.versions == {"a": {"2.0": 2, "1.0": 0}, "b": {"3.0": 1}, "c": {"1.0-stand-in": 1}}

    found = asyncio.run(Described(table, seen, tmp_path).check(["a", "d"]))
    assert not found.ready and found.problems == ["d: not registered in TorchServe"]

    table.set_weights("a", {"1.0": 100, "2.0": 0})
    found = asyncio.run(Described(table, seen, tmp_path).check(["a"]))
    assert not found.ready and found.problems == ["a: no worker ready on 1.0 (0 ready)"]
    table.set_weights("a", {"4.0": 100}, baseline="4.0")
    found = asyncio.run(Described(table, seen, tmp_path).check(["a"]))
    assert found.problems == ["a: no worker ready on 4.0 (not registered)"]


def test_probes_share_one_look_a_second(tmp_path: Path) -> None:
    table = RoutingTable({"a": Route("a", "1.0", {"1.0": 100})})
    readiness = Described(table, {"a": [version("a", "1.0", 1)]}, tmp_path)

    async def main() -> None:
        answers = await asyncio.gather(*(readiness.check(["a"]) for _ in range(50)))
        assert all(a.ready for a in answers) and readiness.looks == 1
        await readiness.check(["a"])
        assert readiness.looks == 1
        # A model routed since (apply added it) is looked at now, not a second later.
        table.routes["b"] = Route("b", "1.0", {"1.0": 100})
        readiness.seen["b"] = [version("b", "1.0", 1)]
        assert (await readiness.check(["b"])).ready and readiness.looks == 2

    asyncio.run(main())


def test_a_router_without_torchserve_s_key_file_says_so() -> None:
    found = asyncio.run(ModelReadiness(RoutingTable({"a": Route("a", "1.0", {"1.0": 100})}), None).check(["a"]))
    assert not found.ready and "without TorchServe's key file (--key-file)" in found.problems[0]


def test_all_models_also_waits_for_the_manifest_s_workflows(tmp_path: Path) -> None:
    # up (and a pod's TorchServe container) registers workflows once every model has a worker:
    # a probe that asked about models alone passed while /wfpredict still answered 404.
    table = RoutingTable({"a": Route("a", "1.0", {"1.0": 100})})
    seen = {"a": [version("a", "1.0", 1)]}
    found = asyncio.run(Described(table, seen, tmp_path, ("flow",), []).check(["a"], workflows=True))
    assert not found.ready and found.problems == ["workflow flow: not registered in TorchServe"]
    assert found.workflows == {"flow": False}
    found = asyncio.run(Described(table, seen, tmp_path, ("flow",), ["flow", "other"]).check(["a"], workflows=True))
    assert found.ready and found.workflows == {"flow": True}
    found = asyncio.run(Described(table, seen, tmp_path, ("flow",), "listing them failed: 503").check(["a"], True))
    assert not found.ready and found.problems == ["workflows: listing them failed: 503"]
    # Models named one by one (a load balancer that needs a model, gRPC's health check): no workflows.
    found = asyncio.run(Described(table, seen, tmp_path, ("flow",), []).check(["a"]))
    assert found.ready and found.workflows is None
