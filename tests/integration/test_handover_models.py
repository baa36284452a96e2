"""The fleet's real models keep answering right while a worker's process is replaced under
concurrent load (handlers/handover.py): the fresh process loads the same archive, and no
request is lost or answered by a half-ready model."""
from __future__ import annotations

import io
import random
import threading
import time
from typing import Callable

import pytest

from handlers.shapes import LABELS, draw_shape
from tests.integration.conftest import ROOT
from tests.precision import tolerance
from tsfleet.manifest import Fleet, load_fleet
from tsfleet.control.recycle import Recycler, read_reports

pytestmark = pytest.mark.slow
TEXTS = ("How do I reset my password?", "The volcano erupted and covered the village in ash.",
         "Where is my parcel?", "Cancel my subscription, please.")


def png(i: int) -> bytes:
    buf = io.BytesIO()
    draw_shape(LABELS[i % len(LABELS)], random.Random(i)).resize((200, 150)).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [png(i) for i in range(8)]


def text_request(client, i: int) -> tuple[int, dict | str]:
    resp = client.predict("text-embedder", {"text": TEXTS[i % len(TEXTS)]})
    return i % len(TEXTS), resp.json() if resp.status_code == 200 else f"{resp.status_code} {resp.text}"


def image_request(client, i: int) -> tuple[int, dict | str]:
    resp = client.predict("image-classifier", IMAGES[i % len(IMAGES)], content_type="image/png")
    return i % len(IMAGES), resp.json() if resp.status_code == 200 else f"{resp.status_code} {resp.text}"


# An answer before and after a handover, perhaps batched otherwise: bf16's bound where the fleet
# runs text-embedder in bf16 on this CPU.
EMBEDDING_TOLERANCE = tolerance(load_fleet(ROOT / "fleet.yaml"), "text-embedder", 1e-3)


def same(a: dict, b: dict) -> bool:
    if "embedding" in a:
        return max(abs(x - y) for x, y in zip(a["embedding"], b["embedding"])) < EMBEDDING_TOLERANCE
    return a["label"] == b["label"] and all(abs(x["score"] - y["score"]) < 1e-3 for x, y in zip(a["top_k"], b["top_k"]))


def worker_pids(server, model: str) -> list[int]:
    return [w.pid for v in server.client.describe(model) if v.version == "1.0" for w in v.workers]


@pytest.mark.parametrize("model,call", [("text-embedder", text_request), ("image-classifier", image_request)])
def test_answers_stay_right_while_a_worker_is_replaced(server, client, fleet: Fleet, model: str,
                                                       call: Callable) -> None:
    spec = next(s for s in fleet.versions() if s.model == model and s.version == "1.0")
    slot, *others = worker_pids(server, model)  # fleet.yaml ships two: one is replaced, one serves on
    before = read_reports(server.report_dir, model, "1.0")[slot].process
    expected = dict(call(client, i) for i in range(8))  # from the process serving now
    assert not any(isinstance(a, str) for a in expected.values()), expected
    results: list[tuple] = []
    done = threading.Event()

    def load(n: int) -> None:
        own, i = client.__class__(server, fleet), n
        while not done.is_set():
            results.append(call(own, i))
            i += 4

    clients = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for c in clients:
        c.start()
    try:
        event = Recycler(fleet, server.client, server.report_dir, progress=lambda line: None,
                         ready_timeout_s=240).replace(spec, slot, "test: replace under load")
        after, deadline = len(results), time.monotonic() + 60
        while len(results) < after + 20 and all(c.is_alive() for c in clients) and time.monotonic() < deadline:
            done.wait(0.05)  # some answers from the fresh process too
    finally:
        done.set()
        for c in clients:
            c.join()
    assert event.ok, event
    assert sorted(worker_pids(server, model)) == sorted([slot, *others])
    assert read_reports(server.report_dir, model, "1.0")[slot].process != before
    wrong = [(key, answer) for key, answer in results if isinstance(answer, str) or not same(answer, expected[key])]
    assert wrong == [], wrong[:3]
