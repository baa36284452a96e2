"""Writing a file so that its readers, and a crash or a power cut, see the old content or the
new one, never half of one: a temporary file beside it, flushed to disk, renamed over it."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | Path, data: bytes | str, private: bool = False) -> Path:
    """Replace ``path`` with ``data`` in one step; ``private`` makes it readable by its owner only."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
    with os.fdopen(fd, "wb") as fh:
        if private:
            os.fchmod(fh.fileno(), 0o600)  # a leftover .tmp from a crash keeps its own mode otherwise
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
