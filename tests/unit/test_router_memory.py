"""A router process keeps the memory it frees: copying large bodies over and over must not
page-fault every time (tsfleet/router/memory.py says why that costs)."""
from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Passes a 1 MiB body through a connection's buffer 200 times, as the REST router does, and
# prints the minor page faults it took.
COPIES = """
import resource, sys
from tsfleet.router.memory import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
body, head = bytes(1 << 20), b"POST /predictions/m HTTP/1.1\\r\\n\\r\\n"
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
buf = bytearray()
for _ in range(200):
    buf += head + body  # read
    del buf[:len(head)]
    got = bytes(buf[:len(body)])  # taken out
    del buf[:len(body)]
    out = head + got  # sent on
    del got, out
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", COPIES, mode], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout)


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="the tuning is glibc's malloc's")
def test_large_copies_reuse_freed_memory_instead_of_faulting_in_fresh_pages() -> None:
    untuned, tuned = _faults("default"), _faults("tuned")
    assert untuned > 200 * 200  # hundreds of faults per body: the cost being removed
    assert tuned < untuned / 20
