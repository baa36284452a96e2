"""Batch isolation by construction, in process: whatever one request does while it is read,
turned into tensors or run through the model, only that request gets an error."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pytest
from ts.context import Context, RequestProcessor

from handlers.base import FleetHandler
from handlers.errors import BadInput
from handlers.payload import JsonLimits, Payload, as_json, extract

REPORTS = tempfile.mkdtemp(prefix="tsfleet-test-reports-")


class Fragile(FleetHandler):
    """Echoes numbers; each hook breaks on its own word, as a model with a bug would."""

    ACCEPTS = ("application/json", "")

    def load(self, model_dir: Path) -> None:
        self.batches: list[int] = []

    def decode(self, payload: Payload) -> Any:
        doc = payload.json()
        if doc == "decode":
            return {}["no such key"]  # a bug in reading: KeyError
        return doc

    def preprocess(self, items: list[Any]) -> list[Any]:
        if "preprocess" in items:
            raise ValueError("cannot convert")
        return items

    def inference(self, batch: list[Any]) -> list[Any]:
        self.batches.append(len(batch))
        if "inference" in batch:
            raise RuntimeError("shape mismatch in layer 3")
        return [x * 2 if isinstance(x, int) else x for x in batch]

    def postprocess(self, output: list[Any], items: list[Any]) -> list[Any]:
        return [{"out": x} for x in output]


def make(cls: type[FleetHandler] = Fragile) -> tuple[FleetHandler, Context]:
    ctx = Context("fragile", ".", {"model": {"modelVersion": "2.0"}}, 8, None, "0.12.0",
                  model_yaml_config={"handler": {"warmup_batch_sizes": [1], "report_dir": REPORTS}})
    handler = cls()
    handler.initialize(ctx)
    return handler, ctx


def send(handler: FleetHandler, ctx: Context, bodies: list[bytes], ctype: str = "application/json") -> list[tuple[int, Any]]:
    ctx.request_processor = [RequestProcessor({"body": {"content-type": ctype}}) for _ in bodies]
    out = handler.handle([{"body": body} for body in bodies], ctx)
    return [(ctx.get_response_status(i)[0], json.loads(raw)) for i, raw in enumerate(out)]


@pytest.mark.parametrize("word,status,words", [
    ("decode", 400, "could not be read (KeyError"),
    ("preprocess", 400, "could not be read (ValueError: cannot convert)"),
    ("inference", 500, "prediction failed for this request (RuntimeError)"),
])
def test_a_request_that_breaks_a_hook_fails_alone(word: str, status: int, words: str) -> None:
    handler, ctx = make()
    bodies = [b"1", b"2", b"3", json.dumps(word).encode(), b"5", b"6", b"7"]
    results = send(handler, ctx, bodies)
    assert [code for code, _ in results] == [200, 200, 200, status, 200, 200, 200]
    assert [doc["out"] for code, doc in results if code == 200] == [2, 4, 6, 10, 12, 14]
    assert results[3][1]["code"] == status
    assert results[3][1]["message"].startswith("fragile 2.0: ") and words in results[3][1]["message"], results[3]


def test_a_failed_forward_pass_is_retried_in_halves_not_item_by_item() -> None:
    handler, ctx = make()
    handler.batches.clear()
    send(handler, ctx, [b"1", b"2", b"3", b'"inference"', b"5", b"6", b"7", b"8"])
    # 8 fails; its first half (4) fails, whose halves are 2 (answered) and 2 (fails), then
    # 1 + 1; the second half of 8 (4) is answered: 7 runs, the cost growing as log2 of the batch.
    assert handler.batches == [8, 4, 2, 2, 1, 1, 4]


class Miscounting(Fragile):
    """A postprocess that drops the last answer of every batch: a handler bug, not a request's."""

    def postprocess(self, output: list[Any], items: list[Any]) -> list[Any]:
        return super().postprocess(output, items)[:-1]


def test_a_postprocess_that_miscounts_is_a_500_per_request_naming_the_fault() -> None:
    handler = Miscounting()
    ctx = Context("fragile", ".", {"model": {"modelVersion": "2.0"}}, 8, None, "0.12.0",
                  model_yaml_config={"handler": {"warmup_batch_sizes": [], "report_dir": REPORTS}})
    handler.initialize(ctx)
    results = send(handler, ctx, [b"1", b"2", b"3"])
    assert results == [(500, {"code": 500, "type": "InternalServerError", "message": (
        "fragile 2.0: the handler's postprocess gave 0 answers for this one request; it must give one per "
        "request (a fault of the handler, not of the request)")})] * 3


