"""The soak's figures from what it recorded, its checks, and its tables (stdout and docs/soak.md)."""
from __future__ import annotations

import ipaddress
from collections import Counter

from benchmarks.soak.load import Record, Target
from benchmarks.soak.memory import MIN_SPAN_S, SETTLE_S, Sampler, fit

WINDOW_S = 5.0  # per-window figures: one window per memory sample


def pct(latencies: list[float], q: float) -> float | None:
    """The q-quantile of latencies (s), in ms; None for none."""
    if not latencies:
        return None
    lat = sorted(latencies)
    return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)


def _figures(records: list[Record], seconds: float) -> dict:
    lat = [r[1] for r in records]
    failed = sum(1 for r in records if r[3])
    return {"requests": len(records), "failed": failed, "rps": round(len(records) / seconds, 1) if seconds else 0.0,
            "p50_ms": pct(lat, 0.50), "p99_ms": pct(lat, 0.99)}


def requests_part(records: list[Record], targets: list[Target], seconds: float) -> dict:
    by_target: dict[int, list[Record]] = {}
    by_model: dict[str, list[Record]] = {}
    for r in records:
        by_target.setdefault(r[2], []).append(r)
        by_model.setdefault(targets[r[2]].model, []).append(r)
    windows: dict[int, list[Record]] = {}
    last = max(0, int(seconds // WINDOW_S) - 1)  # answers that came after the end join the last window
    for r in records:
        windows.setdefault(min(int(r[0] // WINDOW_S), last), []).append(r)
    return {
        "totals": {**_figures(records, seconds), "failures_by_kind": dict(Counter(r[3] for r in records if r[3]))},
        "paths": [{"path": t.name, **_figures(by_target.get(i, []), seconds)} for i, t in enumerate(targets)],
        "models": {m: _figures(rs, seconds) for m, rs in sorted(by_model.items())},
        "windows": [{"t": round((w + 1) * WINDOW_S, 1), **_figures(rs, WINDOW_S)} for w, rs in sorted(windows.items())],
    }


def canary_part(records: list[Record], targets: list[Target], events: list[dict], model: str) -> dict:
    """Which versions answered the canaried model's clients while the canary was on."""
    changes = [e["t"] for e in events if e["what"] == "weight change"]
    if not changes:
        return {}
    start, end = changes[0], (changes[1] if len(changes) > 1 else float("inf"))
    answered = Counter(r[4] or "?" for r in records if targets[r[2]].model == model and start <= r[0] < end)
    return {"model": model, "from_s": start, "to_s": None if end == float("inf") else end,
            "answered_by_version": dict(sorted(answered.items()))}


def memory_part(sampler: Sampler, warmup_end: float, max_slope: float,
                events: list[dict], recycles: list[dict]) -> list[dict]:
    """One row per series, with a note on how it began and ended (the kill, a recycle)."""
    kills = [e for e in events if e["what"] == "kill -9" and e.get("pid")]
    last_t = max((s.samples[-1][0] for s in sampler.series.values()), default=0.0)
    rows = []
    for s in sorted(sampler.series.values(), key=lambda s: (s.kind != "frontend", s.kind, s.label, s.samples[0][0])):
        row = fit(s, warmup_end, max_slope)
        row["samples"] = [[round(t, 1), round(m, 1)] for t, m in s.samples]
        slot = int(s.label.rsplit("slot ", 1)[1].rstrip(")")) if "(slot " in s.label else None
        ended = s.samples[-1][0] < last_t - 1
        note = []
        if s.role == "waiter":
            note.append(f"the slot's waiter from {row['first_s']:.0f} s (its serving process was replaced)")
        elif s.kind == "worker" and s.samples[0][0] > warmup_end:
            note.append(f"started at {row['first_s']:.0f} s (fitted from {SETTLE_S:.0f} s later)")
        kill = next((e for e in kills if e["pid"] == s.pid or (s.role == "waiter" and e.get("slot") == slot)), None)
        recycled = next((r["t"] for r in recycles if r["pid"] == slot and row["last_s"] - 5 <= r["t"] <= row["last_s"] + 20),
                        None)
        if ended and kill is not None:
            note.append(f"killed by the soak at {kill['t']:.0f} s" if kill["pid"] == s.pid else
                        f"exited with its serving process, killed at {kill['t']:.0f} s")
        elif ended and s.role != "waiter" and recycled is not None:
            note.append(f"replaced by the recycler at {recycled:.0f} s: a new series follows")
        elif ended:
            note.append(f"gone after {row['last_s']:.0f} s")
        elif s.role == "successor":
            note.append("still loading its replacement at the end")
        if "heap_start_mib" in row:
            note.append(f"judged on its RSS outside the committed Java heap: {row['judged_slope_mib_per_min']:+.2f} "
                        f"MiB/min; the heap committed {row['heap_start_mib']:.0f} -> {row['heap_end_mib']:.0f} MiB "
                        f"({row['heap_slope_mib_per_min']:+.2f} MiB/min)")
        row["note"] = "; ".join(note)
        rows.append(row)
    return rows


def loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, written as IPv4, IPv6, or IPv4 mapped into IPv6 (the JVM's way)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def checks(doc: dict, max_slope: float) -> list[dict]:
    """The gate: what must hold for the soak to pass."""
    totals = doc["totals"]
    out = [{"check": "no request failed", "ok": totals["failed"] == 0 and totals["requests"] > 0,
            "detail": f"{totals['failed']:,} of {totals['requests']:,} failed"
                      + (f": {totals['failures_by_kind']}" if totals["failed"] else "")}]
    judged = [p for p in doc["processes"] if p["judged"]]
    over = [f"{p['name']}: {p['judged_on']} {p['judged_slope_mib_per_min']:+.2f} MiB/min" for p in judged if not p["ok"]]
    # A run too short to judge any series passes this check and says so: the gate is the
    # 10-minute run; short runs (the CI smoke) check the rest.
    # The JVM's own warm-up (memory.JVM_WARMUP_S) outlasts a short run: said in the check,
    # so that a pass does not read as the JVM judged flat.
    jvm = [p for p in doc["processes"] if p.get("kind") == "frontend" and not p["judged"]]
    unjudged_jvm = f"; TorchServe's JVM not judged: {jvm[0]['why_not_judged']}" if jvm else ""
    out.append({"check": f"memory flat (slope at most {max_slope:g} MiB/min after the warm-up)",
                "ok": not over,
                "detail": "; ".join(over) if over else (f"{len(judged)} process series judged, "
                                                       f"{len(doc['processes']) - len(judged)} too short to judge "
                                                       f"(under {MIN_SPAN_S:.0f} s of samples)" if judged else
                                                       "not judged: no series has 60 s of samples after its warm-up; run for 2 minutes or more")
                          + unjudged_jvm})
    done = [r for r in doc["recycles"] if r["ok"] and 0 <= r["t"]]
    failed = [r for r in doc["recycles"] if not r["ok"]]
    out.append({"check": "recycling: at least one worker replaced under load, none failed",
                "ok": bool(done) and not failed,
                "detail": f"{len(done)} replaced" + (f", {len(failed)} failed: {failed[0]['detail']}" if failed else "")})
    kills = [e for e in doc["events"] if e["what"] == "kill -9" and e.get("pid")]
    out.append({"check": "a worker killed (kill -9) and started again",
                "ok": bool(kills) and all("back_after_s" in e for e in kills),
                "detail": "; ".join(f"{e['detail']}, ready again after {e.get('back_after_s', 'no restart seen')} s"
                                    for e in kills) or "no kill happened"})
    changes = [e for e in doc["events"] if e["what"] == "weight change"]
    out.append({"check": "a weight change through the router, and back",
                "ok": len(changes) == 2 and all(e["rc"] == 0 for e in changes),
                "detail": "; ".join(f"{e['command']} (exit {e['rc']}) at {e['t']:.0f} s" for e in changes)
                          or "not done"})
    outside = [a for a in doc["meta"].get("listeners", []) if not loopback(a.rsplit(":", 1)[0])]
    out.append({"check": "loopback only: every listener of the fleet on a loopback address",
                "ok": bool(doc["meta"].get("listeners")) and not outside,
                "detail": ", ".join(outside) or f"{len(doc['meta'].get('listeners', []))} listeners, all on loopback"})
    out.append({"check": "every version has its workers ready at the end", "ok": not doc["not_ready_at_end"],
                "detail": ", ".join(doc["not_ready_at_end"]) or "all ready"})
    return out


# ---------------------------------------------------------------- rendering
def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def tables(doc: dict) -> list[str]:
    """The summary, as markdown tables (readable in a terminal too)."""
    t = doc["totals"]
    lines = [f"Recycling: {name}: {how}." for name, how in doc["meta"].get("recycling", {}).items()] + [""]
    lines += ["| path | requests | failed | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    for p in doc["paths"]:
        lines.append(f"| {p['path']} | {p['requests']:,} | {p['failed']:,} | {p['rps']:,.1f} | {_ms(p['p50_ms'])} | "
                     f"{_ms(p['p99_ms'])} |")
    lines.append(f"| **all** | **{t['requests']:,}** | **{t['failed']:,}** | **{t['rps']:,.1f}** | "
                 f"**{_ms(t['p50_ms'])}** | **{_ms(t['p99_ms'])}** |")
    if t["failures_by_kind"]:
        lines += ["", "Failures by kind: " + ", ".join(f"{k}: {n:,}" for k, n in sorted(t["failures_by_kind"].items()))]
    lines += ["", "| model | requests | failed | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    for m, f in doc["models"].items():
        lines.append(f"| {m} | {f['requests']:,} | {f['failed']:,} | {_ms(f['p50_ms'])} | {_ms(f['p99_ms'])} |")
    lines += ["", "| at | what | detail |", "|---:|---|---|"]
    timeline = [(e["t"], e["what"], e["detail"] + (f"; ready again after {e['back_after_s']} s (new worker "
                                                    f"{e['new_slot']})" if "back_after_s" in e else ""))
                for e in doc["events"]]
    timeline += [(r["t"], "recycle" if r["ok"] else "recycle FAILED",
                  f"{r['model']} {r['version']} worker {r['pid']}: {r['reason']}, took {r['seconds']:.1f} s"
                  + (f": {r['detail']}" if r["detail"] else "")) for r in doc["recycles"]]
    for at, what, detail in sorted(timeline):
        lines.append(f"| {at:,.1f} s | {what} | {detail.replace('|', '/')} |")
    if doc.get("canary"):
        c = doc["canary"]
        lines += ["", f"While the canary was on ({c['from_s']:.0f}-{c['to_s'] or 0:.0f} s), {c['model']}'s clients were "
                  "answered by " + ", ".join(f"{v}: {n:,}" for v, n in c["answered_by_version"].items()) + "."]
    lines += ["", "| process | pid | RSS start MiB | RSS end MiB | drift MiB | slope MiB/min | judged | note |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    for p in doc["processes"]:
        verdict = ("ok" if p["ok"] else "**over**") if p["judged"] else f"no: {p['why_not_judged']}"
        slope = "-" if p["slope_mib_per_min"] is None else f"{p['slope_mib_per_min']:+.2f}"
        drift = "-" if p["drift_mib"] is None else f"{p['drift_mib']:+.0f}"
        label = p["label"] + (f" ({p['role']})" if p["role"] and p["role"] != "serving" else "")
        lines.append(f"| {label} | {p['pid']} | {_mib(p['start_mib'])} | {_mib(p['end_mib'])} | {drift} | {slope} | "
                     f"{verdict} | {p['note']} |")
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    for c in doc["checks"]:
        lines.append(f"| {c['check']} | {'pass' if c['ok'] else '**FAIL**'} | {c['detail'].replace('|', '/')} |")
    return lines
