"""The stage profile files py-spy's stacks by what the innermost known work is."""
from __future__ import annotations

from collections import Counter

from benchmarks.speed.stages import classify, parse_raw, per_request

WORKER = "run_server (ts/model_service_worker.py:200);handle_connection (ts/model_service_worker.py:180)"


def test_leaf_work_wins_over_the_loop_that_called_it() -> None:
    assert classify(WORKER + ";handle (handlers/base.py:90);encode_batch (handlers/minilm.py:40)") == "tokenize"
    assert classify(WORKER + ";handle (handlers/base.py:90);Linear.forward (torch/nn/modules/linear.py:134)") \
        == "model (torch)"
    assert classify(WORKER + ";retrieve_msg (ts/protocol/otf_message_handler.py:30)") == "framework: TorchServe worker"
    assert classify(WORKER + ";handle (handlers/base.py:90)") == "toolkit handler"
    assert classify("<module> (x.py:1);dumps (json/__init__.py:231)") == "answer encode"
    assert classify("run (asyncio/events.py:80);data_received (tsfleet/router/wire/http1.py:10)") \
        == "router: HTTP/1.1 and HTTP/2 wire"
    assert classify("run (mosec/worker.py:10);forward (mosec_app.py:30)") == "framework: mosec worker"
    assert classify("<module> (x.py:1)") == "other"


def test_raw_lines_sum_by_stage_and_share_the_cpu() -> None:
    text = (WORKER + ";Linear.forward (torch/nn/modules/linear.py:134) 30\n"
            + WORKER + " 10\n"
            "garbage without a count\n")
    counts = parse_raw(text)
    assert counts == Counter({"model (torch)": 30, "framework: TorchServe worker": 10})
    assert per_request(counts, 4.0) == {"model (torch)": 3.0, "framework: TorchServe worker": 1.0}
    assert per_request(Counter(), 4.0) == {}
