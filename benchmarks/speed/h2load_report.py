"""The report's gRPC comparison: the project's own client and h2load on the same paths, at
the same concurrency levels (h2load.py, h2load_target.py), or why the h2load rows are missing."""
from __future__ import annotations

import statistics

from benchmarks.speed.loadgen import GRPC_CONNECTIONS

PATHS = (("direct", "grpc-direct", "grpc-direct-h2load"), ("through the router", "router-grpc", "router-grpc-h2load"))


def what_h2load_is(doc: dict) -> list[str]:
    """The paragraph under the report's header: what h2load is and why both are shown, or why
    it is missing (never left out in silence). Empty when the run had no gRPC rows."""
    info = doc.get("h2load")
    if not info:
        return []
    if info.get("missing"):
        return [f"**The h2load rows are missing in this run**: {info['missing']}. Every gRPC figure below rests "
                "on the project's own client alone.", ""]
    return [f"gRPC load also from **h2load** ({info['version']}; Debian's nghttp2-client, `make bench-tools`), "
            "the HTTP/2 benchmark of the nghttp2 library, beside the project's own client on the same gRPC paths, "
            "at the same concurrency levels, in the same interleaved windows, so that the gRPC figures do not rest "
            "on the project's client alone. h2load is C and one thread: where its rows are faster, the Python "
            "client (which shares the cores) was part of the bottleneck. It sends one fixed body, the 5-byte "
            "gRPC prefix and the serialized PredictionsRequest of each model's first request item (the project's "
            f"client cycles through the set), over the client's layout ({GRPC_CONNECTIONS} connections sharing the "
            "calls in flight). h2load counts every HTTP 200 as a success and a gRPC error is an HTTP 200 with its "
            "status in the trailers, so its rows are checked: before the first run the project's gRPC client "
            "sends the same message and must get status 0 and a prediction, and one h2load call must get the "
            "answer's bytes back; after each run the server's own counters (the router's /metrics, TorchServe's "
            "ts_inference_requests_total) must have counted every call h2load counted, the router no error, and "
            "the bytes received must add up to an answer per success. What these checks find is in the failed "
            "column.", ""]


def _runs(fig: dict) -> list[dict]:
    return [r.get("detail", {}) for r in fig.get("runs", [])]


def _h2load_cells(fig: dict) -> list[str]:
    details = _runs(fig)
    errors = sorted({d["error"] for d in details if d.get("error")})
    if errors:
        return ["measured nothing: " + "; ".join(e.replace("|", "/") for e in errors), "", "", str(fig["failed"])]
    tool = [d["h2load"] for d in details if d.get("h2load")]
    found = sum(d.get("grpc_errors", 0) for d in details)
    spread = (f"{statistics.median(t['mean_ms'] for t in tool):.1f} ±{statistics.median(t['sd_ms'] for t in tool):.1f}"
              f" / {max(t['max_ms'] for t in tool):.1f}") if tool else ""
    return [f"{fig['rps']:.0f}", f"{fig['p50_ms']:.1f} / {fig['p99_ms']:.1f}", spread,
            f"{fig['failed']}" + (f" ({found} by the checks)" if found else "")]


def comparison_table(entry: dict) -> list[str]:
    """One row per gRPC path and concurrency: the project's client beside h2load."""
    rows = []
    scenarios = entry.get("scenarios", {})
    for words, own_name, tool_name in PATHS:
        own_row, tool_row = scenarios.get(own_name), scenarios.get(tool_name)
        if not own_row or not tool_row:
            continue
        for c in sorted(own_row["by_concurrency"], key=int):
            own, tool = own_row["by_concurrency"][c], tool_row["by_concurrency"].get(c)
            if not tool:
                continue
            ratio = f"{tool['rps'] / own['rps']:.2f}" if own["rps"] and tool["rps"] else ""
            rows.append(f"| {words} | {c} | {own['rps']:.0f} | {own['p50_ms']:.1f} / {own['p99_ms']:.1f} | "
                        f"{own['failed']} | " + " | ".join(_h2load_cells(tool)) + f" | {ratio} |")
    if not rows:
        return []
    return ["gRPC from the project's client and from h2load (medians over runs; h2load's mean ± sd / max from its "
            "own summary):", "",
            "| gRPC path | clients | client req/s | client p50 / p99 ms | client failed | h2load req/s | "
            "h2load p50 / p99 ms | h2load mean ±sd / max ms | h2load failed | h2load / client |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
