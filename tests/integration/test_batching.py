"""Concurrent requests are really batched, and a bad item never fails its batch-mates."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

GOOD = [f"sentence number {i} about booking a flight to Paris" for i in range(48)]


def test_concurrent_requests_are_served_in_batches(client) -> None:
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda t: client.predict("text-embedder", {"text": t}), GOOD))
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert max(sizes) > 1, sizes
    # The handler's own metric agrees: batches of more than one request were counted.
    counted = re.findall(r'HandlerBatches\{[^}]*BatchSize="(\d+)"[^}]*ModelName="text-embedder"[^}]*\} (\S+)',
                         client.metrics())
    assert any(int(size) > 1 and float(n) > 0 for size, n in counted), counted


def test_mixed_batch_answers_each_item_on_its_own(client) -> None:
    bodies = []
    for i in range(64):
        bodies.append({"text": f"book a train to Berlin, request {i}"} if i % 4 else {"txt": "bad"})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: client.predict("intent-classifier", b), bodies))
    shared = 0
    for body, resp in zip(bodies, responses):
        if "text" in body:
            assert resp.status_code == 200, resp.text
            assert resp.json()["intent"] == "travel"
        else:
            assert resp.status_code == 400, resp.text
            assert "unknown field(s) 'txt'" in resp.json()["message"]
            shared += int(resp.headers["X-Batch-Size"]) > 1
    assert shared > 0, "no bad item shared a batch with good ones"
