"""The load tools count a 200 that is not the model's answer as failed: a server on loopback
answers every third request with a wrong body (an embedding of 2 floats, one of 384 under
another key, an empty top 3, an error), and wrk and the Python generator must count exactly
those; right answers pass."""
from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from benchmarks.speed.loadgen import run_python, run_wrk, wrk_available
from benchmarks.speed.workload import answer_check

GOOD = {"text-embedder": json.dumps({"embedding": [0.125] * 384}).encode(),
        "image-classifier": json.dumps({"label": "circle", "score": 0.9, "top_k": [
            {"label": "circle", "score": 0.9}, {"label": "square", "score": 0.05},
            {"label": "triangle", "score": 0.05}]}).encode()}
BAD = {"text-embedder": [json.dumps({"embedding": [0.5, 0.25]}).encode(),
                         json.dumps({"vector": [0.125] * 384}).encode()],
       "image-classifier": [json.dumps({"label": "circle", "score": 0.9, "top_k": []}).encode(),
                            b'{"error": "label"}']}
needs_wrk = pytest.mark.skipif(not wrk_available(), reason="wrk is not installed (make bench-tools)")


@contextlib.contextmanager
def serving(model: str, wrong_every: int) -> Iterator[tuple[str, dict[str, int]]]:
    """Answers ``model``'s right answer, and every ``wrong_every``-th time (0: never) a wrong one."""
    served = {"good": 0, "bad": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                n = served["good"] + served["bad"] + 1
                wrong = bool(wrong_every) and n % wrong_every == 0
                served["bad" if wrong else "good"] += 1
            body = BAD[model][n % 2] if wrong else GOOD[model]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/predict", served
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("model", sorted(GOOD))
def test_python_generator_counts_every_wrong_answer(model: str) -> None:
    with serving(model, 3) as (url, served):
        sample = run_python(url, [b"{}"], {}, 2, 1.0, check=answer_check(model))
    assert served["bad"] > 0
    assert sample.requests == served["good"] + served["bad"]
    assert sample.failed == served["bad"]


@needs_wrk
@pytest.mark.parametrize("model", sorted(GOOD))
def test_wrk_counts_every_wrong_answer(model: str) -> None:
    with serving(model, 3) as (url, served):
        sample = run_wrk(url, [b"{}"], {}, 1, 1.0, check=answer_check(model))
    # One connection: wrk read every answer the server wrote except, at most, the last.
    assert served["bad"] > 0
    assert served["bad"] - 1 <= sample.failed <= served["bad"]
    assert served["good"] + served["bad"] - 1 <= sample.requests <= served["good"] + served["bad"]


@needs_wrk
def test_wrk_passes_right_answers_and_fails_another_models() -> None:
    with serving("text-embedder", 0) as (url, _):
        right = run_wrk(url, [b"{}"], {}, 2, 1.0, check=answer_check("text-embedder"))
        other = run_wrk(url, [b"{}"], {}, 2, 1.0, check=answer_check("image-classifier"))
    assert right.requests > 0 and right.failed == 0
    assert other.requests > 0 and other.failed == other.requests


def test_a_bf16_system_is_held_to_bf16_s_bound_and_an_fp32_one_to_fp32_s() -> None:
    from benchmarks.speed.peer_runs import BF16_MAX_DEVIATION, MAX_DEVIATION, check_answers
    from benchmarks.speed.workload import workload

    w = workload("text-embedder")
    with serving("text-embedder", 0) as (url, _):
        # Every answer is 384 x 0.125; a reference 2e-3 away is within bf16's bound, not fp32's.
        near = [{"embedding": [0.125 + 2e-3] * 384}] * len(w.bodies)
        assert check_answers(url, w, near, {}, BF16_MAX_DEVIATION) == pytest.approx(2e-3)
        with pytest.raises(RuntimeError, match=f"differ from the reference by 2.00e-03 \\(> {MAX_DEVIATION}\\)"):
            check_answers(url, w, near, {})
