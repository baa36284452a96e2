"""A worker's process replaced in place (handlers/handover.py), on a real TorchServe: what
TorchServe sees of a replaced worker, and what happens when one of its processes dies."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import requests

from tests.fixtures.leaky_handler import FAIL_SUCCESSOR
from tests.integration.leaky_server import LEAK_MB, Load, leaky, leaky_fleet  # noqa: F401 (fixture)
from tests.polling import wait_for
from tsfleet.control.recycle import Event, Recycler, read_reports
from tsfleet.control.server import TorchServe
from tsfleet.control.status import collect

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ready_pids(ts: TorchServe) -> list[int]:
    return [w.pid for w in ts.client.describe("leaky")[0].workers if w.status == "READY" and w.pid]


def replace(ts: TorchServe, reports: Path, slot: int) -> Event:
    fleet = leaky_fleet(reports)
    recycler = Recycler(fleet, ts.client, reports, progress=lambda line: None, ready_timeout_s=120)
    return recycler.replace(next(iter(fleet.versions())), slot, "test: replace now")


def serving(reports: Path, slot: int) -> int:
    return read_reports(reports, "leaky", "1.0")[slot].process


def answer(ts: TorchServe) -> dict:
    resp = requests.post(ts.ep.url("inference") + "/predictions/leaky", data=b'{"i": 1}', timeout=60,
                         headers={**ts.keys.header("inference"), "Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def answer_pid(ts: TorchServe) -> int:
    return answer(ts)["pid"]


def test_a_replaced_worker_keeps_its_pid_and_slot_and_frees_its_memory(leaky) -> None:
    ts, reports = leaky
    [slot] = ready_pids(ts)
    Load(ts, n=150, per_s=100).run()  # 2 MB kept per request
    before = rss_mb(serving(reports, slot))
    replaced = threading.Event()
    load = Load(ts, n=50, per_s=50)
    load.more = lambda: not replaced.is_set()  # requests go on until the handover is done
    client = threading.Thread(target=load.run)
    client.start()
    event = replace(ts, reports, slot)
    replaced.set()
    client.join()
    assert event.ok, event
    assert [code for code, _ in load.results if code != 200] == []
    assert ready_pids(ts) == [slot]  # TorchServe still sees the same, ready worker
    state = ts.client.describe("leaky")[0]
    assert state.min_workers == state.max_workers == 1
    fresh = serving(reports, slot)
    assert fresh != slot and alive(fresh)
    # The leak went with the old process: the fresh one holds only what it served itself.
    served = sum(pid == fresh for _, pid in load.results)
    last = answer(ts)
    assert last["pid"] == fresh and last["leaked_kb"] == (served + 1) * LEAK_MB * 1024, (last, served)
    assert rss_mb(fresh) < before - 200, (rss_mb(fresh), before, served)
    assert rss_mb(slot) < 100  # the slot process only waits on its successors now
    # `tsfleet status` shows the serving process's memory, not the waiter's.
    [worker] = next(r for r in collect(leaky_fleet(reports), ts.client, reports)["models"])["workers"]
    assert (worker["pid"], worker["process"]) == (slot, fresh) and worker["rss_mb"] > 150, worker


def replaced_worker(ts: TorchServe, reports: Path) -> tuple[int, int]:
    """Replace the one worker's process: (the slot pid TorchServe shows, the serving process)."""
    [slot] = ready_pids(ts)
    assert replace(ts, reports, slot).ok
    return slot, serving(reports, slot)


def test_killing_the_serving_process_restarts_the_slot(leaky) -> None:
    ts, reports = leaky
    slot, fresh = replaced_worker(ts, reports)
    os.kill(fresh, signal.SIGKILL)
    # TorchServe sees its worker die, as without a handover, and starts the slot afresh.
    wait_for("the slot restarted", lambda: ready_pids(ts) not in ([], [slot]))
    assert not alive(slot)
    assert answer_pid(ts) == ready_pids(ts)[0]


def test_killing_the_slot_process_takes_its_successor_down(leaky) -> None:
    ts, reports = leaky
    slot, fresh = replaced_worker(ts, reports)
    os.kill(slot, signal.SIGKILL)
    wait_for("the serving process exiting", lambda: not alive(fresh), timeout=10)
    wait_for("the slot restarted", lambda: ready_pids(ts) not in ([], [slot]))
    assert answer_pid(ts) == ready_pids(ts)[0]


def test_a_successor_that_cannot_load_leaves_the_old_process_serving(leaky) -> None:
    ts, reports = leaky
    [slot] = ready_pids(ts)
    old = serving(reports, slot)
    marker = reports / FAIL_SUCCESSOR
    marker.touch()
    load = Load(ts, n=150, per_s=50)
    client = threading.Thread(target=load.run)
    client.start()
    try:
        event = replace(ts, reports, slot)
    finally:
        marker.unlink()
        client.join()
    assert not event.ok and "failed to load the model" in event.detail, event
    assert [code for code, _ in load.results if code != 200] == []
    assert ready_pids(ts) == [slot] and serving(reports, slot) == old and answer_pid(ts) == old
    assert replace(ts, reports, slot).ok  # and the next try, once the cause is gone, works
    assert serving(reports, slot) != old


def test_scaling_down_a_replaced_worker_leaves_no_process_behind(leaky) -> None:
    ts, reports = leaky
    ts.client.scale("leaky", "1.0", 2)
    try:
        wait_for("two ready workers", lambda: len(ready_pids(ts)) == 2)
        slots = ready_pids(ts)
        for slot in slots:
            assert replace(ts, reports, slot).ok
        processes = {slot: serving(reports, slot) for slot in slots}
    finally:
        ts.client.scale("leaky", "1.0", 1)
    [kept] = ready_pids(ts)
    gone = [pid for slot, fresh in processes.items() if slot != kept for pid in (slot, fresh)]
    wait_for("the removed worker's processes exiting", lambda: not any(alive(pid) for pid in gone), timeout=20)
    assert answer_pid(ts) == processes[kept]
