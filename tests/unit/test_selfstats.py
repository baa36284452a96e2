"""The router's own CPU and memory figures, as its /metrics shows them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from tsfleet.router.selfstats import CPU, RSS, process_metrics


def _value(text: str, name: str, role: str) -> float | None:
    match = re.search(rf'^{name}{{process="{role}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else None


def test_each_process_has_its_cpu_seconds_and_resident_memory() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\n"
                             "while time.process_time() < end: pass\nimport sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:  # until the child has burnt its 0.3 s of CPU
            text = process_metrics({"leader": os.getpid(), "front-1": busy.pid})
            if (_value(text, CPU, "front-1") or 0) >= 0.3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert _value(text, CPU, "front-1") >= 0.3
        assert _value(text, CPU, "leader") > 0
        assert 1 << 20 < _value(text, RSS, "leader") < 16 << 30
        assert f"# TYPE {CPU} counter" in text and f"# TYPE {RSS} gauge" in text
    finally:
        busy.kill()
        busy.wait()


def test_a_process_that_is_gone_is_left_out() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    text = process_metrics({"leader": os.getpid(), "front-1": gone.pid})
    assert _value(text, CPU, "front-1") is None and _value(text, CPU, "leader") is not None
