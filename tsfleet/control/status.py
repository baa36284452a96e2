"""`tsfleet status`: what TorchServe is serving, worker by worker, and whether it matches the manifest."""
from __future__ import annotations

import json
import re
from pathlib import Path
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from handlers.contract import default_report_dir
from tsfleet.control.apply import is_private, plan
from tsfleet.control.client import ManagementClient, Worker
from tsfleet.manifest import Fleet

if TYPE_CHECKING:
    from tsfleet.control.recycle import Report

_SAMPLE = re.compile(r'^ts_inference_requests_total\{([^}]*)\}\s+(\S+)', re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def requests_served(metrics_text: str) -> dict[tuple[str, str], int]:
    """Requests TorchServe counted per (model, version), from its Prometheus text."""
    served: dict[tuple[str, str], int] = {}
    for labels, value in _SAMPLE.findall(metrics_text):
        tags = dict(_LABEL.findall(labels))
        key = (tags.get("model_name", ""), tags.get("model_version", ""))
        served[key] = served.get(key, 0) + int(float(value))
    return served


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:  # another host's pid, or the worker just exited
        return None


def _age_s(start: str, now: datetime) -> float | None:
    try:
        return (now - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return None


def _worker(w: Worker, report: Report | None, now: datetime) -> dict[str, Any]:
    # After an in-place replacement the pid TorchServe shows is a small waiter: memory and
    # age are the serving process's, as its report says.
    process = report.process if report and report.process else w.pid
    fresh = report is not None and process != w.pid
    return {"id": w.id, "pid": w.pid, "process": process, "status": w.status,
            "requests": report.requests if report else None,
            "rss_mb": _rss_mb(process) if process else None,
            "age_s": now.timestamp() - report.started if fresh else _age_s(w.start_time, now)}


def collect(fleet: Fleet, client: ManagementClient, report_dir: Path | None = None) -> dict[str, Any]:
    """Everything status shows, as plain data (what --json prints)."""
    from tsfleet.control.recycle import last_events, read_reports

    report_dir = report_dir or default_report_dir()
    recycled = last_events(report_dir)
    state = client.state()
    workflows = client.list_workflows()
    served = requests_served(client.metrics())
    now = datetime.now(timezone.utc)
    rows = []
    for name, versions in sorted(state.items()):
        for v in sorted(versions, key=lambda v: v.version):
            reports = read_reports(report_dir, name, v.version)
            rows.append({
                "model": name, "version": v.version, "default": v.is_default,
                "private_to_workflow": is_private(name, fleet),
                "batch_size": v.batch_size, "max_batch_delay_ms": v.max_batch_delay_ms,
                # Requests sent without a version are counted under "default".
                "requests": served.get((name, v.version), 0) + (served.get((name, "default"), 0) if v.is_default else 0),
                "last_recycle": recycled.get((name, v.version)),
                "workers": [_worker(w, reports.get(w.pid or -1), now) for w in v.workers],
            })
    pending = [str(step) for step in plan(fleet, state, workflows)]
    return {"models": rows, "workflows": workflows, "in_sync": not pending, "pending": pending}


def render(doc: dict[str, Any]) -> str:
    """A table per model version, then whether the server matches the manifest."""
    lines = [f"{'MODEL':<36} {'VERSION':<8} {'DEFAULT':<7} {'BATCH':<9} {'REQUESTS':>8}  "
             f"{'WORKER':<6} {'PID':>7} {'STATUS':<10} {'SERVED':>7} {'RSS MB':>7} {'AGE':>8}"]
    for row in doc["models"]:
        first = True
        for w in row["workers"] or [{"id": "-", "pid": None, "status": "no workers", "rss_mb": None, "age_s": None}]:
            head = (f"{row['model']:<36} {row['version']:<8} {'yes' if row['default'] else '':<7} "
                    f"{str(row['batch_size']) + '/' + str(row['max_batch_delay_ms']) + 'ms':<9} {row['requests']:>8}"
                    if first else " " * 72)
            rss = f"{w['rss_mb']:.0f}" if w["rss_mb"] is not None else "-"
            age = f"{w['age_s']:.0f}s" if w["age_s"] is not None else "-"
            served = "-" if w.get("requests") is None else str(w["requests"])
            lines.append(f"{head}  {w['id']:<6} {str(w['pid'] or '-'):>7} {w['status']:<10} {served:>7} {rss:>7} {age:>8}"
                         + (f"  (serving process {w['process']})" if w.get("process") not in (None, w["pid"]) else ""))
            first = False
        if row.get("last_recycle"):
            e = row["last_recycle"]
            when = datetime.fromtimestamp(e["at"], timezone.utc).strftime("%H:%M:%S")
            lines.append(f"{'':<36} last recycle {when} UTC, worker {e['pid']}: {e['reason']}"
                         + ("" if e["ok"] else f" (FAILED: {e['detail']})"))
    lines.append("")
    lines.append("workflows: " + (", ".join(doc["workflows"]) or "none"))
    if doc["in_sync"]:
        lines.append("in sync with the manifest")
    else:
        lines.append(f"NOT in sync with the manifest: {len(doc['pending'])} step(s) pending (tsfleet plan):")
        lines += [f"  {step}" for step in doc["pending"]]
    return "\n".join(lines)


def as_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True)