def test_answers_survive_bookkeeping_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    handler, ctx = make()

    def disk_full(n: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(handler.lifecycle, "after_batch", disk_full)
    assert [code for code, _ in send(handler, ctx, [b"1", b"2"])] == [200, 200]


def test_client_errors_log_one_line_and_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    handler, ctx = make()
    with caplog.at_level(logging.WARNING):
        send(handler, ctx, [b'"decode"', b'[' * 5000, b"9" * 5000])
    assert not any(r.exc_info for r in caplog.records)
    assert [r.getMessage() for r in caplog.records] == [
        "fragile 2.0: request answered 400: KeyError was not foreseen while reading it"]


def test_a_model_fault_alone_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    handler, ctx = make()
    with caplog.at_level(logging.WARNING):
        send(handler, ctx, [b'"inference"'])
    faults = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(faults) == 1 and faults[0].exc_info and "inference failed for one request" in faults[0].getMessage()


def test_media_types_outside_accepts_are_415_naming_what_is_accepted() -> None:
    handler, ctx = make()
    (code, doc), = send(handler, ctx, [b"1"], ctype="text/csv")
    assert code == 415 and doc["message"] == (
        "fragile 2.0: content type 'text/csv' is not accepted; send one of: application/json, none")
    assert send(handler, ctx, [b"1"], ctype="application/problem+json")[0][0] == 200
    assert send(handler, ctx, [b"1"], ctype="")[0][0] == 200


LIMITS = JsonLimits(max_depth=3, max_number_chars=5)


@pytest.mark.parametrize("body,message", [
    (b"[[[1]]]", None),
    (b"[[[[1]]]]", "JSON nested deeper than 3 levels"),
    (b'{"a": {"b": {"c": {}}}}', "JSON nested deeper than 3 levels"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested deeper than 3 levels"),  # past the parser's own limit
    (b"[12345, -1234, 1.5e3]", None),
    (b"[123456]", "a number in the JSON has 6 characters; the limit is 5"),
    (b"[1.25e7]", "a number in the JSON has 6 characters; the limit is 5"),
    (b"9" * 100_000, "a number in the JSON has 100000 characters; the limit is 5"),  # past int's own limit
    (b"[1e999]", "a number in the JSON is out of range"),
    (b"[NaN]", "NaN is not a JSON value"),
    (b"[-Infinity]", "-Infinity is not a JSON value"),
    (b'"\xff"', "body is not valid UTF-8 (byte 1)"),
    (b'{"a": 1', "malformed JSON: Expecting ',' delimiter"),
])
def test_json_limits(body: bytes, message: str | None) -> None:
    if message is None:
        as_json(body, LIMITS)
    else:
        with pytest.raises(BadInput) as err:
            as_json(body, LIMITS)
        assert err.value.message.startswith(message), err.value.message


@pytest.mark.parametrize("doc,message", [
    ([[[[1]]]], "JSON nested deeper than 3 levels"),
    ([10**5], "a number in the JSON has more than 5 digits"),
    ([float("inf")], "a number in the JSON is out of range"),
    ({"a": [True, None, 99999, "x" * 100]}, None),
])
def test_json_that_torchserve_parsed_is_held_to_the_same_limits(doc: Any, message: str | None) -> None:
    payload = extract({"body": doc}, {"body": {"content-type": "application/json"}}, LIMITS)
    if message is None:
        assert payload.json() == doc
    else:
        with pytest.raises(BadInput, match=message):
            payload.json()


def test_the_fleet_config_makes_workers_hand_over_raw_bytes() -> None:
    text = (Path(__file__).resolve().parents[2] / "config.properties").read_text()
    assert "decode_input_request=false" in text.splitlines()


def test_the_input_limits_doc_is_the_table_the_handlers_state() -> None:
    from handlers.limits import MODELS, table
    from tsfleet.manifest import load_fleet

    root = Path(__file__).resolve().parents[2]
    assert sorted(MODELS) == sorted(load_fleet(root / "fleet.yaml").models)
    assert table() in (root / "docs" / "input-limits.md").read_text()


def test_torchserve_s_own_decoding_tracebacks_are_dropped_where_it_still_decodes(caplog: pytest.LogCaptureFixture) -> None:
    # A TorchServe left at decode_input_request=true logs a traceback per unreadable body.
    from handlers.runtime import quiet_bad_input_logs

    quiet_bad_input_logs()
    root = logging.getLogger()
    with caplog.at_level(logging.WARNING):
        for line in ("Failed json decoding of input data. Forwarding encoded payload",
                     "Failed utf-8 decoding of input data. Forwarding encoded payload", "something else"):
            record = root.makeRecord("root", logging.WARNING, __file__, 1, line, (), None)
            if root.filter(record):
                root.handle(record)
    assert [r.getMessage() for r in caplog.records] == ["something else"]
